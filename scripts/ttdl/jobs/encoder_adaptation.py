"""Encoder adaptation from describer texts of a checkpoint's predictions (docs/method.md 3g).

vle/1 (dM||dT): difference overlays + texts -> an adapted encoder (image tower, text adapter).
vle/2 (GT_PR||dT): GT and PR overlays + texts -> a ConcatAdapter over [GT emb || PR emb]
that the 4.x heads use frozen, with B in place of the GT embedding.
Both collect their data in one pass over the training split (`collect_overlays`).
An adaptation job's `kind` picks its function in ADAPTATIONS.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ttdl.core import io
from ttdl.core.losses import siglip_pair_loss
from ttdl.core.settings import AdaptationJob, RunSettings
from ttdl.jobs.evaluation import load_run, predict_text_batches
from ttdl.text.adaptation import (
    LOGIT_LR,
    METADATA_KEY,
    adapt_encoder,
    adaptation_metadata,
    image_tower_pretrained,
    retrieval_summary,
    retrieval_top1,
    split_indices,
    train_siglip,
)
from ttdl.text.adapters import ConcatAdapter
from ttdl.text.describers import describer_for_run
from ttdl.text.encoders import TextImageEncoder, build_encoder, save_adapted
from ttdl.text.overlays import class_overlays, difference_overlay


def collect_overlays(run: RunSettings, weights: str, max_pairs: int,
                     views: Callable[..., tuple[torch.Tensor, ...]]) -> tuple[list[torch.Tensor], list[str]]:
    """Up to `max_pairs` (views..., describer text) of the checkpoint's significant (image, class) pairs.

    `views(image, gt, pr, class_index)` returns the overlay images kept for a
    pair; returns one stacked tensor per view plus the texts. Pairs whose
    answer was malformed are skipped.
    """
    loaded = load_run(run, weights)
    describer = describer_for_run(run.describer, loaded.class_names, loaded.loader("train").dataset)
    kept: list[tuple[torch.Tensor, ...]] = []
    texts: list[str] = []
    try:
        for tb, _ in predict_text_batches(loaded, train_mode=False):
            positions = list(range(len(tb.keys)))[: max_pairs - len(texts)]
            answers = describer.describe(tb.requests(positions, loaded.class_names))
            for position, text in zip(positions, answers):
                if text is None:
                    continue
                row = tb.rows[position]
                kept.append(views(tb.images[row], tb.gt[row], tb.pr[row], tb.classes[position]))
                texts.append(text)
            if len(texts) >= max_pairs:
                break
    finally:
        describer.close()
    if not texts:
        raise RuntimeError(f"no (overlay, text) pairs could be collected from {weights}")
    return [torch.stack(view) for view in zip(*kept)], texts


def collect_pairs(run: RunSettings, weights: str, max_pairs: int) -> tuple[torch.Tensor, list[str]]:
    """vle/1 data: difference overlays of the checkpoint's predictions with their describer texts."""
    (overlays,), texts = collect_overlays(run, weights, max_pairs, lambda *a: (difference_overlay(*a),))
    return overlays, texts


