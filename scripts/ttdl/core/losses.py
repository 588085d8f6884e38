"""Pure auxiliary losses (docs/method.md sections 3a-3d, 3g).

Every function keeps the autograd graph and returns a 0-dim tensor. When there
is nothing to score the result is `feats.sum() * 0`, so a caller can always
call `backward()` without special-casing steps that carried no text.
Logits are computed in float32 even under bf16 autocast: log-sigmoid sums over
many negatives lose too much precision in bf16.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

# Recommended init for the learnable SigLIP temperature and bias (3g): with
# exp(log 10) = 10 and bias -10 the initial logits are strongly negative, which
# matches the prior that almost all pairs in a batch are negatives.
SIGLIP_INIT_LOGIT_SCALE = math.log(10.0)
SIGLIP_INIT_LOGIT_BIAS = -10.0

MIX_MODES = ("convex", "additive")
NORMALISE_MODES = ("mean_one", "original")
NEGATIVE_REDUCTIONS = ("mean", "sum")
GROUPINGS = ("present", "original")


def _zero(*tensors: Tensor) -> Tensor:
    """A graph-connected zero so `backward()` works on steps without text."""
    return sum(t.sum() for t in tensors) * 0


def _float32(fn):
    """Run a loss with autocast off: `.float()` alone does not stop autocast from casting matmuls to bf16."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            return fn(*args, **kwargs)
    return wrapper


def _logits(img: Tensor, txt: Tensor, scale: float | Tensor, bias: float | Tensor) -> Tensor:
    return scale * (img.float() @ txt.float().T) + bias


def _reduce_negatives(neg_terms: Tensor, mask: Tensor, negatives: str) -> Tensor:
    """Per-row negative loss: summed (SigLIP, the original) or averaged over the row's negatives.

    The mean keeps a row's loss on one scale whatever the batch composition
    (how many pairs, how many share an image), so lambda means the same at every step.
    """
    total = (neg_terms * mask).sum(1)
    if negatives == "sum":
        return total
    if negatives == "mean":
        return total / mask.sum(1).clamp(min=1)
    raise ValueError(f"negatives must be one of {NEGATIVE_REDUCTIONS}, got {negatives!r}")


