"""Loss heads of the text objectives: (text batch, texts, embeddings, bottleneck) -> aux loss.

One class per experiment family, registered by name in HEADS; a head may own
trainable parameters (they are optimised with the segmenter and saved with it).
Every head is called with keyword arguments: tb (TextBatch), items (TextItems),
emb ([T,D] frozen text embeddings of items.texts), bottleneck ([N,C,h,w]),
pixel_ce ([N,H,W]), valid ([N,H,W] bool).
"""
from __future__ import annotations

import torch
from torch import nn

from . import losses
from .overlays import difference_overlay


def gap(bottleneck: torch.Tensor) -> torch.Tensor:
    return bottleneck.float().mean(dim=(2, 3))


class VariableSiglipHead(nn.Module):
    """3.1: rows = images (GAP of B), texts mapped to B's width by a bias-free linear map."""

    def __init__(self, cfg: dict, text_dim: int, bottleneck_dim: int, encoder):
        super().__init__()
        self.cfg = cfg
        self.mlp = nn.Linear(text_dim, bottleneck_dim, bias=False)

    def forward(self, tb, items, emb, bottleneck, **_) -> torch.Tensor:
        owner = torch.tensor([tb.rows[p] for p in items.positions], dtype=torch.long, device=emb.device)
        return losses.variable_text_siglip(gap(bottleneck), self.mlp(emb), owner,
                                           self.cfg["scale"], self.cfg["bias"])


class GroupedSiglipHead(VariableSiglipHead):
    """3.3: rows = (image, class) pairs, grouped by image; same-image negatives masked by default."""

    def forward(self, tb, items, emb, bottleneck, **_) -> torch.Tensor:
        rows = torch.tensor([tb.rows[p] for p in items.positions], dtype=torch.long, device=emb.device)
        return losses.grouped_siglip(gap(bottleneck)[rows], self.mlp(emb), rows, self.cfg["scale"],
                                     self.cfg["bias"], self.cfg["mask_same_group_negatives"])


class XenRescaleHead(nn.Module):
    """2: per-pixel CE re-weighted toward where the description attends on the difference overlay."""

    def __init__(self, cfg: dict, text_dim: int, bottleneck_dim: int, encoder):
        super().__init__()
        self.cfg = cfg
        self.encoder = [encoder]  # not a submodule: frozen, not saved with the head

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
        weights = losses.pixel_weight_maps(maps, tuple(pixel_ce.shape[-2:]), self.cfg["gamma"],
                                           self.cfg["normalise"]).to(pixel_ce.device)
        return losses.xen_rescale_loss(pixel_ce, weights, valid, self.cfg["alpha"])


HEADS: dict[str, type[nn.Module]] = {
    "variable_siglip": VariableSiglipHead,
    "grouped_siglip": GroupedSiglipHead,
    "xen_rescale": XenRescaleHead,
}
