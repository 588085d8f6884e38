"""Loss heads of the text objectives: (text batch, texts, embeddings, bottleneck) -> aux loss.

One class per experiment family, registered by name in HEADS; a head may own
trainable parameters (they are optimised with the segmenter and saved with it).
Every head is called with keyword arguments: tb (TextBatch), items (TextItems),
emb ([T,D] frozen text embeddings of items.texts), bottleneck ([N,C,h,w]),
pixel_ce ([N,H,W]), valid ([N,H,W] bool).
"""
from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
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


def full_precision(device: torch.device):
    """Autocast off for the loss: under bf16 autocast the matmuls inside the losses would run in bf16
    despite their .float() casts, and log-sigmoid sums over many negatives lose too much precision."""
    return torch.autocast(device.type, enabled=False)


def class_pooled(bottleneck: torch.Tensor, probs: torch.Tensor, rows: torch.Tensor,
                 classes: torch.Tensor) -> torch.Tensor:
    """B averaged under each pair's predicted probability map of its class: [P, C].

    A diagnosis is about one class of one image, so each pair needs its own
    feature; GAP gives every class of an image the same one. The weights are
    the (detached) softmax probabilities resized to B's grid, so a class the
    model barely predicts still gets a feature (from where it is most likely)
    and the gradient reaches only B.
    """
    b = bottleneck.float()
    if rows.numel() == 0:
        return b.sum() * 0 + b.new_zeros((0, b.shape[1]))
    weights = F.adaptive_avg_pool2d(probs.detach().float(), b.shape[-2:])[rows, classes]  # [P,h,w]
    weights = weights / weights.sum(dim=(1, 2), keepdim=True).clamp(min=1e-6)
    return torch.einsum("phw,pchw->pc", weights, b[rows])


def pair_rows(tb, items, device) -> torch.Tensor:
    """Batch row of every text item (the grouping of 3c)."""
    return torch.tensor([tb.rows[p] for p in items.positions], dtype=torch.long, device=device)


def pair_classes(tb, items, device) -> torch.Tensor:
    return torch.tensor([tb.classes[p] for p in items.positions], dtype=torch.long, device=device)


def image_side(cfg: ObjectiveSettings, tb, items, bottleneck, probs) -> torch.Tensor:
    """[P, C] image feature of every text item: class-pooled (default) or GAP of its image."""
    rows = pair_rows(tb, items, bottleneck.device)
    if cfg.image_side == "masked":
        if probs is None:  # no soft map given: the hard predicted masks of the describer's view
            probs = F.one_hot(tb.pr, max(tb.classes) + 1).permute(0, 3, 1, 2).float()
        return class_pooled(bottleneck, probs.to(bottleneck.device), rows, pair_classes(tb, items, bottleneck.device))
    return gap(bottleneck)[rows]


class SiglipLogitParams(nn.Module):
    """The SigLIP logit scale and bias of a head: learned (log s and b, no weight decay) or fixed.

    Fixed at s = 1, b = 0 (the original) on L2-normalised sides, logits live in
    [-1, 1] and the loss cannot approach zero; learned from the recommended init
    (s = 10, b = -10) they settle where positives and negatives separate.
    """

    NO_DECAY = ("logit_scale", "logit_bias")

    def __init__(self, cfg: ObjectiveSettings) -> None:
        super().__init__()
        scale, bias = torch.tensor(math.log(cfg.scale)), torch.tensor(float(cfg.bias))
        if cfg.learn_scale_bias:
            self.logit_scale, self.logit_bias = nn.Parameter(scale), nn.Parameter(bias)
        else:
            self.register_buffer("logit_scale", scale)
            self.register_buffer("logit_bias", bias)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.logit_scale.float().exp(), self.logit_bias.float()


