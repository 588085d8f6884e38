"""Loss heads of the text objectives: (text batch, texts, embeddings, bottleneck) -> aux loss.

One class per experiment family, registered by name in HEADS; a head may own
trainable parameters (they are optimised with the segmenter and saved with it).
Every head is called with keyword arguments: tb (TextBatch), items (TextItems),
emb ([T,D] frozen text embeddings of items.texts), bottleneck ([N,C,h,w]),
pixel_ce ([N,H,W]), valid ([N,H,W] bool).
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ttdl.core import losses
from ttdl.core.settings import ObjectiveSettings
from ttdl.text.adapters import AttentionPoolByText, ConcatAdapter, GapLinear, l2
from ttdl.text.overlays import difference_overlay, mask_overlay
from ttdl.text.synthetic_text import perturb_description


@dataclass(frozen=True)
class HeadContext:
    """What a head needs besides its settings: widths, the frozen encoder and the run's facts."""

    text_dim: int
    bottleneck_dim: int
    encoder: Any
    class_names: list[str]
    negatives_seed: int
    concat_adapter_path: str | None


def gap(bottleneck: torch.Tensor) -> torch.Tensor:
    return bottleneck.float().mean(dim=(2, 3))


class VariableSiglipHead(nn.Module):
    """3.1: rows = images (GAP of B), texts mapped to B's width by a bias-free linear map."""

    def __init__(self, cfg: ObjectiveSettings, ctx: HeadContext):
        super().__init__()
        self.cfg = cfg
        self.mlp = nn.Linear(ctx.text_dim, ctx.bottleneck_dim, bias=False)

    def forward(self, tb, items, emb, bottleneck, **_) -> torch.Tensor:
        owner = torch.tensor([tb.rows[p] for p in items.positions], dtype=torch.long, device=emb.device)
        return losses.variable_text_siglip(gap(bottleneck), self.mlp(emb), owner,
                                           self.cfg.scale, self.cfg.bias)


class GroupedSiglipHead(VariableSiglipHead):
    """3.3: rows = (image, class) pairs, grouped by image; same-image negatives masked by default."""

    def forward(self, tb, items, emb, bottleneck, **_) -> torch.Tensor:
        rows = torch.tensor([tb.rows[p] for p in items.positions], dtype=torch.long, device=emb.device)
        return losses.grouped_siglip(gap(bottleneck)[rows], self.mlp(emb), rows, self.cfg.scale,
                                     self.cfg.bias, self.cfg.mask_same_group_negatives)


class XenRescaleHead(nn.Module):
    """2: per-pixel CE re-weighted toward where the description attends on the difference overlay."""

    def __init__(self, cfg: ObjectiveSettings, ctx: HeadContext):
        super().__init__()
        self.cfg = cfg
        self.encoder = [ctx.encoder]  # not a submodule: frozen, not saved with the head

    def forward(self, tb, items, emb, bottleneck, pixel_ce, valid, **_) -> torch.Tensor:
        encoder = self.encoder[0]
        maps: list[torch.Tensor | None] = [None] * pixel_ce.shape[0]
        if items.positions:
            overlays = torch.stack([difference_overlay(tb.images[tb.rows[p]], tb.gt[tb.rows[p]],
                                                       tb.pr[tb.rows[p]], tb.classes[p]) for p in items.positions])
            with torch.no_grad():
                attention = encoder.text_patch_attention(emb, overlays.to(emb.device)).float()
            for row in set(tb.rows[p] for p in items.positions):
                picks = [i for i, p in enumerate(items.positions) if tb.rows[p] == row]
                maps[row] = attention[picks].mean(0)
        weights = losses.pixel_weight_maps(maps, tuple(pixel_ce.shape[-2:]), self.cfg.gamma,
                                           self.cfg.normalise).to(pixel_ce.device)
        return losses.xen_rescale_loss(pixel_ce, weights, valid, self.cfg.alpha)


# ---- 3.4 / 3.5 / 4.x -----------------------------------------------------------------

def pair_rows(tb, items, device) -> torch.Tensor:
    """Batch row of every text item (the grouping of 3c)."""
    return torch.tensor([tb.rows[p] for p in items.positions], dtype=torch.long, device=device)


def full_precision(device: torch.device):
    """Autocast off for the loss: under bf16 autocast the matmuls inside the losses would run in bf16
    despite their .float() casts, and log-sigmoid sums over many negatives lose too much precision."""
    return torch.autocast(device.type, enabled=False)


