"""Template diagnostic text and perturbed negatives (docs/method.md 3b phase 2, 3d).

Phase 2 of exp 3.1 bootstraps the text pathway without a describer: the text
of an (image, class) pair says only which of the TP/TN/FP/FN regions exist.
Exp 3.4 needs hard negatives: copies of a description that differ in a few
diagnostic words (where, what kind of error, how large, which class).
"""
from __future__ import annotations

import random
import re

import torch
from torch import Tensor

from ttdl.text.describers.rules import negligible_area

# describer.negligible_fraction's default: a stray FP/FN pixel is no "spurious"/"missed" region
NEGLIGIBLE_FRACTION = 0.05

POSITIONS = ("top", "bottom", "left", "right", "center", "middle", "upper", "lower", "corner", "edge")
ERROR_KINDS = (
    "incomplete",
    "over-extended",
    "hallucinated",
    "missed",
    "coarse",
    "spurious",
    "fragmented",
    "misplaced",
    "correct",
    "accurate",
)
SIZES = ("small", "large", "thin", "thick", "tiny", "big", "narrow", "wide", "slight", "major")
WORD_POOLS: tuple[tuple[str, ...], ...] = (POSITIONS, ERROR_KINDS, SIZES)

# Keyed by (tp, tn, fp, fn); "{C}" is the class name in upper case, as in the
# describer's style. tn=False means every valid pixel is the class in GT or PR.
_TEMPLATES: dict[tuple[bool, bool, bool, bool], str] = {
    (False, False, False, False): "There are no valid pixels to judge the {C} region; nothing can be compared.",
    (False, True, False, False): "There is no {C} in the scene and none was predicted; the {C} prediction is correct.",
    (True, False, False, False): "The {C} fills the whole image and the prediction covers it correctly.",
    (True, True, False, False): "The {C} region is predicted correctly; there is no significant deviation from the "
                                "ground truth.",
    (False, False, False, True): "The whole image is {C} in the ground truth, but the {C} was missed entirely.",
    (False, True, False, True): "The {C} region was missed entirely: the prediction contains no {C} where the ground "
                                "truth shows one.",
    (False, False, True, False): "The entire image was wrongly predicted as {C}; there is no {C} in the ground truth.",
    (False, True, True, False): "A spurious {C} region was hallucinated; there is no {C} in the ground truth.",
    (True, False, False, True): "The {C} covers the whole image, but the prediction of the {C} region is incomplete "
                                "and misses part of it.",
    (True, True, False, True): "The prediction of the {C} region is incomplete: part of the {C} was missed, and no "
                               "spurious {C} was added.",
    (True, False, True, False): "The {C} region is over-extended and spreads over the whole image, beyond the true {C} "
                                "boundary.",
    (True, True, True, False): "The {C} region is over-extended: the prediction spills beyond the true {C} boundary, "
                               "though nothing of the {C} is missed.",
    (True, False, True, True): "The {C} region is coarse: part of the {C} is missed while the prediction spills over "
                               "all the rest of the image.",
    (True, True, True, True): "The {C} region is found but coarse: part of the {C} is missed and a spurious {C} area "
                              "is added beside it.",
    (False, False, True, True): "The {C} is predicted in exactly the wrong place: the true {C} is missed and every "
                                "other pixel is predicted as {C}.",
    (False, True, True, True): "The {C} is misplaced: the true {C} region is missed and a spurious {C} region is "
                               "hallucinated elsewhere.",
}


def region_presence(
    gt: Tensor, pr: Tensor, min_pixels: int = 1, valid: Tensor | None = None, negligible_fraction: float = 0.0
) -> tuple[bool, bool, bool, bool]:
    """Which of (TP, TN, FP, FN) cover at least `min_pixels` valid pixels.

    FP and FN must also reach the rules describer's negligible size
    (`negligible_fraction` of the object, or of 1 % of the valid image when the
    object is tiny or absent): otherwise a few stray pixels put most pairs in
    the all-four-present template and the templates stop telling pairs apart.
    """
    gt, pr = gt.bool(), pr.bool()
    ok = torch.ones_like(gt) if valid is None else valid.bool()
    gt = gt & ok
    counts = [int((r & ok).sum()) for r in (gt & pr, ~gt & ~pr, ~gt & pr, gt & ~pr)]
    error_min = max(float(min_pixels), negligible_area(int(gt.sum()), int(ok.sum()), negligible_fraction))
    tp, tn = (n >= min_pixels for n in counts[:2])
    fp, fn = (n >= error_min for n in counts[2:])
    return tp, tn, fp, fn