def collect_overlay_triples(run: RunSettings, weights: str,
                            max_pairs: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """vle/2 data: (GT overlays [K,3,s,s], PR overlays [K,3,s,s], texts)."""
    (gt, pr), texts = collect_overlays(run, weights, max_pairs, class_overlays)
    return gt, pr, texts


def retrieval_line(name: str, held_out: dict | None) -> str:
    """One log line: held-out top-1 both ways against chance."""
    if not held_out:
        return f"{name}: no held-out split"
    r = retrieval_summary(held_out)
    return (f"{name}: held-out top-1 i2t {held_out['i2t_top1']:.3f} t2i {held_out['t2i_top1']:.3f} "
            f"(mean {r['mean_top1']:.3f}) vs chance {r['chance']:.4f} (1/n_val {held_out['chance']:.4f}): "
            f"{r['over_chance']:.2f}x chance")


def save_adapted_with_metadata(encoder: TextImageEncoder, path: str | Path, metadata: dict) -> None:
    """encoder.pt as `save_adapted` writes it, plus the adaptation's metrics under METADATA_KEY.

    One atomic write of the final file (the staging copy lives in a private temp folder), so
    `check_adaptation` never meets an encoder without its numbers.
    """
    with tempfile.TemporaryDirectory(prefix="ttdl-adapt-") as staging:
        save_adapted(encoder, Path(staging) / "encoder.pt")
        blob = io.load_torch(Path(staging) / "encoder.pt")
    blob[METADATA_KEY] = metadata
    io.save_torch(path, blob)


def run_adaptation(job: AdaptationJob, weights: str, out_dir: str | Path, log=print,
                   encoder_path: str | None = None) -> dict:
    """vle/1: writes out_dir/encoder.pt (adapted encoder + held-out metrics) and out_dir/metrics.json.

    It adapts the encoder the init run's settings name; `encoder_path` belongs to kind concat.
    The image tower trains only when it starts from random init (`adaptation.train_image_tower`
    null) or when the config says so.
    """
    if encoder_path is not None:
        raise ValueError(f"adaptation {job.adaptation_id!r} (kind encoder) adapts the configured encoder; "
                         "an adapted encoder file is an input of kind concat only")
    ac, run = job.adaptation, job.run
    overlays, texts = collect_pairs(run, weights, ac.max_pairs)
    log(f"collected {len(texts)} pairs ({len(set(texts))} distinct texts)")
    torch.manual_seed(ac.seed)
    encoder = build_encoder(run.encoder)
    pretrained = image_tower_pretrained(run.encoder, encoder)
    train_tower = (not pretrained) if ac.train_image_tower is None else ac.train_image_tower
    log(f"image tower {'pretrained' if pretrained else 'random init'}: "
        f"{'trained' if train_tower else 'frozen (only the text adapter, scale and bias train)'}")
    metrics = adapt_encoder(encoder, overlays, texts, epochs=ac.epochs, batch_size=ac.batch_size,
                            lr=ac.lr, val_fraction=ac.val_fraction, seed=ac.seed,
                            train_image_tower=train_tower, log=log)
    metrics |= {"adaptation_id": job.adaptation_id, "pairs": len(texts), "distinct_texts": len(set(texts)),
                "init": str(weights), "image_tower_pretrained": pretrained}
    if metrics["after"]:
        metrics["retrieval"] = retrieval_summary(metrics["after"])
    log(retrieval_line("before", metrics["before"]))
    log(retrieval_line("after", metrics["after"]))
    log(f"logit scale {metrics['logit_scale_before']:.3f} -> {metrics['logit_scale']:.3f}, "
        f"bias {metrics['logit_bias_before']:.3f} -> {metrics['logit_bias']:.3f}; text mean cosine "
        f"{metrics['text_geometry_before']['mean_cos']:.3f} -> {metrics['text_geometry_after']['mean_cos']:.3f}, "
        f"effective rank {metrics['text_geometry_before']['effective_rank']:.2f} -> "
        f"{metrics['text_geometry_after']['effective_rank']:.2f}")
    out_dir = Path(out_dir)
    save_adapted_with_metadata(encoder, out_dir / "encoder.pt", adaptation_metadata(metrics))
    io.write_json(out_dir / "metrics.json", metrics)
    return metrics


# ---- vle/2 ---------------------------------------------------------------------------

@torch.no_grad()
def _embed_images(encoder, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    return torch.cat([encoder.encode_image(images[i : i + batch_size]).float().cpu()
                      for i in range(0, len(images), batch_size)])


def train_concat_adapter(gt_emb: torch.Tensor, pr_emb: torch.Tensor, txt_emb: torch.Tensor, texts: list[str], *,
                         epochs: int, batch_size: int, lr: float, val_fraction: float, seed: int,
                         init_scale: float, init_bias: float, logit_lr: float = LOGIT_LR,
                         log=None) -> tuple[ConcatAdapter, dict]:
    """SigLIP on adapter.fuse(gt, pr) (unit inputs, unit output) vs the fixed text embeddings.

    The embeddings are precomputed (the encoder is frozen), so an epoch costs
    only the adapter's matmuls. Batches never repeat a text and the split,
    batching and retrieval rules are those of vle/1 (ttdl.text.adaptation);
    scale and bias learn at `logit_lr` without weight decay, as there. The
    returned adapter carries the learned scale/bias and its input/output norms.
    """
    if batch_size < 2:
        raise ValueError(f"batch_size must be at least 2 (SigLIP needs negatives), got {batch_size}")
    train_idx, val_idx = split_indices(len(texts), val_fraction, seed)
    if len({texts[i] for i in train_idx}) < 2:
        raise ValueError("the training split needs at least two different texts")
    adapter = ConcatAdapter(txt_emb.shape[1], input_norm="l2", output_norm="l2")
    scale = torch.nn.Parameter(torch.tensor(float(init_scale)))
    bias = torch.nn.Parameter(torch.tensor(float(init_bias)))
    txt_emb = F.normalize(txt_emb.float(), dim=-1)
    val_texts = [texts[i] for i in val_idx]

    @torch.no_grad()
    def held_out(embed) -> dict | None:
        return retrieval_top1(embed(val_idx), txt_emb[val_idx], val_texts) if len(val_idx) else None

    fused = lambda idx: adapter.fuse(gt_emb[idx], pr_emb[idx])  # noqa: E731
    baselines = {"before": held_out(fused),  # the untrained adapter: mean of both embeddings
                 "gt_only": held_out(lambda idx: gt_emb[idx]), "pr_only": held_out(lambda idx: pr_emb[idx])}
    groups = [{"params": list(adapter.parameters()), "lr": lr, "weight_decay": 0.0},
              {"params": [scale, bias], "lr": logit_lr, "weight_decay": 0.0}]
    train_loss = train_siglip(groups, lambda idx: siglip_pair_loss(fused(idx), txt_emb[idx], scale, bias),
                              train_idx, texts, epochs=epochs, batch_size=batch_size, seed=seed, log=log,
                              desc="adapt concat")
    adapter.requires_grad_(False)
    adapter.logit_scale, adapter.logit_bias = float(scale.detach()), float(bias.detach())
    metrics = baselines | {"n_train": len(train_idx), "n_val": len(val_idx), "epochs": epochs,
                           "after": held_out(fused), "train_loss": train_loss,
                           "logit_scale_before": float(init_scale), "logit_bias_before": float(init_bias),
                           "logit_scale": adapter.logit_scale, "logit_bias": adapter.logit_bias,
                           "input_norm": adapter.input_norm, "output_norm": adapter.output_norm}
    if metrics["after"]:
        metrics["retrieval"] = retrieval_summary(metrics["after"])
    return adapter, metrics


def run_concat_adaptation(job: AdaptationJob, weights: str, out_dir: str | Path, log=print,
                          encoder_path: str | None = None) -> dict:
    """vle/2: writes out_dir/concat_adapter.pt (ConcatAdapter.from_file) and out_dir/metrics.json.

    `encoder_path` is an optional vle/1 adapted encoder; the 4.x runs that use
    the adapter must embed with the same encoder and feed it as `ConcatAdapter.fuse` does.
    """
    ac, run = job.adaptation, job.run
    gt, pr, texts = collect_overlay_triples(run, weights, ac.max_pairs)
    log(f"collected {len(texts)} triples ({len(set(texts))} distinct texts)")
    torch.manual_seed(ac.seed)
    encoder = build_encoder(run.encoder, adapted_path=encoder_path).eval()
    encoder.requires_grad_(False)
    gt_emb, pr_emb = _embed_images(encoder, gt), _embed_images(encoder, pr)
    with torch.no_grad():
        txt_emb = encoder.encode_text(texts).float().cpu()
    adapter, metrics = train_concat_adapter(
        gt_emb, pr_emb, txt_emb, texts, epochs=ac.epochs, batch_size=ac.batch_size, lr=ac.lr,
        val_fraction=ac.val_fraction, seed=ac.seed, init_scale=float(encoder.logit_scale.detach()),
        init_bias=float(encoder.logit_bias.detach()), log=log)
    metrics |= {"adaptation_id": job.adaptation_id, "pairs": len(texts), "distinct_texts": len(set(texts)),
                "init": str(weights), "encoder": encoder.name,
                "encoder_adapted": str(encoder_path) if encoder_path else None}
    for name in ("gt_only", "pr_only", "before", "after"):
        log(retrieval_line(name, metrics[name]))
    log(f"logit scale {metrics['logit_scale_before']:.3f} -> {metrics['logit_scale']:.3f}, "
        f"bias {metrics['logit_bias_before']:.3f} -> {metrics['logit_bias']:.3f}")
    out_dir = Path(out_dir)
    adapter.save(out_dir / "concat_adapter.pt", encoder=encoder.name, encoder_adapted=metrics["encoder_adapted"],
                 **{k: metrics[k] for k in ("adaptation_id", "n_val", "before", "after", "gt_only", "pr_only")})
    io.write_json(out_dir / "metrics.json", metrics)
    return metrics


# adaptation.kind -> the job that writes its outputs
ADAPTATIONS: dict[str, Callable[..., dict]] = {"encoder": run_adaptation, "concat": run_concat_adaptation}


def run_adaptation_job(job: AdaptationJob, weights: str, out_dir: str | Path, log=print,
                       encoder_path: str | None = None) -> dict:
    """Run the adaptation job of its kind (see ADAPTATIONS)."""
    return ADAPTATIONS[job.adaptation.kind](job, weights, out_dir, log=log, encoder_path=encoder_path)
