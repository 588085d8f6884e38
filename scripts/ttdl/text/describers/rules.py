"""Deterministic rule-based describer: the offline default and the VLM-free baseline.

It measures, for one class, how the predicted mask departs from the ground truth
(missed parts, over-extensions, detached hallucinations, coarse boundaries,
confusion with other classes, and where each error lies) and writes one to
three sentences in the style a VLM is prompted for. The wording varies with a
generator seeded from (seed, key), so a given request always gets the same text.

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

from ttdl.core.settings import DescriberSettings
from ttdl.text.describers.base import DescriberStats, clean_answer
from ttdl.text.describers.prompt import SupportExample
from ttdl.text.describers.request import DescribeRequest
from ttdl.text.overlays import VOID, resize_for_describer

THIN_SHARE = 0.8  # an error part this much inside the boundary band is an edge error, not a shape error
FULL_MISS_TP = 0.05  # at most this share of the object found -> "missed entirely"
MIN_REF_FRACTION = 0.01  # tiny or absent objects: judge errors against 1 % of the image instead
_EIGHT = np.ones((3, 3), dtype=bool)  # 8-connectivity


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
    mean_y: np.ndarray  # [n+1] centroid
    mean_x: np.ndarray

    @classmethod
    def measure(cls, mask: np.ndarray, band: np.ndarray, halo: np.ndarray) -> "Components":
        labels, n = label_components(mask)
        size = n + 1
        flat = labels.ravel()
        idx = np.flatnonzero(flat)  # error pixels are few: measure only them
        lab = flat[idx]
        area = np.bincount(lab, minlength=size)
        ys, xs = np.divmod(idx, labels.shape[1])
        # integer sums are exact in float64, so the means equal numpy's mean over each part's pixels
        mean_y = np.bincount(lab, weights=ys, minlength=size) / np.maximum(area, 1)
        mean_x = np.bincount(lab, weights=xs, minlength=size) / np.maximum(area, 1)
        in_band = np.bincount(lab[band.ravel()[idx]], minlength=size)
        touches = np.bincount(lab[halo.ravel()[idx]], minlength=size) > 0
        return cls(labels, n, area, in_band, touches, mean_y, mean_x)


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


def _grid(fy: float, fx: float) -> tuple[str, str]:
    row = "top" if fy < 1 / 3 else "bottom" if fy >= 2 / 3 else "middle"
    col = "left" if fx < 1 / 3 else "right" if fx >= 2 / 3 else "center"
    return row, col


def where_phrase(row: str, col: str) -> str:
    if row == "middle" and col == "center":
        return "in the center"
    if row == "middle":
        return f"on the {col}"
    if col == "center":
        return f"at the {row}"
    return f"at the {row} {col}"


def image_location(mean_y: float, mean_x: float, h: int, w: int) -> str:
    """3x3 grid cell of a centroid over the whole image (for detached errors)."""
    return where_phrase(*_grid((mean_y + 0.5) / h, (mean_x + 0.5) / w))


@dataclass
class ObjectBox:
    """The GT object's centroid and half extents: the frame of on-object locations."""

    mean_y: float
    mean_x: float
    half_h: float
    half_w: float

    @classmethod
    def of(cls, ys: np.ndarray, xs: np.ndarray) -> "ObjectBox":
        return cls(float(ys.mean()), float(xs.mean()),
                   max(1.0, (ys.max() - ys.min() + 1) / 2), max(1.0, (xs.max() - xs.min() + 1) / 2))


def object_location(mean_y: float, mean_x: float, obj: ObjectBox) -> str:
    """3x3 grid over the object's box, centred on the object: where on the object an error sits.

    "Incomplete on the left" means the object's left part is missing, wherever
    the object is in the image, so errors attached to the object are placed relative to it.
    """
    dy = (mean_y - obj.mean_y) / obj.half_h
    dx = (mean_x - obj.mean_x) / obj.half_w
    return where_phrase(*_grid((dy + 1) / 2, (dx + 1) / 2))


# --- diagnosis -------------------------------------------------------------------

@dataclass
class Diagnosis:
    """What is wrong with one class's prediction, before any wording is chosen."""

    fully_missed: bool = False
    missed_where: list[str] = field(default_factory=list)  # image location (full miss) or on-object
    missed_share: float = 0.0  # share of the object in thick missing parts
    missed_as: str | None = None  # class the PR assigned to the missed pixels
    over_where: list[str] = field(default_factory=list)
    hallucinated: list[tuple[str, str]] = field(default_factory=list)  # (where, size word)
    boundary: str | None = None  # "coarse" | "tight" | "loose"

    @property
    def significant(self) -> bool:
        return bool(self.fully_missed or self.missed_where or self.over_where or self.hallucinated or self.boundary)


def _is_background(name: str) -> bool:
    return name.strip().lower() in {"background", "bg", "__background__", "_background_"}


def _majority(values: np.ndarray, exclude: int) -> tuple[int | None, float]:
    values = values[(values != exclude) & (values != VOID)]
    if values.size == 0:
        return None, 0.0
    ids, counts = np.unique(values, return_counts=True)
    k = int(np.argmax(counts))
    return int(ids[k]), float(counts[k]) / float(values.size)


def _unique(items: list[str], limit: int = 3) -> list[str]:
    out: list[str] = []
    for it in items:
        if it not in out:
            out.append(it)
    return out[:limit]