def synthetic_description(class_name: str, tp: bool, tn: bool, fp: bool, fn: bool) -> str:
    return _TEMPLATES[(bool(tp), bool(tn), bool(fp), bool(fn))].format(C=class_name.upper())


def synthetic_descriptions(
    gt: Tensor,
    pr: Tensor,
    pairs: list[tuple[int, int]],
    class_names: list[str],
    ignore_index: int = 255,
    min_pixels: int = 1,
    negligible_fraction: float = NEGLIGIBLE_FRACTION,
) -> list[str]:
    """One template text per (batch row, class) pair; void GT pixels count as neither.

    FP/FN below the negligible size count as absent (see `region_presence`).
    """
    texts = []
    for row, c in pairs:
        valid = gt[row] != ignore_index
        presence = region_presence(gt[row] == c, pr[row] == c, min_pixels, valid, negligible_fraction)
        texts.append(synthetic_description(class_names[c], *presence))
    return texts


# -- perturbed negatives --------------------------------------------------------

_WORD = re.compile(r"[A-Za-z]+(?:[-'][A-Za-z]+)*")


def _match_case(src: str, word: str) -> str:
    if len(src) > 1 and src.isupper():
        return word.upper()
    if src[:1].isupper():
        return word[:1].upper() + word[1:]
    return word.lower()


def _slots(text: str, class_pool: list[str]) -> list[tuple[int, int, tuple[str, ...]]]:
    """Swappable spans (start, end, pool): class names first, then pool words."""
    slots: list[tuple[int, int, tuple[str, ...]]] = []
    taken = [False] * len(text)
    classes = tuple(dict.fromkeys(c for c in class_pool if c.strip()))
    for name in sorted(classes, key=len, reverse=True):  # "potted plant" before "plant"
        for m in re.finditer(rf"(?<![A-Za-z]){re.escape(name)}(?![A-Za-z])", text, re.IGNORECASE):
            if not any(taken[m.start() : m.end()]):
                slots.append((m.start(), m.end(), classes))
                taken[m.start() : m.end()] = [True] * (m.end() - m.start())
    for m in _WORD.finditer(text):
        if any(taken[m.start() : m.end()]):
            continue
        pool = _pool_of(m.group())
        if pool:
            slots.append((m.start(), m.end(), pool))
            continue
        # compounds such as "top-left": each part is its own slot
        for part in re.finditer(r"[A-Za-z]+", m.group()):
            pool = _pool_of(part.group())
            if pool:
                slots.append((m.start() + part.start(), m.start() + part.end(), pool))
    return sorted(slots)


def _pool_of(word: str) -> tuple[str, ...] | None:
    low = word.lower()
    return next((p for p in WORD_POOLS if low in p), None)


def _swap_words(text: str, slots: list[tuple[int, int, tuple[str, ...]]], rng: random.Random) -> str:
    out, last = [], 0
    for start, end, pool in slots:
        src = text[start:end]
        choices = [w for w in pool if w.lower() != src.lower()]
        out.append(text[last:start])
        out.append(_match_case(src, rng.choice(choices)) if choices and rng.random() < 0.5 else src)
        last = end
    out.append(text[last:])
    return "".join(out)


def _shuffle_or_delete(text: str, rng: random.Random) -> str:
    """Fallback edit: swap two distinct words or drop one."""
    words = text.split()
    if not words:
        return rng.choice(ERROR_KINDS)
    distinct = len(set(words)) > 1
    if distinct and rng.random() < 0.5:
        i, j = rng.sample(range(len(words)), 2)
        while words[i] == words[j]:
            i, j = rng.sample(range(len(words)), 2)
        words[i], words[j] = words[j], words[i]
    else:
        del words[rng.randrange(len(words))]
    return " ".join(words)


def perturb_description(text: str, class_pool: list[str], m: int, rng: random.Random) -> list[str]:
    """`m` near-miss copies of `text`, each different from it (3d).

    Pool words are swapped independently with probability 0.5; when no swap
    happened (or the text has no pool word) the copy gets a word shuffle or
    deletion instead. Up to a few retries keep the copies distinct from one
    another; a duplicate is accepted only when the text allows nothing else.
    """
    slots = _slots(text, class_pool)
    copies: list[str] = []
    for _ in range(m):
        candidate = text
        for _attempt in range(8):
            candidate = _swap_words(text, slots, rng) if slots else text
            if candidate == text:
                candidate = _shuffle_or_delete(text, rng)
            if candidate != text and candidate not in copies:
                break
        while candidate == text:  # e.g. text made of one repeated word
            candidate = _shuffle_or_delete(candidate, rng)
        copies.append(candidate)
    return copies