def normalised(cfg: ObjectiveSettings, *sides: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(l2(x) for x in sides) if cfg.embedding_norm == "l2" else tuple(x.float() for x in sides)


def zero_over_parameters(head: nn.Module) -> torch.Tensor:
    """A graph-connected zero over a head's parameters (their grads exist, as 0, on steps without text)."""
    return sum(p.sum() for p in head.parameters()) * 0


class VariableSiglipHead(nn.Module):
    """3.1: texts mapped to B's width by a bias-free linear map; each text scored against every image feature.

    With image_side gap the rows are images (GAP of B) and an image owns all
    its texts (the original); with masked every text has its own class-pooled
    feature, rows are pairs and an image's other pairs are not its negatives.
    """

    def __init__(self, cfg: ObjectiveSettings, ctx: HeadContext):
        super().__init__()
        self.cfg = cfg
        self.mlp = nn.Linear(ctx.text_dim, ctx.bottleneck_dim, bias=False)
        self.logit = SiglipLogitParams(cfg)

    def forward(self, tb, items, emb, bottleneck, probs=None, **_) -> torch.Tensor:
        scale, bias = self.logit()
        owner = pair_rows(tb, items, emb.device)
        with full_precision(bottleneck.device):
            if self.cfg.image_side == "gap":
                img, txt = normalised(self.cfg, gap(bottleneck), self.mlp(emb))
                return losses.variable_text_siglip(img, txt, owner, scale, bias, self.cfg.negatives_reduction)
            if not items.positions:
                return bottleneck.float().sum() * 0 + zero_over_parameters(self)
            img, txt = normalised(self.cfg, image_side(self.cfg, tb, items, bottleneck, probs), self.mlp(emb))
            return losses.grouped_siglip(img, txt, owner, scale, bias, True, self.cfg.negatives_reduction,
                                         self.cfg.grouping)


class GroupedSiglipHead(VariableSiglipHead):
    """3.3: rows = (image, class) pairs, grouped by image; same-image negatives masked by default."""

    def forward(self, tb, items, emb, bottleneck, probs=None, **_) -> torch.Tensor:
        if not items.positions:
            return bottleneck.float().sum() * 0 + zero_over_parameters(self)
        scale, bias = self.logit()
        rows = pair_rows(tb, items, emb.device)
        with full_precision(bottleneck.device):
            img, txt = normalised(self.cfg, image_side(self.cfg, tb, items, bottleneck, probs), self.mlp(emb))
            return losses.grouped_siglip(img, txt, rows, scale, bias, self.cfg.mask_same_group_negatives,
                                         self.cfg.negatives_reduction, self.cfg.grouping)


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
        self.pool = AttentionPoolByText(ctx.bottleneck_dim, ctx.text_dim, cfg.attn_heads)
        self.negatives = PerturbedNegatives(cfg.negatives, ctx)
        self.logit = SiglipLogitParams(cfg)

    def forward(self, tb, items, emb, bottleneck, **_) -> torch.Tensor:
        if not items.positions:
            return bottleneck.float().sum() * 0 + zero_over_parameters(self)
        rows = pair_rows(tb, items, bottleneck.device)
        pos = emb.float().to(bottleneck.device)
        img = self.pool(bottleneck.float(), rows, pos)
        neg = self.negatives(tb, items, self.encoder[0], bottleneck.device)
        scale, bias = self.logit()
        with full_precision(bottleneck.device):
            img, pos, neg = normalised(self.cfg, img, pos, neg)
            return losses.paired_negatives_siglip(img, pos, neg, rows, scale, bias, self.cfg.negatives_reduction,
                                                  self.cfg.grouping)


class BottleneckAdapterHead(nn.Module):
    """3.5: the adapter sits on the bottleneck side; the raw text embedding is the target.

    With detach_bottleneck the aux gradient trains only the adapter, which
    tests whether B already carries the diagnostic information. The gap_linear
    adapter pools B per class (image_side masked) or over the whole image (gap).
    """

    def __init__(self, cfg: ObjectiveSettings, ctx: HeadContext):
        super().__init__()
        self.cfg = cfg
        self.kind = cfg.adapter
        self.detach = cfg.detach_bottleneck
        self.adapter = (GapLinear(ctx.bottleneck_dim, ctx.text_dim) if self.kind == "gap_linear"
                        else AttentionPoolByText(ctx.bottleneck_dim, ctx.text_dim, cfg.attn_heads))
        self.logit = SiglipLogitParams(cfg)

    def forward(self, tb, items, emb, bottleneck, probs=None, **_) -> torch.Tensor:
        if not items.positions:
            return bottleneck.float().sum() * 0 + zero_over_parameters(self)
        b = bottleneck.float()
        if self.detach:
            b = b.detach()
        rows = pair_rows(tb, items, b.device)
        txt = emb.float().to(b.device)
        if self.kind == "gap_linear":
            img = self.adapter.linear(image_side(self.cfg, tb, items, b, probs))
        else:
            img = self.adapter(b, rows, txt)
        scale, bias = self.logit()
        with full_precision(b.device):
            img, txt = normalised(self.cfg, img, txt)
            return losses.grouped_siglip(img, txt, rows, scale, bias, self.cfg.mask_same_group_negatives,
                                         self.cfg.negatives_reduction, self.cfg.grouping)


class PrFusionHead(nn.Module):
    """4.1/4.2 (3f): image side = concat_adapter([mlp(pool(B)) || enc_image(PR overlay)]), grouped SigLIP.

    The PR overlay tells the frozen vle/2 concat adapter which region the
    description is about; B takes the place of the GT overlay it was trained
    with, so the aux gradient asks B to supply what the ground truth would.
    The adapter is fed what it was trained on (both halves L2-normalised, see
    ConcatAdapter.fuse). It is frozen and, like the encoder, not saved with the
    head: it always comes from `concat_adapter_path`.
    """

    def __init__(self, cfg: ObjectiveSettings, ctx: HeadContext):
        super().__init__()
        self.cfg = cfg
        self.encoder = [ctx.encoder]
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
        self.logit = SiglipLogitParams(cfg)
        if cfg.learn_scale_bias:  # start where vle/2 left the scale and bias of this very space
            with torch.no_grad():
                self.logit.logit_scale.fill_(concat.logit_scale)
                self.logit.logit_bias.fill_(concat.logit_bias)

    def image_side(self, tb, items, bottleneck, probs) -> torch.Tensor:
        overlays = torch.stack([mask_overlay(tb.images[tb.rows[p]], tb.pr[tb.rows[p]] == tb.classes[p])
                                for p in items.positions])
        with torch.no_grad():
            pr_emb = self.encoder[0].encode_image(overlays).float().to(bottleneck.device)
        concat = self.concat[0].to(bottleneck.device)
        return concat.fuse(self.mlp(image_side(self.cfg, tb, items, bottleneck, probs)), pr_emb)

    def forward(self, tb, items, emb, bottleneck, probs=None, **_) -> torch.Tensor:
        if not items.positions:
            return bottleneck.float().sum() * 0 + zero_over_parameters(self)
        rows = pair_rows(tb, items, bottleneck.device)
        img, txt = self.image_side(tb, items, bottleneck, probs), emb.float().to(bottleneck.device)
        scale, bias = self.logit()
        with full_precision(bottleneck.device):
            img, txt = normalised(self.cfg, img, txt)
            return self.loss(tb, items, img, txt, rows, scale, bias)

    def loss(self, tb, items, img, txt, rows, scale, bias) -> torch.Tensor:
        return losses.grouped_siglip(img, txt, rows, scale, bias, self.cfg.mask_same_group_negatives,
                                     self.cfg.negatives_reduction, self.cfg.grouping)


class PrFusionPairedHead(PrFusionHead):
    """4.3: the B_PR image side of 4.1/4.2 with the paired perturbed negatives of 3.4."""

    def __init__(self, cfg: ObjectiveSettings, ctx: HeadContext):
        super().__init__(cfg, ctx)
        self.negatives = PerturbedNegatives(cfg.negatives, ctx)

    def loss(self, tb, items, img, txt, rows, scale, bias) -> torch.Tensor:
        (neg,) = normalised(self.cfg, self.negatives(tb, items, self.encoder[0], img.device))
        return losses.paired_negatives_siglip(img, txt, neg, rows, scale, bias, self.cfg.negatives_reduction,
                                              self.cfg.grouping)


HEADS: dict[str, type[nn.Module]] = {
    "variable_siglip": VariableSiglipHead,
    "grouped_siglip": GroupedSiglipHead,
    "xen_rescale": XenRescaleHead,
    "paired_negatives": PairedNegativesHead,
    "bottleneck_adapter": BottleneckAdapterHead,
    "pr_fusion": PrFusionHead,
    "pr_fusion_paired": PrFusionPairedHead,
}
