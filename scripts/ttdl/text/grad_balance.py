"""How strongly the aux loss pulls on the segmenter, measured where it matters: the shared parameters.

The issue that started this module: with a fixed lambda the aux gradient on
the backbone was 2.5-16x the CE one and nearly orthogonal to it, so under
AdamW it took over the step. Every k steps a text run measures both gradients
on the parameters that feed B (the backbone), logs their norm ratio and
cosine, and (lambda_mode grad_ratio) re-sets lambda so the weighted ratio is
a chosen target.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor


@dataclass(frozen=True)
class GradStats:
    ce_norm: float
    aux_norm: float
    cosine: float


def _flat(grads, params) -> Tensor:
    return torch.cat([(g if g is not None else torch.zeros_like(p)).float().flatten() for g, p in zip(grads, params)])


def grad_stats(ce: Tensor, aux: Tensor, params: list[Tensor]) -> GradStats:
    """Norms of d(ce)/dθ and d(aux)/dθ over `params` and their cosine (the graph is kept for the real backward)."""
    params = [p for p in params if p.requires_grad]
    g_ce = _flat(torch.autograd.grad(ce, params, retain_graph=True, allow_unused=True), params)
    g_aux = _flat(torch.autograd.grad(aux, params, retain_graph=True, allow_unused=True), params)
    ce_norm, aux_norm = float(g_ce.norm()), float(g_aux.norm())
    cosine = float(g_ce @ g_aux) / (ce_norm * aux_norm) if ce_norm > 0 and aux_norm > 0 else 0.0
    return GradStats(ce_norm, aux_norm, cosine)


def mix_weights(lam: float, mix: str) -> tuple[float, float]:
    """(weight of CE, weight of aux) in the mixed loss (ttdl.core.losses.mix_losses)."""
    return (1.0 - lam, lam) if mix == "convex" else (1.0, lam)


def weighted_ratio(stats: GradStats, lam: float, mix: str) -> float:
    """λ·|∇aux| / (1−λ)·|∇CE| (convex) or λ·|∇aux| / |∇CE| (additive): the aux share of the step."""
    w_ce, w_aux = mix_weights(lam, mix)
    denominator = w_ce * stats.ce_norm
    return w_aux * stats.aux_norm / denominator if denominator > 0 else math.inf


def lambda_for_ratio(stats: GradStats, target: float, mix: str, max_lambda: float) -> float | None:
    """The lambda at which weighted_ratio(stats) == target, capped at max_lambda; None if aux has no gradient."""
    if stats.aux_norm <= 0 or stats.ce_norm <= 0:
        return None
    w = target * stats.ce_norm / stats.aux_norm  # aux weight relative to CE's
    lam = w / (1.0 + w) if mix == "convex" else w
    return min(lam, max_lambda)


@dataclass
class GradLog:
    """Epoch sums of the measurements (metrics.csv gets their means; saved with the state)."""

    n: int = 0
    ratio: float = 0.0
    cosine: float = 0.0
    lam: float = 0.0

    def add(self, ratio: float, cosine: float, lam: float) -> None:
        self.n += 1
        self.ratio += ratio
        self.cosine += cosine
        self.lam += lam

    def as_logs(self) -> dict:
        if not self.n:
            return {}
        return {"grad_ratio_aux_ce": round(self.ratio / self.n, 5), "grad_cos_aux_ce": round(self.cosine / self.n, 5),
                "lambda": round(self.lam / self.n, 6)}

    def state(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}