def analyse(
    gt: np.ndarray, pr: np.ndarray, class_index: int, class_names: list[str], negligible_fraction: float
) -> Diagnosis:
    """Measure the errors of class `class_index` between GT and PR (void pixels ignored).

    Each error mask (missed, spurious) is split into 8-connected parts measured
    in one pass (`Components`); a part is an edge error when most of it lies in
    the boundary band, is ignored below the negligible size, and is otherwise
    placed on the object (missing parts, over-extensions touching the object) or
    in the image (detached hallucinations).
    """
    gt, pr = np.asarray(gt), np.asarray(pr)
    h, w = gt.shape
    valid = gt != VOID
    g = (gt == class_index) & valid
    p = (pr == class_index) & valid
    g_area = int(g.sum())
    threshold = negligible_fraction * max(g_area, MIN_REF_FRACTION * max(1, int(valid.sum())))
    fn, fp = g & ~p, p & ~g
    diag = Diagnosis()

    def name_of(k: int | None) -> str | None:
        return class_names[k] if k is not None and 0 <= k < len(class_names) else None

    r = max(1, round(0.015 * min(h, w)))
    band = dilate(g, r) & ~erode(g, r) if g_area else np.zeros_like(g)
    halo = dilate(g, 1)
    gys, gxs = np.nonzero(g)
    obj = ObjectBox.of(gys, gxs) if g_area else None
    thin_fn = thin_fp = 0

    if g_area and int((g & p).sum()) <= FULL_MISS_TP * g_area:
        diag.fully_missed = True
        diag.missed_where = [image_location(float(gys.mean()), float(gxs.mean()), h, w)]
        k, _ = _majority(pr[g], class_index)
        diag.missed_as = name_of(k)
    elif g_area:
        parts_fn = Components.measure(fn, band, halo)
        parts = []
        for i in range(1, parts_fn.n + 1):
            area = int(parts_fn.area[i])
            if parts_fn.in_band[i] >= THIN_SHARE * area:
                thin_fn += area
            elif area >= threshold:
                parts.append((area, i))
        parts.sort(key=lambda t: -t[0])
        if parts:
            missing = np.isin(parts_fn.labels, [i for _, i in parts])
            diag.missed_share = float(missing.sum()) / g_area
            diag.missed_where = _unique(
                [object_location(parts_fn.mean_y[i], parts_fn.mean_x[i], obj) for _, i in parts], 2)
            k, share = _majority(pr[missing], class_index)
            if k is not None and share >= 0.5 and not _is_background(name_of(k) or "background"):
                diag.missed_as = name_of(k)

    parts_fp = Components.measure(fp, band, halo)
    over, halluc = [], []
    valid_area = max(1, int(valid.sum()))
    for i in range(1, parts_fp.n + 1):
        area = int(parts_fp.area[i])
        touches = bool(parts_fp.touches[i])
        if touches and not diag.fully_missed and parts_fp.in_band[i] >= THIN_SHARE * area:
            thin_fp += area
        elif area < threshold:
            continue
        elif touches and not diag.fully_missed:  # a missed object cannot over-extend: that is a misplacement
            over.append((area, object_location(parts_fp.mean_y[i], parts_fp.mean_x[i], obj)))
        else:
            share = area / valid_area
            size = "small" if share < 0.02 else "sizeable" if share < 0.1 else "large"
            halluc.append((area, (image_location(parts_fp.mean_y[i], parts_fp.mean_x[i], h, w), size)))
    diag.over_where = _unique([wh for _, wh in sorted(over, key=lambda t: -t[0])], 2)
    seen: set[str] = set()
    for _, (wh, size) in sorted(halluc, key=lambda t: -t[0]):
        if wh not in seen:
            seen.add(wh)
            diag.hallucinated.append((wh, size))
    diag.hallucinated = diag.hallucinated[:3]

    thin = thin_fn + thin_fp
    if thin >= threshold:
        diag.boundary = "tight" if thin_fn >= 0.75 * thin else "loose" if thin_fp >= 0.75 * thin else "coarse"
    return diag


# --- wording -----------------------------------------------------------------------
# Every phrasing of a kind carries that kind's key word (missed, incomplete,
# over-extend, hallucinated, coarse), so texts stay comparable across variants.

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
        "the predicted {C} region is over-extended {where}, beyond the true boundary",
        "the {C} prediction over-extends past the object {where}",
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


def render(diag: Diagnosis, class_name: str, rng: random.Random) -> str:
    """One to three sentences: missing part, spurious parts, boundary (in that order)."""
    c = class_name.upper()
    pick = lambda kind: rng.choice(PHRASES[kind])  # noqa: E731
    if not diag.significant:
        return pick("none").format(C=c)
    sentences: list[str] = []
    if diag.fully_missed:
        other = diag.missed_as
        phrase = "missed_as_bg" if other is not None and _is_background(other) else "missed_as"
        as_ = "" if other is None else pick(phrase).format(O=other.upper())
        sentences.append(pick("missed").format(C=c, where=diag.missed_where[0], as_=as_))
    elif diag.missed_where:
        share = next(word for limit, word in _SHARES if diag.missed_share < limit)
        as_ = "" if diag.missed_as is None else pick("incomplete_as").format(O=diag.missed_as.upper())
        sentences.append(pick("incomplete").format(C=c, where=_and(diag.missed_where), share=share, as_=as_))
    clauses = []
    if diag.over_where:
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
        gt, pr = req.gt, req.pr
        h, w = gt.shape[-2:]
        if max(h, w) > self.analysis_size:
            s = self.analysis_size / max(h, w)
            size = (max(1, round(h * s)), max(1, round(w * s)))
            _, gt, pr = resize_for_describer(req.image, gt, pr, size)
        names = list(req.class_names) or self.class_names
        diag = analyse(gt.cpu().numpy(), pr.cpu().numpy(), req.class_index, names, self.negligible_fraction)
        rng = random.Random(f"{self.seed}:{req.key}")
        return clean_answer(render(diag, req.class_name, rng), self.max_words)

    def close(self) -> None:
        pass
