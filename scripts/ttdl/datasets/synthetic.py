"""Deterministic generator of the embedded default dataset.

Writes a small multi-class segmentation set in Pascal VOC's layout
(JPEGImages/, SegmentationClass/ palette PNGs, ImageSets/Segmentation/*.txt)
so that the very same loader reads real VOC later. Every image is drawn from
its own RNG seeded by (seed, index): regenerating gives identical files.

The scenes are made to produce *describable* errors: shapes differ in
outline, texture and colour but overlap in colour, occlude each other, sit on
textured backgrounds with clutter, and some boundaries carry the void label.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ttdl.core.io import atomic_path, write_text
from ttdl.core.palette import voc_palette
from ttdl.core.settings import SyntheticData

CLASS_NAMES = ["background", "circle", "square", "triangle", "ring", "star", "cross"]
VOID = 255


@dataclass(frozen=True)
class SyntheticSpec:
    """What to generate: the `data.synthetic` settings (defaults in the schema) plus two fixed
    properties of the scenes that are not configurable."""

    num_train: int
    num_val: int
    image_size: int
    seed: int
    max_objects: int = 4
    void_boundary_prob: float = 0.5

    @classmethod
    def from_settings(cls, settings: SyntheticData) -> "SyntheticSpec":
        return cls(num_train=settings.num_train, num_val=settings.num_val, image_size=settings.image_size,
                   seed=settings.seed)


# ---- shapes: boolean masks on a coordinate grid -------------------------------

def _polygon(xx: np.ndarray, yy: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test, vectorised over the grid."""
    inside = np.zeros(xx.shape, dtype=bool)
    x0, y0 = pts[-1]
    for x1, y1 in pts:
        crosses = (y1 > yy) != (y0 > yy)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = (x0 - x1) * (yy - y1) / (y0 - y1) + x1
        inside ^= crosses & (xx < x_at)
        x0, y0 = x1, y1
    return inside


