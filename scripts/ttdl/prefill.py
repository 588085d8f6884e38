"""Cache prefill (method.md §4): record the starting checkpoint's masks, no describer calls.

One epoch over the training set in train mode without weight updates, so that
the first finetuning epoch re-describes only the keys whose masks changed.
"""
from __future__ import annotations

from pathlib import Path

from .cache import cache_from_config
from .evaluation import load_run, predict_text_batches


def prefill_cache(run: dict, weights: str, out_path: str | Path) -> dict:
    loaded = load_run(run, weights)
    cache = cache_from_config(run["cache"])
    for tb, _ in predict_text_batches(run, loaded, train_mode=True):
        cache.record_masks(tb.keys, tb.pr_masks())
    cache.save(out_path)
    return {"keys": len(cache), "weights": str(weights)}
