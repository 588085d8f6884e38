"""Deterministic rule-based describer: the offline default and the VLM-free baseline.

It measures, for one class, how the predicted mask departs from the ground truth
(missed parts, over-extensions, detached hallucinations, coarse boundaries,
confusion with other classes, a prediction shifted as a whole, and where each
error lies) and writes one to three sentences in the style a VLM is prompted for.
The wording varies with a generator seeded from (seed, key), so a given request
always gets the same text.

An error is placed by its *extent*, not its centroid: the share of the error in
each cell of a 3x3 grid (over the object's box for errors on the object, over
the image for detached errors and full misses) is matched against a fixed set
of named regions (a cell, a side, a half, a quarter, two or three edges, the
whole border, everything), so a ring of missing pixels reads "all around the
boundary" rather than "in the center" where its centroid happens to fall.

Settings (describer section; defaults in the config schema): seed picks the
wording; negligible_fraction: an error part smaller than this share of the
object (or of 1 % of the image when the object is tiny or absent) is ignored;
analysis_size: larger masks are downsampled (nearest) first; max_words caps the text.
"""
from __future__ import annotations

import random
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from ttdl.core.provenance import RULES_DESCRIBER_VERSION
from ttdl.core.settings import DescriberSettings
from ttdl.text.describers.base import DescriberStats, clean_answer
from ttdl.text.describers.prompt import SupportExample
from ttdl.text.describers.request import DescribeRequest
from ttdl.text.overlays import VOID, resize_for_describer

THIN_SHARE = 0.8  # an error part this much inside the boundary band is an edge error, not a shape error
FULL_MISS_TP = 0.05  # at most this share of the object found -> "missed entirely"
MIN_REF_FRACTION = 0.01  # tiny or absent objects: judge errors against 1 % of the image instead
SHIFT_MIN_PX = 2  # a 1 px translation is boundary noise; it reads as a coarse boundary
SHIFT_EXPLAINS = 0.35  # "shifted" needs moving the PR back to leave at most this share of its error ...
SHIFT_RESIDUAL = 0.25  # ... and at most this share of the object (a cut-off half plus a bump is no shift)
SLIGHT_SHIFT = 0.15  # a shift below this share of the object's size reads "slightly shifted"
RULES_VERSION = RULES_DESCRIBER_VERSION  # recorded in every cache's provenance (ttdl.core.provenance)
_EIGHT = np.ones((3, 3), dtype=bool)  # 8-connectivity


def negligible_area(object_area: int, valid_area: int, fraction: float) -> float:
    """Pixels an error needs to be mentioned: `fraction` of the object, or of 1 % of the valid image.

    The floor keeps a tiny (or absent) object from turning every stray pixel into an error.
    """
    return fraction * max(object_area, MIN_REF_FRACTION * max(1, valid_area))


# --- where: a 3x3 grid and the regions named on it ---------------------------------

CELLS = ("top_left", "top", "top_right", "left", "center", "right", "bottom_left", "bottom", "bottom_right")
WHOLE = "whole"  # location code of errors spread over the whole frame (a ring, everything)


def where_phrase(row: str, col: str) -> str:
    if row == "middle" and col == "center":
        return "in the center"
    if row == "middle":
        return f"on the {col}"
    if col == "center":
        return f"at the {row}"
    return f"at the {row} {col}"


@dataclass(frozen=True)
class Region:
    """A named set of grid cells (0..8, row-major), its location code and its phrase in each frame."""

    name: str
    cells: frozenset[int]
    code: str  # one of CELLS or WHOLE
    on_object: str
    in_image: str


