"""Encoder adaptation vle/1 (dM||dT): (difference overlay, describer text) pairs -> adapted encoder."""
from __future__ import annotations

from pathlib import Path

import torch

from . import io
from .adaptation import adapt_encoder
from .encoders import build_encoder, save_adapted
from .evaluation import load_run, predict_text_batches
from .objectives import build_describer_for, encoder_config
from .overlays import difference_overlay


def collect_pairs(run: dict, weights: str, max_pairs: int) -> tuple[torch.Tensor, list[str]]:
    """Difference overlays of the checkpoint's predictions with their describer texts."""
    loaded = load_run(run, weights)
    describer = build_describer_for(run, loaded.class_names, loaded.loader(run, "train").dataset)
    overlays, texts = [], []
    try:
        for tb, _ in predict_text_batches(run, loaded, train_mode=False):
            positions = list(range(len(tb.keys)))[: max_pairs - len(texts)]
            answers = describer.describe(tb.requests(positions, loaded.class_names))
            for position, text in zip(positions, answers):
                if text is None:
                    continue
                row = tb.rows[position]
                overlays.append(difference_overlay(tb.images[row], tb.gt[row], tb.pr[row], tb.classes[position]))
                texts.append(text)
            if len(texts) >= max_pairs:
                break
    finally:
        describer.close()
    if not texts:
        raise RuntimeError(f"no (overlay, text) pairs could be collected from {weights}")
    return torch.stack(overlays), texts


def run_adaptation(run: dict, weights: str, out_dir: str | Path, log=print) -> dict:
    ac = run["adaptation"]
    overlays, texts = collect_pairs(run, weights, ac["max_pairs"])
    log(f"collected {len(texts)} pairs ({len(set(texts))} distinct texts)")
    torch.manual_seed(ac["seed"])
    encoder = build_encoder(encoder_config(run, None))
    metrics = adapt_encoder(encoder, overlays, texts, epochs=ac["epochs"], batch_size=ac["batch_size"],
                            lr=ac["lr"], val_fraction=ac["val_fraction"], seed=ac["seed"], log=log)
    out_dir = Path(out_dir)
    save_adapted(encoder, out_dir / "encoder.pt")
    metrics |= {"pairs": len(texts), "distinct_texts": len(set(texts)), "init": str(weights)}
    io.write_json(out_dir / "metrics.json", metrics)
    return metrics
