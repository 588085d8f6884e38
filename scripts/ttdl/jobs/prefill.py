"""Cache prefill (docs/method.md §4): record the starting checkpoint's masks, no describer calls.

One epoch over the training set in train mode without weight updates, so that
the first finetuning epoch re-describes only the keys whose masks changed.
"""
from __future__ import annotations

from pathlib import Path

from ttdl.core import provenance
from ttdl.core.settings import RunSettings
from ttdl.jobs.evaluation import load_run, predict_text_batches
from ttdl.text.cache import cache_from_settings


def prefill_cache(run: RunSettings, weights: str, out_path: str | Path) -> dict:
    loaded = load_run(run, weights)
    cache = cache_from_settings(run.cache)
    cache.provenance = provenance.for_cache(run.data, run.describer)
    for tb, _ in predict_text_batches(loaded, train_mode=True):
        cache.record_masks(tb.keys, tb.pr_masks())
    cache.save(out_path)
    return {"keys": len(cache), "weights": str(weights)}