def _build_regions() -> tuple[Region, ...]:
    """Fewest cells first, so the first best match (argmax) wins a tie with a larger region."""
    rows, cols = ("top", "middle", "bottom"), ("left", "center", "right")
    out = []
    for i, code in enumerate(CELLS):
        phrase = where_phrase(rows[i // 3], cols[i % 3])
        out.append(Region(code, frozenset({i}), code, phrase, phrase))
    sides = {"left": frozenset({0, 3, 6}), "top": frozenset({0, 1, 2}), "right": frozenset({2, 5, 8}),
             "bottom": frozenset({6, 7, 8})}
    opposite = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
    corners = [(v, h) for v in ("top", "bottom") for h in ("left", "right")]
    for s, cells in sides.items():
        noun = "side" if s in ("left", "right") else "edge"
        out.append(Region(f"{s}_side", cells, s, f"along the {s} {noun}", f"along the {s} {noun} of the image"))
    for name, cells, way in (("middle_row", {3, 4, 5}, "across"), ("middle_column", {1, 4, 7}, "down")):
        out.append(Region(name, frozenset(cells), "center", f"{way} the middle", f"{way} the middle of the image"))
    for v, h in corners:  # 2x2 cells around a corner
        cells = frozenset(range(9)) - sides[opposite[v]] - sides[opposite[h]]
        out.append(Region(f"{v}_{h}_quarter", cells, f"{v}_{h}", f"toward the {v} {h}",
                          f"toward the {v} {h} of the image"))
    for v, h in corners:  # two edges meeting at a corner
        out.append(Region(f"{h}_{v}_edges", sides[h] | sides[v], f"{v}_{h}", f"on the {h} and {v} edges",
                          f"along the {h} and {v} edges of the image"))
    for s in sides:
        out.append(Region(f"{s}_half", frozenset(range(9)) - sides[opposite[s]], s, f"on the {s} half",
                          f"in the {s} half of the image"))
    for open_side in ("bottom", "top", "right", "left"):  # three edges; named by the side they close on
        closed = [s for s in sides if s != open_side]
        words = f"{closed[0]}, {closed[1]} and {closed[2]}"
        out.append(Region(f"open_{open_side}", frozenset().union(*(sides[s] for s in closed)), opposite[open_side],
                          f"on the {words} edges", f"along the {words} edges of the image"))
    out.append(Region("ring", frozenset(range(9)) - {4}, WHOLE, "all around the boundary", "around the image border"))
    out.append(Region("whole", frozenset(range(9)), WHOLE, "throughout the object", "across the whole image"))
    return tuple(out)


REGIONS = _build_regions()
_SPREAD = np.array([[1.0 / len(r.cells) if i in r.cells else 0.0 for i in range(9)] for r in REGIONS])


@dataclass(frozen=True)
class Extent:
    """Where an error lies: its share in each of the 9 grid cells (row-major) and the region that names it."""

    shares: tuple[float, ...]
    region: Region
    in_image: bool  # the frame: the image, or the object's box

    @property
    def where(self) -> str:
        return self.region.in_image if self.in_image else self.region.on_object

    @property
    def code(self) -> str:
        return self.region.code


def name_extents(counts: np.ndarray, in_image: bool) -> list[Extent]:
    """The region that best matches each row of per-cell pixel counts [n, 9].

    The match is the histogram intersection of the error's cell shares with a
    uniform spread over the region's cells: a region scores high when its
    cells hold most of the error and none of them is nearly empty, so a strip
    down the left side beats both its middle cell and the whole left half.
    """
    counts = np.asarray(counts, dtype=np.float64).reshape(-1, 9)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
    best = np.minimum(shares[:, None, :], _SPREAD[None]).sum(axis=2).argmax(axis=1)
    return [Extent(tuple(row), REGIONS[k], in_image) for row, k in zip(shares.tolist(), best.tolist())]


Frame = tuple[int, int, int, int]  # (top, left, height, width) of the box a grid divides in thirds


def cells_of(ys: np.ndarray, xs: np.ndarray, frame: Frame) -> np.ndarray:
    """Grid cell (0..8) of pixels; pixels outside the box fall into its nearest border cell."""
    y0, x0, fh, fw = frame
    row = np.minimum(np.maximum(((ys - y0) * 6 + 3) // (2 * fh), 0), 2)  # floor((y - y0 + 0.5) * 3 / fh), exact
    col = np.minimum(np.maximum(((xs - x0) * 6 + 3) // (2 * fw), 0), 2)
    return row * 3 + col


def cell_counts(mask: np.ndarray, frame: Frame) -> np.ndarray:
    """Pixels of `mask` in each grid cell of `frame`, [9]."""
    ys, xs = np.nonzero(mask)
    return np.bincount(cells_of(ys, xs, frame), minlength=9)


def bounding_frame(mask: np.ndarray) -> Frame:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(cols[0]), int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)


# --- image measurements ---------------------------------------------------------

def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected component labels (1..n, 0 = background) and n.

    Components are numbered in raster order of their first pixel (scipy's
    two-pass labelling in C; the order matters, since it breaks ties between
    equally large error parts when they are worded).
    """
    mask = np.asarray(mask, dtype=bool)
    labels, n = ndimage.label(mask, structure=_EIGHT)
    return labels.astype(np.int32, copy=False), int(n)


@dataclass
class Components:
    """The connected parts of one error mask, measured all at once (one pass of bincounts, no per-part masks)."""

    labels: np.ndarray  # [H,W] 0 = none, 1..n
    n: int
    area: np.ndarray  # [n+1] pixels per part (index 0 unused)
    in_band: np.ndarray  # [n+1] pixels of each part inside the boundary band
    touches: np.ndarray  # [n+1] whether a part touches the halo around the object
    on_object: np.ndarray  # [n+1, 9] pixels of each part per cell of the object's grid
    in_image: np.ndarray | None  # [n+1, 9] the same over the image's grid (None when not asked for)

    @classmethod
    def measure(cls, mask: np.ndarray, band: np.ndarray, halo: np.ndarray, box: Frame,
                in_image: bool = True) -> "Components":
        labels, n = label_components(mask)
        size = n + 1
        flat = labels.ravel()
        idx = np.flatnonzero(flat)  # error pixels are few: measure only them
        lab = flat[idx]
        area = np.bincount(lab, minlength=size)
        ys, xs = np.divmod(idx, labels.shape[1])
        in_band = np.bincount(lab[band.ravel()[idx]], minlength=size)
        touches = np.bincount(lab[halo.ravel()[idx]], minlength=size) > 0
        frames = (box, (0, 0, *labels.shape)) if in_image else (box,)
        grids = [np.bincount(lab * 9 + cells_of(ys, xs, frame), minlength=size * 9).reshape(size, 9)
                 for frame in frames]
        return cls(labels, n, area, in_band, touches, grids[0], grids[-1] if in_image else None)


def dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """Square (2r+1) dilation; outside the image counts as empty (separable shifted ORs, no padding copies)."""
    if r <= 0:
        return mask.copy()
    rows = mask.copy()
    for d in range(1, r + 1):
        rows[:, d:] |= mask[:, :-d]
        rows[:, :-d] |= mask[:, d:]
    out = rows.copy()
    for d in range(1, r + 1):
        out[d:, :] |= rows[:-d, :]
        out[:-d, :] |= rows[d:, :]
    return out


def erode(mask: np.ndarray, r: int) -> np.ndarray:
    """Square erosion; the image border is not an object edge, so it does not erode."""
    return ~dilate(~mask, r)


def translate(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """`mask` moved by (dy, dx); what leaves the array is lost, what enters is empty."""
    h, w = mask.shape
    out = np.zeros_like(mask)
    if abs(dy) < h and abs(dx) < w:
        out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = mask[max(-dy, 0):h - max(dy, 0),
                                                                          max(-dx, 0):w - max(dx, 0)]
    return out


def find_shift(g: np.ndarray, p: np.ndarray, threshold: float) -> tuple[int, int] | None:
    """The translation (dy, dx) that carries the GT onto the PR, when one explains most of the error.

    A shifted mask leaves missed pixels on one side and extra ones on the
    opposite side; described part by part that reads as two unrelated errors
    and loses the direction. The centroid difference proposes the translation
    (its 8 neighbours are tried too when it is a near miss, against rounding
    and small extra errors); it is accepted when moving the PR back leaves
    little of the error (SHIFT_EXPLAINS) and little next to the object
    (SHIFT_RESIDUAL). Both the missed and the extra side must be above `threshold`.
    """
    y0, x0, hh, ww = bounding_frame(g | p)  # nothing outside the box of both masks can change
    gc, pc = g[y0:y0 + hh, x0:x0 + ww], p[y0:y0 + hh, x0:x0 + ww]
    fn, fp = int(np.count_nonzero(gc & ~pc)), int(np.count_nonzero(pc & ~gc))
    if min(fn, fp) < max(threshold, 1.0):
        return None
    (gy, gx, g_area), (py, px, _) = _centroid(gc), _centroid(pc)
    ty, tx = round(py - gy), round(px - gx)
    if max(abs(ty), abs(tx)) < SHIFT_MIN_PX - 1:
        return None
    reach = max(abs(ty), abs(tx)) + 1  # pad the box by the largest move tried
    y0, x0 = max(0, y0 - reach), max(0, x0 - reach)
    gc, pc = g[y0:y0 + hh + 2 * reach, x0:x0 + ww + 2 * reach], p[y0:y0 + hh + 2 * reach, x0:x0 + ww + 2 * reach]
    limit = min(SHIFT_EXPLAINS * (fn + fp), SHIFT_RESIDUAL * g_area)
    best, best_t = None, (0, 0)
    candidates = [(ty, tx)] + [(ty + a, tx + b) for a in (-1, 0, 1) for b in (-1, 0, 1) if a or b]
    for k, (dy, dx) in enumerate(candidates):
        if max(abs(dy), abs(dx)) < SHIFT_MIN_PX:
            continue
        residual = int(np.count_nonzero(gc ^ translate(pc, -dy, -dx)))
        if best is None or residual < best:
            best, best_t = residual, (dy, dx)
        if k == 0 and not limit < residual <= 2 * limit:  # clearly a shift, or clearly none
            break
    return best_t if best is not None and best <= limit else None


def _centroid(mask: np.ndarray) -> tuple[float, float, int]:
    """(mean row, mean column, pixels) from the row and column counts, without listing the pixels."""
    rows, cols = np.count_nonzero(mask, axis=1), np.count_nonzero(mask, axis=0)
    n = int(rows.sum())
    return float(rows @ np.arange(rows.size)) / n, float(cols @ np.arange(cols.size)) / n, n


_DIRECTIONS = {"up": "upward", "down": "downward", "left": "to the left", "right": "to the right",
               "up_left": "up and to the left", "up_right": "up and to the right",
               "down_left": "down and to the left", "down_right": "down and to the right"}
SHIFT_CODES = {"up": "top", "down": "bottom", "left": "left", "right": "right", "up_left": "top_left",
               "up_right": "top_right", "down_left": "bottom_left", "down_right": "bottom_right"}


def shift_direction(dy: int, dx: int) -> str:
    """The direction key (of SHIFT_CODES); diagonal when the smaller component is at least half the larger."""
    vert, horiz = ("up" if dy < 0 else "down"), ("left" if dx < 0 else "right")
    if abs(dy) < 0.5 * abs(dx):
        return horiz
    if abs(dx) < 0.5 * abs(dy):
        return vert
    return f"{vert}_{horiz}"


# --- diagnosis -------------------------------------------------------------------

@dataclass
class Diagnosis:
    """What is wrong with one class's prediction, before any wording is chosen.

    The `*_where` phrases are what `render` words; the `*_extents` behind them
    (cell shares, region, location code) and the `*_area` pixel counts let
    other code (diagnosis_code) reuse the same measurement without parsing text.
    """

    fully_missed: bool = False
    missed_where: list[str] = field(default_factory=list)  # image location (full miss) or on-object
    missed_share: float = 0.0  # share of the object in thick missing parts (or missing because of a shift)
    missed_as: str | None = None  # class the PR assigned to the missed pixels
    over_where: list[str] = field(default_factory=list)
    hallucinated: list[tuple[str, str]] = field(default_factory=list)  # (where, size word)
    boundary: str | None = None  # "coarse" | "tight" | "loose"
    shift: str | None = None  # the whole prediction moved: "right", "up", "down_left", ... (see SHIFT_CODES)
    shift_px: tuple[int, int] = (0, 0)  # (dy, dx) that carries the GT onto the PR
    shift_size: float = 0.0  # the shift as a share of the object's height / width
    missed_extents: list[Extent] = field(default_factory=list)  # parallel to missed_where
    over_extents: list[Extent] = field(default_factory=list)  # parallel to over_where
    halluc_extents: list[Extent] = field(default_factory=list)  # parallel to hallucinated
    boundary_extent: Extent | None = None
    missed_area: int = 0  # pixels behind each kind of error, to rank them
    over_area: int = 0
    halluc_area: int = 0
    boundary_area: int = 0

    @property
    def significant(self) -> bool:
        return bool(self.fully_missed or self.missed_where or self.over_where or self.hallucinated or self.boundary
                    or self.shift)


def is_background(name: str) -> bool:
    return name.strip().lower() in {"background", "bg", "__background__", "_background_"}


def _majority(values: np.ndarray, exclude: int) -> tuple[int | None, float]:
    values = values[(values != exclude) & (values != VOID)]
    if values.size == 0:
        return None, 0.0
    ids, counts = np.unique(values, return_counts=True)
    k = int(np.argmax(counts))
    return int(ids[k]), float(counts[k]) / float(values.size)


def _first_unique(extents: list[Extent], limit: int) -> list[Extent]:
    """Extents in order, one per phrase, at most `limit`."""
    out: list[Extent] = []
    for e in extents:
        if all(e.where != o.where for o in out):
            out.append(e)
    return out[:limit]


def _located(parts: list[tuple[int, int]], counts: np.ndarray, in_image: bool, limit: int) -> list[Extent]:
    """Extents of the parts (area, label) largest first; three or more parts are placed together.

    One or two parts are named one by one ("on the left and at the top right");
    more would crowd the sentence, so their union is located as a whole, which
    also lets scattered pieces of a ring read "all around the boundary".
    """
    if len(parts) >= 3:
        return name_extents(counts[[i for _, i in parts]].sum(axis=0), in_image)
    return _first_unique(name_extents(counts[[i for _, i in parts]], in_image), limit)


def analyse(
    gt: np.ndarray, pr: np.ndarray, class_index: int, class_names: list[str], negligible_fraction: float
) -> Diagnosis:
    """Measure the errors of class `class_index` between GT and PR (void pixels ignored).

    Each error mask (missed, spurious) is split into 8-connected parts measured
    in one pass (`Components`); a part is an edge error when most of it lies in
    the boundary band, is ignored below the negligible size, and is otherwise
    located by its extent on the object's grid (missing parts, over-extensions
    touching the object) or the image's grid (detached hallucinations). Before
    that, a prediction that is the object moved as a whole (`find_shift`) is
    reported as one shift, with the side left missing and the side overshot;
    it replaces the part-by-part missing, over-extension and boundary findings.
    """
    gt, pr = np.asarray(gt), np.asarray(pr)
    h, w = gt.shape
    valid = gt != VOID
    g = (gt == class_index) & valid
    p = (pr == class_index) & valid
    g_area = int(g.sum())
    valid_area = max(1, int(valid.sum()))
    threshold = negligible_area(g_area, valid_area, negligible_fraction)
    fn, fp = g & ~p, p & ~g
    diag = Diagnosis()

    def name_of(k: int | None) -> str | None:
        return class_names[k] if k is not None and 0 <= k < len(class_names) else None

    r = max(1, round(0.015 * min(h, w)))
    band = dilate(g, r) & ~erode(g, r) if g_area else np.zeros_like(g)
    halo = dilate(g, 1)
    image: Frame = (0, 0, h, w)
    box = bounding_frame(g) if g_area else image
    diag.fully_missed = bool(g_area and int((g & p).sum()) <= FULL_MISS_TP * g_area)
    on_object = bool(g_area) and not diag.fully_missed  # a missed object cannot over-extend: that is a misplacement

    parts_fp = Components.measure(fp, band, halo, box)
    attached = parts_fp.touches & on_object
    thin_cells = np.zeros(9, dtype=np.int64)
    thin_fn = thin_fp = 0
    over, halluc = [], []
    for i in range(1, parts_fp.n + 1):
        area = int(parts_fp.area[i])
        if attached[i] and parts_fp.in_band[i] >= THIN_SHARE * area:
            thin_fp += area
            thin_cells += parts_fp.on_object[i]
        elif area < threshold:
            continue
        elif attached[i]:
            over.append((area, i))
        else:
            halluc.append((area, i))
    halluc.sort(key=lambda t: -t[0])
    for (area, _), ext in zip(halluc, name_extents(parts_fp.in_image[[i for _, i in halluc]], True)):
        if all(ext.where != e.where for e in diag.halluc_extents) and len(diag.halluc_extents) < 3:
            share = area / valid_area
            diag.halluc_extents.append(ext)
            diag.hallucinated.append((ext.where, "small" if share < 0.02 else "sizeable" if share < 0.1 else "large"))
    diag.halluc_area = sum(a for a, _ in halluc)

    if diag.fully_missed:
        diag.missed_extents = name_extents(cell_counts(g, image), True)
        diag.missed_where = [diag.missed_extents[0].where]
        diag.missed_area, diag.missed_share = g_area, 1.0
        k, _ = _majority(pr[g], class_index)
        diag.missed_as = name_of(k)
        return diag
    if not g_area:
        return diag

    detached = (parts_fp.labels > 0) & ~attached[parts_fp.labels]
    p_att = p & ~detached  # hallucinations elsewhere do not move the object
    shift = find_shift(g, p_att, threshold)
    if shift is not None:
        # the sides are what the move explains (a strip left behind, one gained), not holes that came with it
        moved = translate(g, *shift)
        missed, extra = fn & ~moved, p_att & ~g & moved
        missed, extra = (missed if missed.any() else fn), (extra if extra.any() else p_att & ~g)
        diag.shift, diag.shift_px = shift_direction(*shift), shift
        diag.shift_size = max(abs(shift[0]) / box[2], abs(shift[1]) / box[3])
        diag.missed_extents = name_extents(cell_counts(missed, box), False)
        diag.over_extents = name_extents(cell_counts(extra, box), False)
        diag.missed_where, diag.over_where = [diag.missed_extents[0].where], [diag.over_extents[0].where]
        diag.missed_area, diag.over_area = int(missed.sum()), int(extra.sum())
        diag.missed_share = diag.missed_area / g_area
        return diag

    parts_fn = Components.measure(fn, band, halo, box, in_image=False)  # missing parts are placed on the object
    parts = []
    for i in range(1, parts_fn.n + 1):
        area = int(parts_fn.area[i])
        if parts_fn.in_band[i] >= THIN_SHARE * area:
            thin_fn += area
            thin_cells += parts_fn.on_object[i]
        elif area >= threshold:
            parts.append((area, i))
    parts.sort(key=lambda t: -t[0])
    if parts:
        missing = np.isin(parts_fn.labels, [i for _, i in parts])
        diag.missed_area = sum(a for a, _ in parts)
        diag.missed_share = diag.missed_area / g_area
        diag.missed_extents = _located(parts, parts_fn.on_object, False, 2)
        diag.missed_where = [e.where for e in diag.missed_extents]
        k, share = _majority(pr[missing], class_index)
        if k is not None and share >= 0.5 and not is_background(name_of(k) or "background"):
            diag.missed_as = name_of(k)
    over.sort(key=lambda t: -t[0])
    if over:
        diag.over_area = sum(a for a, _ in over)
        diag.over_extents = _located(over, parts_fp.on_object, False, 2)
        diag.over_where = [e.where for e in diag.over_extents]

    thin = thin_fn + thin_fp
    if thin >= threshold and thin > 0:
        diag.boundary = "tight" if thin_fn >= 0.75 * thin else "loose" if thin_fp >= 0.75 * thin else "coarse"
        diag.boundary_extent = name_extents(thin_cells, False)[0]
        diag.boundary_area = thin
    return diag


# --- wording -----------------------------------------------------------------------
# Every phrasing of a kind carries that kind's key word (missed, incomplete,
# over-extend, hallucinated, coarse, shifted), so texts stay comparable across variants.

PHRASES: dict[str, list[str]] = {
    "none": [
        "The prediction of the {C} region matches the ground truth; there is no significant deviation.",
        "There is no significant deviation: the {C} region is predicted correctly.",
        "The {C} region is segmented accurately, with no significant deviation from the ground truth.",
    ],
    "missed": [
        "The {C} region {where} was missed entirely{as_}.",
        "The prediction missed the whole {C} region {where}{as_}.",
        "The {C} object {where} is missed entirely by the prediction{as_}.",
    ],
    "missed_as": [" and predicted as {O} instead", "; it was confused with {O}", ", mistaken for {O}"],
    "missed_as_bg": [" and left as background", "; it was predicted as background"],
    "incomplete": [
        "The prediction of the {C} region is incomplete {where}{as_}.",
        "The {C} region is incomplete {where}: {share} of it is missing{as_}.",
        "The predicted {C} region is incomplete, missing {share} of the object {where}{as_}.",
    ],
    "incomplete_as": [", where it was confused with {O}", ", where {O} was predicted instead"],
    "over": [
        "the {C} region over-extends {where}",
        "the predicted {C} region is over-extended {where}, beyond the true outline",
        "the {C} prediction over-extends past the object {where}",
    ],
    "shifted": [
        "The {C} region is {slightly}shifted {dir}: missing {part} {mw}, extra {ow}.",
        "The predicted {C} region is {slightly}shifted {dir}, so it is incomplete {mw} and over-extends {ow}.",
        "The {C} prediction is {slightly}shifted {dir}: {part} {mw} is missing and the prediction spills past "
        "the object {ow}.",
    ],
    "halluc_one": [
        "a spurious {C} region was hallucinated {where}",
        "a {size} {C} region was hallucinated {where}",
        "the prediction hallucinated a {size} spurious {C} region {where}",
    ],
    "halluc_many": [
        "{n} spurious {C} regions were hallucinated, {where}",
        "the prediction hallucinated {n} separate {C} regions, {where}",
    ],
    "coarse": [
        "The boundary of the {C} region is coarse and ragged.",
        "The {C} outline is coarse, with ragged edges.",
        "The edges of the {C} region are ragged and coarse.",
    ],
    "tight": [
        "The {C} boundary is coarse and falls just inside the true outline.",
        "The {C} region is slightly too tight, with a coarse boundary.",
    ],
    "loose": [
        "The {C} boundary is coarse and bleeds just past the true outline.",
        "The {C} region is slightly too loose, with a coarse boundary.",
    ],
}

_SHARES = ((0.25, "a small part"), (0.4, "a sizeable part"), (0.6, "about half"), (1.01, "most"))
_NUMBERS = {2: "two", 3: "three"}


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _share_word(share: float) -> str:
    return next(word for limit, word in _SHARES if share < limit)


def render(diag: Diagnosis, class_name: str, rng: random.Random) -> str:
    """One to three sentences: missing part (or shift), spurious parts, boundary (in that order)."""
    c = class_name.upper()
    pick = lambda kind: rng.choice(PHRASES[kind])  # noqa: E731
    if not diag.significant:
        return pick("none").format(C=c)
    sentences: list[str] = []
    if diag.shift:
        slight = diag.shift_size < SLIGHT_SHIFT
        part = "a strip" if slight else _share_word(diag.missed_share) + " of it"
        sentences.append(pick("shifted").format(
            C=c, slightly="slightly " if slight else "", dir=_DIRECTIONS[diag.shift], part=part,
            mw=diag.missed_where[0], ow=diag.over_where[0]))
    elif diag.fully_missed:
        other = diag.missed_as
        phrase = "missed_as_bg" if other is not None and is_background(other) else "missed_as"
        as_ = "" if other is None else pick(phrase).format(O=other.upper())
        sentences.append(pick("missed").format(C=c, where=diag.missed_where[0], as_=as_))
    elif diag.missed_where:
        share = _share_word(diag.missed_share)
        as_ = "" if diag.missed_as is None else pick("incomplete_as").format(O=diag.missed_as.upper())
        sentences.append(pick("incomplete").format(C=c, where=_and(diag.missed_where), share=share, as_=as_))
    clauses = []
    if diag.over_where and not diag.shift:
        clauses.append(pick("over").format(C=c, where=_and(diag.over_where)))
    if len(diag.hallucinated) == 1:
        where, size = diag.hallucinated[0]
        clauses.append(pick("halluc_one").format(C=c, where=where, size=size))
    elif diag.hallucinated:
        n = _NUMBERS.get(len(diag.hallucinated), str(len(diag.hallucinated)))
        clauses.append(pick("halluc_many").format(C=c, n=n, where=_and([w for w, _ in diag.hallucinated])))
    if clauses:
        spurious = rng.choice([" and ", "; "]).join(clauses) + "."
        if sentences and rng.random() < 0.5:
            sentences[-1] = sentences[-1][:-1] + "; " + spurious
        else:
            sentences.append(_cap(spurious))
    if diag.boundary:
        sentences.append(pick(diag.boundary).format(C=c))
    return " ".join(sentences[:3])


def analyse_request(req: DescribeRequest, negligible_fraction: float, analysis_size: int,
                    class_names: list[str] | None = None) -> Diagnosis:
    """`analyse` on a request, downsampled (nearest) to at most `analysis_size`: the one entry for every user."""
    gt, pr = req.gt, req.pr
    h, w = gt.shape[-2:]
    if max(h, w) > analysis_size:
        s = analysis_size / max(h, w)
        size = (max(1, round(h * s)), max(1, round(w * s)))
        _, gt, pr = resize_for_describer(req.image, gt, pr, size)
    names = list(req.class_names) or list(class_names or [])
    return analyse(gt.cpu().numpy(), pr.cpu().numpy(), req.class_index, names, negligible_fraction)


class RulesDescriber:
    """Describes by measuring the masks; needs no server, so it is also the CPU/CI default."""

    backend = "rules"

    def __init__(self, cfg: DescriberSettings, class_names: list[str], support: SupportExample | None = None,
                 template: dict | None = None):
        self.class_names = list(class_names)
        self.seed = cfg.seed
        self.negligible_fraction = cfg.negligible_fraction
        self.analysis_size = cfg.analysis_size
        self.max_words = cfg.max_words
        self.stats = DescriberStats()

    def describe(self, requests: list[DescribeRequest]) -> list[str | None]:
        out = []
        for req in requests:
            start = time.monotonic()
            text = self.describe_one(req)
            self.stats.add_request(time.monotonic() - start, malformed=int(text is None))
            out.append(text)
        return out

    def submit(self, requests: list[DescribeRequest]) -> list[Future]:
        """The `Describer` interface's non-blocking form; in-process, so the answers are done at return."""
        futures = []
        for text in self.describe(requests):
            future: Future = Future()
            future.set_result(text)
            futures.append(future)
        return futures

    def describe_one(self, req: DescribeRequest) -> str | None:
        diag = analyse_request(req, self.negligible_fraction, self.analysis_size, self.class_names)
        rng = random.Random(f"{self.seed}:{req.key}")
        return clean_answer(render(diag, req.class_name, rng), self.max_words)

    def close(self) -> None:
        pass
