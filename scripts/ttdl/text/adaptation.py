"""Encoder adaptation vle/1 (dM || dT, docs/method.md 3g).

Pairs (difference-mask overlay, diagnostic text) teach the image tower and the
text adapter a joint space with a sigmoid (SigLIP) loss; the pretrained text
tower stays frozen, so its embeddings come from the encoder's cache.

Describers repeat themselves ("no significant deviation" for many pairs), so
identical texts are treated as the same answer everywhere: a batch never holds
two copies of one text (they would be each other's negatives), and a
retrieval counts as correct when it returns the same *text*, not the same row.

Why the loop looks the way it does (measured on the default data, 390 pairs):
with one shared learning rate the towers reach SigLIP's *constant-logit* optimum
(every pair scored log(1/(n-1)), i.e. all cosines equal) long before scale and
bias move: the image tower maps every overlay to one vector and the text
adapter drags every text towards it. Held-out retrieval stays at chance, text
cosine rises and scale/bias end where they started. So scale and bias get their
own, larger learning rate and no weight decay, and the text adapter is held
near the identity (a penalty on ||W - I||) so it can reshape the text space but
not fold it onto one direction.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from tqdm import tqdm

from ttdl.core.io import load_torch
from ttdl.core.losses import siglip_pair_loss
from ttdl.core.settings import EncoderSettings
from ttdl.text.encoders import DEFAULT_NAME, TextImageEncoder

GRAD_CLIP_NORM = 10.0
# Scale and bias move from (log 10, -10) to the data's values in a few hundred steps only with
# a learning rate of their own; AdamW moves them by at most lr per step.
LOGIT_LR = 0.05
# Strength of the pull of the text adapter towards the identity (per squared Frobenius unit).
ADAPTER_ANCHOR = 1.0
# Share of all steps spent in linear learning-rate warm-up (a ViT from random init needs it).
WARMUP_FRACTION = 0.1
METADATA_KEY = "adaptation"  # where vle/1 writes its held-out metrics inside encoder.pt


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Deterministic (train, held-out) index split of n pairs."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, min(n - 1, round(n * val_fraction))) if val_fraction > 0 else 0
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def distinct_text_batches(order: list[int], texts: list[str], batch_size: int) -> list[list[int]]:
    """Split `order` first-fit into batches in which no text repeats.

    A repeated text would be its own negative. Rows left alone in a batch are
    skipped this epoch (no negatives to learn from); the shuffle next epoch
    places them elsewhere.
    """
    batches: list[list[int]] = []
    seen: list[set[str]] = []
    open_ids: list[int] = []  # batches not yet full
    for i in order:
        pos = next((p for p, b in enumerate(open_ids) if texts[i] not in seen[b]), None)
        if pos is None:
            batches.append([])
            seen.append(set())
            open_ids.append(len(batches) - 1)
            pos = len(open_ids) - 1
        b = open_ids[pos]
        batches[b].append(i)
        seen[b].add(texts[i])
        if len(batches[b]) == batch_size:
            open_ids.pop(pos)
    return [b for b in batches if len(b) > 1]


def retrieval_top1(img: Tensor, txt: Tensor, texts: list[str]) -> dict[str, float]:
    """Top-1 image->text and text->image accuracy among the given pairs.

    A hit is any retrieved row carrying the same text as the query's own pair.
    `chance` is 1/n (one row of n); `chance_expected` is what random retrieval
    scores under the same-text rule (>= chance when texts repeat), the bar an
    adaptation is judged against.
    """
    n = len(texts)
    ids = {t: k for k, t in enumerate(dict.fromkeys(texts))}
    label = torch.tensor([ids[t] for t in texts])
    sims = img.float() @ txt.float().T  # [images, texts]
    i2t = (label[sims.argmax(dim=1).cpu()] == label).float().mean()
    t2i = (label[sims.argmax(dim=0).cpu()] == label).float().mean()
    same = (label[:, None] == label[None, :]).float().sum(1) / n
    return {"i2t_top1": float(i2t), "t2i_top1": float(t2i),
            "chance": 1.0 / n, "chance_expected": float(same.mean())}


def text_geometry(emb: Tensor) -> dict[str, float]:
    """Mean pairwise cosine and effective rank (exp of the spectral entropy) of unit text embeddings.

    A collapsing text side shows as a rising mean cosine and a falling rank.
    """
    e = emb.float()
    n = e.shape[0]
    if n < 2:
        return {"mean_cos": float("nan"), "effective_rank": float("nan")}
    cos = e @ e.T
    s2 = torch.linalg.svdvals(e) ** 2
    p = s2 / s2.sum()
    entropy = -(p * p.clamp_min(1e-12).log()).sum()
    return {"mean_cos": float((cos.sum() - cos.diagonal().sum()) / (n * n - n)),
            "effective_rank": float(entropy.exp())}


@torch.no_grad()
def evaluate_retrieval(
    encoder: TextImageEncoder, images: Tensor, texts: list[str], batch_size: int = 64
) -> dict[str, float]:
    was_training = encoder.training
    encoder.eval()
    img = torch.cat([encoder.encode_image(images[i : i + batch_size])
                     for i in range(0, len(texts), batch_size)])
    txt = encoder.encode_text(texts)
    encoder.train(was_training)
    return retrieval_top1(img, txt, texts)


def warmup_cosine(total_steps: int, warmup_fraction: float = WARMUP_FRACTION) -> Callable[[int], float]:
    """LR factor per step: linear warm-up, then cosine decay to zero."""
    warmup = int(total_steps * warmup_fraction)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def train_siglip(groups: list[dict], batch_loss, train_idx: Tensor, texts: list[str], *, epochs: int,
                 batch_size: int, seed: int, log=None, desc: str = "adapt",
                 warmup_fraction: float = WARMUP_FRACTION) -> list[float]:
    """The SigLIP training loop shared by vle/1 and vle/2; returns the train loss per epoch.

    `groups` are AdamW parameter groups (`params`, `lr`, `weight_decay`), so
    scale and bias can learn at their own rate without weight decay. Every
    epoch's text-distinct batches are drawn up front so the schedule knows its length.
    """
    opt = torch.optim.AdamW([dict(g) for g in groups])
    params = [p for g in groups for p in g["params"]]
    gen = torch.Generator().manual_seed(seed + 1)
    plan = []
    for _ in range(epochs):
        order = train_idx[torch.randperm(len(train_idx), generator=gen)].tolist()
        batches = distinct_text_batches(order, texts, batch_size)
        plan.append([batches[k] for k in torch.randperm(len(batches), generator=gen).tolist()])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(max(1, sum(map(len, plan))), warmup_fraction))
    train_loss: list[float] = []
    bar = tqdm(plan, desc=desc, disable=not sys.stderr.isatty())
    for epoch, batches in enumerate(bar):
        total, count = 0.0, 0
        for idx in batches:
            loss = batch_loss(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP_NORM)
            opt.step()
            sched.step()
            total, count = total + loss.item() * len(idx), count + len(idx)
        train_loss.append(total / max(count, 1))
        bar.set_postfix(loss=f"{train_loss[-1]:.4f}")
        if log is not None:
            log(f"epoch {epoch + 1}/{epochs} train_loss={train_loss[-1]:.4f}")
    return train_loss


def image_tower_pretrained(settings: EncoderSettings, encoder: TextImageEncoder) -> bool:
    """Whether the encoder's image tower starts from trained weights (then vle/1 trains only adapters).

    minilm-vit's ViT is random unless `adapted` restores an earlier adaptation;
    an open_clip model always loads `weights`; a FLAIR checkpoint counts only
    when its whole image tower was loaded.
    """
    if settings.name == DEFAULT_NAME:
        return settings.adapted is not None
    report = getattr(encoder, "flair_report", None)
    if report is not None:
        return bool(report.visual) and not report.visual_missing and not report.visual_skipped
    return True


def adapter_anchor_penalty(adapter: nn.Module | None) -> Tensor | float:
    """||W - I||_F^2 of the bias-free text adapter: the pull that keeps it from collapsing the text space."""
    if adapter is None:
        return 0.0
    w = adapter.linear.weight
    return (w - torch.eye(w.shape[0], device=w.device, dtype=w.dtype)).pow(2).sum()


def adapt_encoder(
    encoder: TextImageEncoder,
    images: Tensor,
    texts: list[str],
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    val_fraction: float,
    seed: int,
    weight_decay: float = 0.0,
    train_image_tower: bool = True,
    logit_lr: float = LOGIT_LR,
    adapter_anchor: float = ADAPTER_ANCHOR,
    log: Callable[[str], Any] | None = None,
) -> dict[str, Any]:
    """Train the text adapter, logit scale/bias and (if `train_image_tower`) the image tower.

    A pretrained image tower stays frozen: a few hundred pairs would only
    overwrite what it knows. Scale and bias learn at `logit_lr` without weight
    decay; `weight_decay` applies to the image tower only; the text adapter is
    pulled towards the identity with weight `adapter_anchor`. Returns held-out
    retrieval before/after (None without a held-out split), per-epoch mean
    train loss, scale/bias before and after, and the text geometry before and
    after. Held-out texts may also occur in training (same description, other
    image): the test is on new images.
    """
    if len(images) != len(texts):
        raise ValueError(f"{len(images)} images but {len(texts)} texts")
    if not encoder.freeze_text:
        raise ValueError("vle/1 adapts with a frozen text tower; build the encoder with freeze_text: true")
    if batch_size < 2:
        raise ValueError(f"batch_size must be at least 2 (SigLIP needs negatives), got {batch_size}")
    if not train_image_tower and encoder.text_adapter is None:
        raise ValueError("nothing to adapt: the image tower is frozen and the encoder has no text adapter "
                         "(set encoder.text_adapter: true or adaptation.train_image_tower: true)")
    texts = list(texts)
    train_idx, val_idx = split_indices(len(texts), val_fraction, seed)
    if len({texts[i] for i in train_idx}) < 2:
        raise ValueError("the training split needs at least two different texts")
    val_texts = [texts[i] for i in val_idx]
    distinct = list(dict.fromkeys(texts))

    def held_out() -> dict[str, float] | None:
        return evaluate_retrieval(encoder, images[val_idx], val_texts, batch_size) if len(val_idx) else None

    def geometry() -> dict[str, float]:
        with torch.no_grad():
            return text_geometry(encoder.encode_text(distinct))

    before, geometry_before = held_out(), geometry()
    scale_before, bias_before = float(encoder.logit_scale.detach()), float(encoder.logit_bias.detach())
    encoder.requires_grad_(False)
    groups = [{"params": [encoder.logit_scale, encoder.logit_bias], "lr": logit_lr, "weight_decay": 0.0}]
    if encoder.text_adapter is not None:
        groups.append({"params": list(encoder.text_adapter.parameters()), "lr": lr, "weight_decay": 0.0})
    if train_image_tower:
        groups.append({"params": list(encoder.model.visual.parameters()), "lr": lr, "weight_decay": weight_decay})
    for group in groups:
        for p in group["params"]:
            p.requires_grad_(True)
    encoder.train()

    def batch_loss(idx: list[int]) -> Tensor:
        loss = siglip_pair_loss(encoder.encode_image(images[idx]), encoder.encode_text([texts[i] for i in idx]),
                                encoder.logit_scale, encoder.logit_bias)
        return loss + adapter_anchor * adapter_anchor_penalty(encoder.text_adapter)

    train_loss = train_siglip(groups, batch_loss, train_idx, texts, epochs=epochs, batch_size=batch_size,
                              seed=seed, log=log, desc="adapt encoder")
    encoder.eval()
    encoder.requires_grad_(False)
    return {
        "n_train": len(train_idx),
        "n_val": len(val_idx),
        "epochs": epochs,
        "trained": {"image_tower": train_image_tower, "text_adapter": encoder.text_adapter is not None,
                    "logit_scale_bias": True},
        "before": before,
        "after": held_out(),
        "train_loss": train_loss,
        "logit_scale_before": scale_before,
        "logit_bias_before": bias_before,
        "logit_scale": float(encoder.logit_scale.detach()),
        "logit_bias": float(encoder.logit_bias.detach()),
        "text_geometry_before": geometry_before,
        "text_geometry_after": geometry(),
    }


# ---- judging an adaptation -------------------------------------------------------------

def retrieval_summary(held_out: dict[str, float]) -> dict[str, float]:
    """Mean held-out top-1 (i2t, t2i) and its ratio to chance, the number an adaptation is judged by.

    Chance is `chance_expected`, what random retrieval scores under the
    same-text hit rule (at least 1/n_val when texts repeat), so a describer
    that repeats itself cannot pass on repetition alone.
    """
    mean = 0.5 * (held_out["i2t_top1"] + held_out["t2i_top1"])
    chance = held_out.get("chance_expected", held_out["chance"])
    trials = 2 * round(1.0 / held_out["chance"])  # both directions over n_val queries
    return {"mean_top1": mean, "chance": chance, "over_chance": mean / chance if chance > 0 else float("inf"),
            "p_value": binomial_tail(round(mean * trials), trials, chance)}


def binomial_tail(hits: int, trials: int, p: float) -> float:
    """P(X >= hits) for X ~ Binomial(trials, p): how often random retrieval would score this well.

    Pools i2t and t2i as if independent (they are not quite), so read it as a rough guide:
    with ~80 held-out pairs a chance-level encoder reaches 2x chance in a few percent of splits.
    """
    if hits <= 0:
        return 1.0
    p = min(max(p, 0.0), 1.0)
    below = sum(math.comb(trials, k) * p**k * (1 - p) ** (trials - k) for k in range(min(hits, trials + 1)))
    return max(0.0, 1.0 - below)


def adaptation_metadata(metrics: dict[str, Any]) -> dict[str, Any]:
    """What vle/1 stores in encoder.pt under METADATA_KEY: plain numbers only (weights_only loads it)."""
    keep = ("adaptation_id", "init", "pairs", "distinct_texts", "n_train", "n_val", "epochs", "trained",
            "before", "after", "logit_scale_before", "logit_bias_before", "logit_scale", "logit_bias",
            "text_geometry_before", "text_geometry_after", "retrieval")
    return {k: metrics[k] for k in keep if k in metrics}


def check_adaptation(path: str | Path, min_factor: float) -> tuple[bool, str]:
    """Whether the adapted encoder at `path` learned: held-out mean top-1 >= min_factor x chance.

    Reads the metadata vle/1 saved in the file (weights_only). Refuses a file
    without that metadata or without a held-out split: nothing shows it is
    better than the shipped encoder. `min_factor` 0 accepts any file. The
    reason names the numbers, for the run's log and summary.
    """
    if min_factor <= 0:
        return True, f"adapted encoder {path}: retrieval check disabled (min_retrieval_over_chance = 0)"
    blob = load_torch(path)
    meta = blob.get(METADATA_KEY) if isinstance(blob, dict) else None
    if not isinstance(meta, dict):
        return False, (f"adapted encoder {path} carries no adaptation metrics (written by an older ttdl or "
                       "by hand); re-run its adaptation to judge it")
    after = meta.get("after")
    if not after:
        return False, (f"adapted encoder {path} has no held-out retrieval (val_fraction 0): "
                       "nothing shows that it learned")
    r = retrieval_summary(after)
    nan = float("nan")
    numbers = (f"held-out top-1 i2t {after['i2t_top1']:.3f}, t2i {after['t2i_top1']:.3f} (mean {r['mean_top1']:.3f}, "
               f"n_val {meta.get('n_val', '?')}) = {r['over_chance']:.2f}x chance {r['chance']:.4f} "
               f"(binomial p {r['p_value']:.2g}); "
               f"logit scale {meta.get('logit_scale_before', nan):.3f} -> {meta.get('logit_scale', nan):.3f}, "
               f"bias {meta.get('logit_bias_before', nan):.3f} -> {meta.get('logit_bias', nan):.3f}")
    if r["over_chance"] >= min_factor:
        return True, f"adapted encoder {path} accepted ({r['over_chance']:.2f}x >= {min_factor:g}x required): {numbers}"
    return False, (f"adapted encoder {path} refused ({r['over_chance']:.2f}x < {min_factor:g}x required: "
                   f"the adaptation did not learn): {numbers}")
