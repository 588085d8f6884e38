"""Fixed, degraded train labels for the privileged-information experiment.

CE trains on a worse label than the describer sees (docs: config/privileged.yaml),
so any gain of a text run over CE-only must come from what the text adds. The
degradation is a pure function of (label map, settings, uid): the same noisy
label every epoch, in every worker and on every rerun (fixed noise, as in a
badly annotated dataset, not a per-epoch augmentation).

Objects are the 8-connected components of each class other than background
(class 0) and the ignore index; they are listed by class, then in raster order
of their first pixel, so the random draws of `void_part` are reproducible.

It lives in `ttdl.core` (not `ttdl.datasets`) because `core.data.split_of`
applies it and `core` imports no higher layer.
"""
from __future__ import annotations

import hashlib
import math

import numpy as np
from scipy import ndimage

KINDS = ("none", "box", "void_part")
_EIGHT = np.ones((3, 3), dtype=bool)


def rng_for(seed: int, uid: str) -> np.random.Generator:
    """A generator per (seed, image), independent of order, worker and epoch."""
    digest = hashlib.blake2b(f"degrade:{seed}:{uid}".encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def objects(label: np.ndarray, ignore_index: int, background: int = 0) -> list[tuple[int, np.ndarray]]:
    """(class, boolean mask) of every 8-connected object, by class then raster order."""
    found = []
    for cls in np.unique(label).tolist():
        if cls in (background, ignore_index):
            continue
        components, n = ndimage.label(label == cls, structure=_EIGHT)
        found += [(int(cls), components == k) for k in range(1, n + 1)]
    return found


def box_labels(label: np.ndarray, ignore_index: int) -> np.ndarray:
    """Each object becomes its bounding box: the weak 'box annotation' of detection datasets.

    Larger objects are drawn first so smaller ones (and, at equal size, later
    ones) stay visible on top; pixels void in the input stay void.
    """
    out = label.copy()
    found = objects(label, ignore_index)
    order = sorted(range(len(found)), key=lambda i: (-int(found[i][1].sum()), i))
    void = label == ignore_index
    for i in order:
        cls, mask = found[i]
        ys, xs = np.nonzero(mask)
        box = np.zeros_like(mask)
        box[ys.min():ys.max() + 1, xs.min():xs.max() + 1] = True
        out[box & ~void] = cls
    return out


def void_part_labels(label: np.ndarray, ignore_index: int, fraction: float,
                     rng: np.random.Generator) -> np.ndarray:
    """A random half-plane cut of each object, `fraction` of its pixels, becomes void.

    The cut is perpendicular to a random direction: the round(fraction * n)
    pixels furthest along it are voided (ties in raster order), so CE never sees
    that side of the object, while nothing it sees is wrong.
    """
    out = label.copy()
    for _, mask in objects(label, ignore_index):
        angle = rng.uniform(0.0, 2.0 * math.pi)  # one draw per object, also when nothing is voided
        count = round(fraction * int(mask.sum()))
        if count == 0:
            continue
        ys, xs = np.nonzero(mask)
        along = xs * math.cos(angle) + ys * math.sin(angle)
        far = np.argsort(-along, kind="stable")[:count]
        out[ys[far], xs[far]] = ignore_index
    return out


def degrade_label(label: np.ndarray, kind: str, *, fraction: float, seed: int, uid: str,
                  ignore_index: int) -> np.ndarray:
    """The degraded copy of one label map (class indices, `ignore_index` = void); `label` is not changed."""
    if kind == "none":
        return label.copy()
    if kind == "box":
        return box_labels(label, ignore_index)
    if kind == "void_part":
        return void_part_labels(label, ignore_index, fraction, rng_for(seed, uid))
    raise ValueError(f"unknown label degradation {kind!r}; expected one of {', '.join(KINDS)}")