def _rotate(pts: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return pts @ np.array([[c, s], [-s, c]])


def _shape_mask(name: str, xx, yy, cx, cy, r, angle) -> np.ndarray:
    dx, dy = xx - cx, yy - cy
    if name == "circle":
        return dx**2 + dy**2 <= r**2
    if name == "ring":
        d2 = dx**2 + dy**2
        return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
    if name == "square":
        pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * r * 0.8
    elif name == "triangle":
        pts = np.array([[math.cos(a), math.sin(a)] for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]) * r
    elif name == "star":
        pts = np.array([
            [math.cos(-math.pi / 2 + k * math.pi / 5) * (r if k % 2 == 0 else 0.45 * r),
             math.sin(-math.pi / 2 + k * math.pi / 5) * (r if k % 2 == 0 else 0.45 * r)]
            for k in range(10)
        ])
    elif name == "cross":
        a, b = r, 0.33 * r
        pts = np.array([[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b], [b, a], [-b, a],
                        [-b, b], [-a, b], [-a, -b], [-b, -b]])
    else:
        raise ValueError(f"unknown shape {name!r}")
    pts = _rotate(pts, angle) + np.array([cx, cy])
    return _polygon(xx, yy, pts)


# ---- textures: per-class appearance --------------------------------------------

# base colour per class (RGB in [0,1]); neighbours in colour space overlap on purpose
_BASE_COLOURS = {
    "circle": (0.85, 0.25, 0.2), "square": (0.2, 0.45, 0.85), "triangle": (0.9, 0.75, 0.15),
    "ring": (0.75, 0.3, 0.65), "star": (0.95, 0.55, 0.2), "cross": (0.25, 0.7, 0.35),
}


def _texture(name: str, xx, yy, rng: np.random.Generator) -> np.ndarray:
    base = np.clip(np.array(_BASE_COLOURS[name]) + rng.normal(0, 0.12, 3), 0, 1)
    phase, freq = rng.uniform(0, 2 * math.pi), rng.uniform(0.35, 0.6)
    if name == "square":      # horizontal stripes
        pattern = 0.5 + 0.5 * np.sign(np.sin(yy * freq + phase))
    elif name == "triangle":  # checkerboard
        pattern = ((np.floor(xx * freq / 2) + np.floor(yy * freq / 2)) % 2).astype(float)
    elif name == "cross":     # diagonal stripes
        pattern = 0.5 + 0.5 * np.sign(np.sin((xx + yy) * freq * 0.7 + phase))
    elif name == "ring":      # dots
        pattern = ((np.sin(xx * freq * 1.5) * np.sin(yy * freq * 1.5)) > 0.3).astype(float)
    elif name == "star":      # radial gradient
        pattern = (np.sin(np.hypot(xx, yy) * freq * 0.5 + phase) + 1) / 2
    else:                     # circle: smooth shading
        pattern = (xx - xx.min()) / max(float(xx.max() - xx.min()), 1.0)
    shade = 0.65 + 0.35 * pattern
    return base[None, None, :] * shade[..., None]


def _background(size: int, rng: np.random.Generator, xx, yy) -> np.ndarray:
    img = np.zeros((size, size, 3))
    for _ in range(3):
        fx, fy = rng.uniform(0.01, 0.08, 2)
        img += rng.uniform(0.05, 0.2, 3)[None, None, :] * (
            1 + np.sin(xx * fx * 2 * math.pi / 4 + yy * fy + rng.uniform(0, 6))
        )[..., None]
    img = img / img.max() * rng.uniform(0.35, 0.7)
    # clutter: thin lines and small blobs that belong to the background
    for _ in range(rng.integers(2, 6)):
        colour = rng.uniform(0, 1, 3)
        if rng.random() < 0.5:
            a, b, c = rng.normal(size=3)
            line = np.abs(a * (xx - size / 2) + b * (yy - size / 2) + c * size / 4) / math.hypot(a, b) < 0.8
            img[line] = colour
        else:
            cx, cy = rng.uniform(0, size, 2)
            blob = ((xx - cx) / rng.uniform(2, 6)) ** 2 + ((yy - cy) / rng.uniform(2, 6)) ** 2 <= 1
            img[blob] = colour
    return img


def render_sample(index: int, spec: SyntheticSpec) -> tuple[np.ndarray, np.ndarray]:
    """Return (uint8 image HxWx3, uint8 label HxW) for one sample."""
    rng = np.random.default_rng([spec.seed, index])
    size = spec.image_size
    yy, xx = np.mgrid[0:size, 0:size].astype(float)
    img = _background(size, rng, xx, yy)
    label = np.zeros((size, size), dtype=np.uint8)
    for _ in range(rng.integers(1, spec.max_objects + 1)):
        cls = int(rng.integers(1, len(CLASS_NAMES)))
        name = CLASS_NAMES[cls]
        r = rng.uniform(0.1, 0.3) * size
        cx, cy = rng.uniform(0.1 * size, 0.9 * size, 2)
        mask = _shape_mask(name, xx, yy, cx, cy, r, rng.uniform(0, 2 * math.pi))
        if mask.sum() < 20:
            continue
        img[mask] = _texture(name, xx, yy, rng)[mask]
        label[mask] = cls  # later objects occlude earlier ones
    while not label.any():  # every draw was too small: place one object that fits
        cls = int(rng.integers(1, len(CLASS_NAMES)))
        cx, cy = rng.uniform(0.3 * size, 0.7 * size, 2)
        mask = _shape_mask(CLASS_NAMES[cls], xx, yy, cx, cy, rng.uniform(0.2, 0.3) * size, rng.uniform(0, 2 * math.pi))
        img[mask] = _texture(CLASS_NAMES[cls], xx, yy, rng)[mask]
        label[mask] = cls
    img = np.clip(img + rng.normal(0, 0.03, img.shape), 0, 1)
    if rng.random() < spec.void_boundary_prob:
        voided = _void_boundaries(label)
        if ((voided != 0) & (voided != VOID)).any():  # never void away every object pixel
            label = voided
    return (img * 255).round().astype(np.uint8), label


def _void_boundaries(label: np.ndarray) -> np.ndarray:
    """Mark a one-pixel band on the object side of class boundaries as void, as VOC does."""
    edge = np.zeros_like(label, dtype=bool)
    edge[1:, :] |= label[1:, :] != label[:-1, :]
    edge[:-1, :] |= label[:-1, :] != label[1:, :]
    edge[:, 1:] |= label[:, 1:] != label[:, :-1]
    edge[:, :-1] |= label[:, :-1] != label[:, 1:]
    out = label.copy()
    out[edge & (label != 0)] = VOID
    return out


def generate(root: str | Path, spec: SyntheticSpec, progress=None) -> dict:
    """Write the dataset under `root`; returns counts. Each file is written atomically."""
    root = Path(root)
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (root / "SegmentationClass").mkdir(parents=True, exist_ok=True)
    palette = voc_palette()
    splits = {"train": [], "val": []}
    total = spec.num_train + spec.num_val
    indices = range(total) if progress is None else progress(range(total))
    for index in indices:
        uid = f"syn_{index:05d}"
        splits["train" if index < spec.num_train else "val"].append(uid)
        image, label = render_sample(index, spec)
        with atomic_path(root / "JPEGImages" / f"{uid}.jpg") as tmp:
            Image.fromarray(image).save(tmp, format="JPEG", quality=92)
        png = Image.frombytes("P", (label.shape[1], label.shape[0]), label.tobytes())
        png.putpalette(palette)
        with atomic_path(root / "SegmentationClass" / f"{uid}.png") as tmp:
            png.save(tmp, format="PNG")
    for split, uids in splits.items():
        write_text(root / "ImageSets" / "Segmentation" / f"{split}.txt", "\n".join(uids) + "\n")
    write_text(root / "classes.txt", "\n".join(CLASS_NAMES) + "\n")
    return {split: len(uids) for split, uids in splits.items()}