def encode_transient(encoder, texts: list[str]) -> torch.Tensor:
    """Frozen text embeddings of one-off texts, kept out of the encoder's text cache."""
    with torch.no_grad():
        return encoder.encode_text(texts, remember=False).float()


class PerturbedNegatives(nn.Module):
    """M near-miss copies of every positive text (3d), reproducible per (seed, step, key).

    The class pool of a pair is the class names of its image's significant
    classes, so a class swap names another object of the same scene. The step
    counter is a persistent buffer: a resumed run draws the same negatives as
    an uninterrupted one.
    """

    def __init__(self, m: int, ctx: HeadContext):
        super().__init__()
        if not ctx.class_names:
            raise ValueError("perturbed negatives need the class names (index -> name) for their class pool")
        self.class_names = list(ctx.class_names)
        self.m = m
        self.seed = ctx.negatives_seed
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def texts(self, tb, items, step: int) -> list[list[str]]:
        out = []
        for p, text in zip(items.positions, items.texts):
            row = tb.rows[p]
            pool = [self.class_names[c] for r, c in zip(tb.rows, tb.classes) if r == row]
            digest = hashlib.blake2b(f"{self.seed}:{step}:{tb.keys[p]}".encode(), digest_size=8).digest()
            out.append(perturb_description(text, pool, self.m, random.Random(int.from_bytes(digest, "big"))))
        return out

    def forward(self, tb, items, encoder, device) -> torch.Tensor:
        """[P,M,D] frozen embeddings of the negatives; advances the step counter."""
        step = int(self.step)
        self.step += 1
        flat = [t for copies in self.texts(tb, items, step) for t in copies]
        emb = encode_transient(encoder, flat).to(device)
        return emb.view(len(items.positions), self.m, -1)


class PairedNegativesHead(nn.Module):
    """3.4: text-queried attention pooling of B, scored against its text and that text's M perturbations.

    The negatives differ from the positive only in a few diagnostic words, so
    the pooled feature must carry where/what kind of error, not just which image.
    """

    def __init__(self, cfg: ObjectiveSettings, ctx: HeadContext):
        super().__init__()
        self.cfg = cfg
        self.encoder = [ctx.encoder]  # frozen, not saved with the head
        self.norm = cfg.embedding_norm
        self.pool = AttentionPoolByText(ctx.bottleneck_dim, ctx.text_dim, cfg.attn_heads)
        self.negatives = PerturbedNegatives(cfg.negatives, ctx)

    def forward(self, tb, items, emb, bottleneck, **_) -> torch.Tensor:
        if not items.positions:
            return bottleneck.float().sum() * 0
        rows = pair_rows(tb, items, bottleneck.device)
        pos = emb.float().to(bottleneck.device)
        img = self.pool(bottleneck.float(), rows, pos)
        neg = self.negatives(tb, items, self.encoder[0], bottleneck.device)
        with full_precision(bottleneck.device):
            img = img.float()
            if self.norm == "l2":
                img, pos, neg = l2(img), l2(pos), l2(neg)
            return losses.paired_negatives_siglip(img, pos, neg, rows, self.cfg.scale,
                                                  self.cfg.bias)


class BottleneckAdapterHead(nn.Module):
    """3.5: the adapter sits on the bottleneck side; the raw text embedding is the target.

    With detach_bottleneck the aux gradient trains only the adapter, which
    tests whether B already carries the diagnostic information.
    """

    def __init__(self, cfg: ObjectiveSettings, ctx: HeadContext):
        super().__init__()
        self.cfg = cfg
        self.kind = cfg.adapter
        self.norm = cfg.embedding_norm
        self.detach = cfg.detach_bottleneck
        self.adapter = (GapLinear(ctx.bottleneck_dim, ctx.text_dim) if self.kind == "gap_linear"
                        else AttentionPoolByText(ctx.bottleneck_dim, ctx.text_dim, cfg.attn_heads))

    def forward(self, tb, items, emb, bottleneck, **_) -> torch.Tensor:
        if not items.positions:
            return bottleneck.float().sum() * 0
        b = bottleneck.float()
        if self.detach:
            b = b.detach()
        rows = pair_rows(tb, items, b.device)
        txt = emb.float().to(b.device)
        img = self.adapter(b)[rows] if self.kind == "gap_linear" else self.adapter(b, rows, txt)
        with full_precision(b.device):
            img = img.float()
            if self.norm == "l2":
                img, txt = l2(img), l2(txt)
            return losses.grouped_siglip(img, txt, rows, self.cfg.scale, self.cfg.bias,
                                         self.cfg.mask_same_group_negatives)


