"""Encoder adaptation vle/1 (dM || dT, docs/method.md 3g).

Pairs (difference-mask overlay, diagnostic text) teach the image tower and the
text adapter a joint space with a sigmoid (SigLIP) loss; the pretrained text
tower stays frozen, so its embeddings come from the encoder's cache.

Describers repeat themselves ("no significant deviation" for many pairs), so
identical texts are treated as the same answer everywhere: a batch never holds
two copies of one text (they would be each other's negatives), and a
retrieval counts as correct when it returns the same *text*, not the same row.
"""
from __future__ import annotations

import sys
from typing import Any, Callable

import torch
from torch import Tensor
from tqdm import tqdm

from ttdl.core.losses import siglip_pair_loss
from ttdl.text.encoders import TextImageEncoder

GRAD_CLIP_NORM = 10.0


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
    `chance_expected` is what random retrieval scores under that rule.
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


def train_siglip(params: list, batch_loss, train_idx: Tensor, texts: list[str], *, epochs: int, batch_size: int,
                 lr: float, weight_decay: float, seed: int, log=None, desc: str = "adapt") -> list[float]:
    """The SigLIP training loop shared by vle/1 and vle/2; returns the train loss per epoch.

    Every epoch's text-distinct batches are drawn up front so the cosine schedule knows its length.
    """
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed + 1)
    plan = []
    for _ in range(epochs):
        order = train_idx[torch.randperm(len(train_idx), generator=gen)].tolist()
        batches = distinct_text_batches(order, texts, batch_size)
        plan.append([batches[k] for k in torch.randperm(len(batches), generator=gen).tolist()])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, sum(map(len, plan))))
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
    log: Callable[[str], Any] | None = None,
) -> dict[str, Any]:
    """Train image tower, text adapter, logit scale/bias on (image, text) pairs.

    Returns held-out retrieval before/after (None without a held-out split),
    per-epoch mean train loss and the final scale/bias. AdamW, cosine decay
    over all steps, gradient clipping at norm 10. Held-out texts may also occur
    in training (same description, other image): the test is on new images.
    """
    if len(images) != len(texts):
        raise ValueError(f"{len(images)} images but {len(texts)} texts")
    if not encoder.freeze_text:
        raise ValueError("vle/1 adapts with a frozen text tower; build the encoder with freeze_text: true")
    if batch_size < 2:
        raise ValueError(f"batch_size must be at least 2 (SigLIP needs negatives), got {batch_size}")
    texts = list(texts)
    train_idx, val_idx = split_indices(len(texts), val_fraction, seed)
    if len({texts[i] for i in train_idx}) < 2:
        raise ValueError("the training split needs at least two different texts")
    val_texts = [texts[i] for i in val_idx]

    def held_out() -> dict[str, float] | None:
        return evaluate_retrieval(encoder, images[val_idx], val_texts, batch_size) if len(val_idx) else None

    before = held_out()
    params = encoder.adaptable_parameters()
    for p in params:
        p.requires_grad_(True)
    encoder.train()
    train_loss = train_siglip(
        params,
        lambda idx: siglip_pair_loss(encoder.encode_image(images[idx]), encoder.encode_text([texts[i] for i in idx]),
                                     encoder.logit_scale, encoder.logit_bias),
        train_idx, texts, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, seed=seed,
        log=log, desc="adapt encoder")
    encoder.eval()

    return {
        "n_train": len(train_idx),
        "n_val": len(val_idx),
        "epochs": epochs,
        "before": before,
        "after": held_out(),
        "train_loss": train_loss,
        "logit_scale": float(encoder.logit_scale.detach()),
        "logit_bias": float(encoder.logit_bias.detach()),
    }