@_float32
def siglip_pair_loss(img: Tensor, txt: Tensor, logit_scale: Tensor, logit_bias: Tensor) -> Tensor:
    """Standard SigLIP loss for (overlay image, text) pairs; row i matches text i.

    Inputs are expected L2-normalised. `logit_scale` is a log temperature
    (init SIGLIP_INIT_LOGIT_SCALE = log 10), `logit_bias` init
    SIGLIP_INIT_LOGIT_BIAS = -10. The sum over all N*N pairs is divided by N,
    not N*N, as in the SigLIP paper.
    """
    n = img.shape[0]
    if n == 0:
        return _zero(img, txt, logit_scale, logit_bias)
    logits = logit_scale.float().exp() * (img.float() @ txt.float().T) + logit_bias.float()
    labels = 2 * torch.eye(n, device=logits.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / n


@_float32
def variable_text_siglip(
    img: Tensor, txt: Tensor, owner: Tensor, scale: float | Tensor = 1.0, bias: float | Tensor = 0.0,
    negatives: str = "sum",
) -> Tensor:
    """SigLIP with a variable number of texts per image (3b, exp 3.1).

    Positives are averaged per image so an image with many texts does not
    dominate; negatives are summed as in SigLIP. Rows without own text are
    counted in the mean with value 0 (the original's behaviour), so the loss scale
    follows the fraction of images that received text.
    """
    n = img.shape[0]
    if n == 0 or txt.shape[0] == 0:
        return _zero(img, txt)
    z = _logits(img, txt, scale, bias)  # [N, T]
    own = owner.to(z.device)[None, :] == torch.arange(n, device=z.device)[:, None]
    n_own = own.sum(1)
    pos = (-F.logsigmoid(z) * own).sum(1) / n_own.clamp(min=1)
    neg = _reduce_negatives(-F.logsigmoid(-z), ~own, negatives)
    rows = torch.where(n_own > 0, pos + neg, torch.zeros_like(pos))
    return rows.mean()


def _grouped_mean(rows: Tensor, groups: Tensor, grouping: str = "present") -> Tensor:
    """Mean over groups of (sum of the group's row losses / rows in the group).

    "present" averages over the images that carry text. "original" is the
    original's count: every batch row up to the highest one with text is a
    group, text-less rows adding zero, so the loss shrinks with the share of
    images that got text.
    """
    groups = groups.to(rows.device)
    if grouping == "original":
        n_groups = int(groups.max()) + 1
        sums = rows.new_zeros(n_groups).index_add(0, groups, rows)
        counts = rows.new_zeros(n_groups).index_add(0, groups, torch.ones_like(rows))
        return (sums / counts.clamp(min=1)).sum() / n_groups
    if grouping != "present":
        raise ValueError(f"grouping must be one of {GROUPINGS}, got {grouping!r}")
    _, inverse = torch.unique(groups, return_inverse=True)
    n_groups = int(inverse.max()) + 1
    sums = rows.new_zeros(n_groups).index_add(0, inverse, rows)
    counts = rows.new_zeros(n_groups).index_add(0, inverse, torch.ones_like(rows))
    return (sums / counts).mean()


@_float32
def grouped_siglip(
    img: Tensor,
    txt: Tensor,
    groups: Tensor,
    scale: float | Tensor = 1.0,
    bias: float | Tensor = 0.0,
    mask_same_group_negatives: bool = True,
    negatives: str = "sum",
    grouping: str = "present",
) -> Tensor:
    """SigLIP over (uid, class) rows with per-image normalisation (3c, exp 3.3).

    Rows of one group share the same image feature, so treating a sibling
    class's text as a negative pushes that feature toward and away from the same
    text at once. The default masks those pairs out; False restores the original.
    """
    p = img.shape[0]
    if p == 0:
        return _zero(img, txt)
    z = _logits(img, txt, scale, bias)  # [P, P]
    eye = torch.eye(p, dtype=torch.bool, device=z.device)
    neg_mask = ~eye
    if mask_same_group_negatives:
        g = groups.to(z.device)
        neg_mask = neg_mask & (g[:, None] != g[None, :])
    pos = -F.logsigmoid(z.diagonal())
    neg = _reduce_negatives(-F.logsigmoid(-z), neg_mask, negatives)
    return _grouped_mean(pos + neg, groups, grouping)


@_float32
def paired_negatives_siglip(
    img: Tensor,
    pos_txt: Tensor,
    neg_txt: Tensor,
    groups: Tensor,
    scale: float | Tensor = 1.0,
    bias: float | Tensor = 0.0,
    negatives: str = "sum",
    grouping: str = "present",
) -> Tensor:
    """Each row scored against its own text and its own M perturbed copies only (3d).

    Perturbed copies differ from the positive in a few diagnostic words, so the
    negatives teach the feature which error/position/class it carries rather
    than which image it came from.
    """
    p = img.shape[0]
    if p == 0:
        return _zero(img, pos_txt, neg_txt)
    x = img.float()
    z_pos = scale * (x * pos_txt.float()).sum(-1) + bias  # [P]
    z_neg = scale * torch.einsum("pd,pmd->pm", x, neg_txt.float()) + bias  # [P, M]
    rows = -F.logsigmoid(z_pos) + _reduce_negatives(-F.logsigmoid(-z_neg), torch.ones_like(z_neg, dtype=torch.bool),
                                                     negatives)
    return _grouped_mean(rows, groups, grouping)


def pixel_weight_maps(
    maps: list[Tensor | None],
    size: tuple[int, int],
    gamma: float = 0.8,
    normalise: str = "mean_one",
) -> Tensor:
    """Per-image pixel weights for the XEn rescaler (3a), shape [N, H, W].

    `normalise="original"` keeps attention maps as softmax outputs (summing to ~1
    over patches, so each pixel holds ~1/patches) but gives text-less images
    the uniform 1/(H*W): the two live on different scales, so the (1 + alpha*w)
    factor means something different for images with and without text (the
    flaw of the original). `"mean_one"` (default) scales every map and the uniform
    fallback to mean 1, making alpha comparable across images.
    """
    if normalise not in NORMALISE_MODES:
        raise ValueError(f"normalise must be one of {NORMALISE_MODES}, got {normalise!r}")
    h, w = size
    ref = next((m for m in maps if m is not None), None)
    device = ref.device if ref is not None else torch.device("cpu")
    uniform = 1.0 / (h * w) if normalise == "original" else 1.0
    out = []
    for m in maps:
        if m is None:
            wmap = torch.full((h, w), uniform, device=device)
        else:
            wmap = F.interpolate(
                m.detach().float()[None, None], size=size, mode="bilinear", align_corners=False
            )[0, 0].clamp(min=0)
            if normalise == "mean_one":
                mean = wmap.mean()
                wmap = wmap / mean if mean > 0 else torch.ones_like(wmap)
        out.append(wmap.to(device) ** gamma)
    if not out:
        return torch.zeros(0, h, w, device=device)
    return torch.stack(out)


def xen_rescale_loss(pixel_ce: Tensor, weights: Tensor, valid: Tensor, alpha: float = 10.0) -> Tensor:
    """Re-weighted pixel CE whose value equals the plain mean CE (3a, exp 2).

    The stop-gradient factor sum(l)/sum(l*(1+alpha*w)) restores the value of
    mean(l), so the loss scale and the learning rate stay comparable with the
    CE baseline while the gradient per pixel grows with (1 + alpha*w). Weights
    are constants (they come from a frozen encoder).
    """
    ce = pixel_ce[valid].float()
    if ce.numel() == 0:
        return _zero(pixel_ce)
    weighted = ce * (1 + alpha * weights.detach()[valid].float())
    denom = weighted.sum().detach()
    # all-zero CE (denominator 0): fall back to ratio 1 instead of 0/0.
    ratio = torch.where(denom > 0, ce.sum().detach() / denom.clamp(min=1e-30), torch.ones_like(denom))
    return weighted.mean() * ratio


def mix_losses(ce: Tensor, aux: Tensor, lam: float, mode: str) -> Tensor:
    """Combine CE and the aux loss: convex (the original's default) or additive (exp 3.5)."""
    if mode == "convex":
        return (1 - lam) * ce + lam * aux
    if mode == "additive":
        return ce + lam * aux
    raise ValueError(f"unknown mix mode {mode!r}; allowed: {', '.join(MIX_MODES)}")