class PrFusionHead(nn.Module):
    """4.1/4.2 (3f): image side = concat_adapter([mlp(GAP(B)) || enc_image(PR overlay)]), grouped SigLIP.

    The PR overlay tells the frozen vle/2 concat adapter which region the
    description is about; B takes the place of the GT overlay it was trained
    with, so the aux gradient asks B to supply what the ground truth would.
    The concat adapter is frozen and, like the encoder, not saved with the
    head: it always comes from `concat_adapter_path`.
    """

    def __init__(self, cfg: ObjectiveSettings, ctx: HeadContext):
        super().__init__()
        self.cfg = cfg
        self.encoder = [ctx.encoder]
        self.norm = cfg.embedding_norm
        path = ctx.concat_adapter_path
        if not path:
            raise ValueError(f"objective {cfg.name!r} needs the concat_adapter.pt written by the vle/2 "
                             "adaptation (objective.concat_adapter_from); run vle/2 first")
        if not Path(path).is_file():
            raise FileNotFoundError(f"concat adapter not found: {path} (objective.concat_adapter_from); "
                                    "it is written by the vle/2 adaptation; run vle/2 first")
        concat = ConcatAdapter.from_file(path)
        if concat.dim != ctx.text_dim:
            raise ValueError(f"{path} maps {concat.dim}-dim embeddings, but the text encoder has {ctx.text_dim}; "
                             "re-run vle/2 with this run's encoder")
        concat.requires_grad_(False)
        self.concat = [concat]  # not a submodule: frozen, not saved with the head
        self.mlp = nn.Linear(ctx.bottleneck_dim, ctx.text_dim, bias=False)

    def image_side(self, tb, items, bottleneck, rows) -> torch.Tensor:
        overlays = torch.stack([mask_overlay(tb.images[tb.rows[p]], tb.pr[tb.rows[p]] == tb.classes[p])
                                for p in items.positions])
        with torch.no_grad():
            pr_emb = self.encoder[0].encode_image(overlays).float().to(bottleneck.device)
        concat = self.concat[0].to(bottleneck.device)
        return concat(self.mlp(gap(bottleneck))[rows], pr_emb)

    def forward(self, tb, items, emb, bottleneck, **_) -> torch.Tensor:
        if not items.positions:
            return bottleneck.float().sum() * 0
        rows = pair_rows(tb, items, bottleneck.device)
        img, txt = self.image_side(tb, items, bottleneck, rows), emb.float().to(bottleneck.device)
        with full_precision(bottleneck.device):
            img = img.float()
            if self.norm == "l2":
                img, txt = l2(img), l2(txt)
            return self.loss(tb, items, img, txt, rows)

    def loss(self, tb, items, img, txt, rows) -> torch.Tensor:
        return losses.grouped_siglip(img, txt, rows, self.cfg.scale, self.cfg.bias,
                                     self.cfg.mask_same_group_negatives)


class PrFusionPairedHead(PrFusionHead):
    """4.3: the B_PR image side of 4.1/4.2 with the paired perturbed negatives of 3.4."""

    def __init__(self, cfg: ObjectiveSettings, ctx: HeadContext):
        super().__init__(cfg, ctx)
        self.negatives = PerturbedNegatives(cfg.negatives, ctx)

    def loss(self, tb, items, img, txt, rows) -> torch.Tensor:
        neg = self.negatives(tb, items, self.encoder[0], img.device)
        if self.norm == "l2":
            neg = l2(neg)
        return losses.paired_negatives_siglip(img, txt, neg, rows, self.cfg.scale,
                                              self.cfg.bias)


HEADS: dict[str, type[nn.Module]] = {
    "variable_siglip": VariableSiglipHead,
    "grouped_siglip": GroupedSiglipHead,
    "xen_rescale": XenRescaleHead,
    "paired_negatives": PairedNegativesHead,
    "bottleneck_adapter": BottleneckAdapterHead,
    "pr_fusion": PrFusionHead,
    "pr_fusion_paired": PrFusionPairedHead,
}
