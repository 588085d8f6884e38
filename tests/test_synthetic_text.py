import itertools
import random
import re

import torch

from ttdl.text.synthetic_text import (
    ERROR_KINDS,
    POSITIONS,
    SIZES,
    perturb_description,
    region_presence,
    synthetic_description,
    synthetic_descriptions,
)

ALL_POOL_WORDS = {w.lower() for w in POSITIONS + ERROR_KINDS + SIZES}


def test_region_presence_hand_mask():
    gt = torch.tensor([[1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    pr = torch.tensor([[1, 0, 0], [0, 1, 1]], dtype=torch.bool)
    # TP (0,0); FN (0,1); FP (1,1),(1,2); TN (0,2),(1,0)
    assert region_presence(gt, pr) == (True, True, True, True)
    assert region_presence(gt, pr, min_pixels=2) == (False, True, True, False)
    assert region_presence(gt, gt) == (True, True, False, False)
    assert region_presence(gt, torch.zeros_like(gt)) == (False, True, False, True)
    valid = torch.tensor([[True, True, False], [False, True, True]])  # TN pixels void
    assert region_presence(gt, pr, valid=valid) == (True, False, True, True)


def test_every_template_nonempty_names_class_and_distinct():
    texts = set()
    for combo in itertools.product([False, True], repeat=4):
        text = synthetic_description("potted plant", *combo)
        assert text.strip() and "POTTED PLANT" in text
        assert text == synthetic_description("potted plant", *combo)  # deterministic
        texts.add(text)
    assert len(texts) == 16


def test_template_semantics():
    assert "missed entirely" in synthetic_description("dog", tp=False, tn=True, fp=False, fn=True)
    assert "hallucinated" in synthetic_description("dog", tp=False, tn=True, fp=True, fn=False)
    assert "correctly" in synthetic_description("dog", tp=True, tn=True, fp=False, fn=False)


def test_synthetic_descriptions_ignore_void():
    names = ["background", "cat", "dog"]
    gt = torch.tensor([[[1, 1], [255, 0]], [[2, 2], [2, 2]]])
    pr = torch.tensor([[[1, 0], [1, 0]], [[0, 0], [0, 0]]])
    texts = synthetic_descriptions(gt, pr, [(0, 1), (1, 2), (1, 1)], names)
    # row 0 cat: TP (0,0), FN (0,1), TN (1,1); the PR cat on void (1,0) is no FP
    assert texts[0] == synthetic_description("cat", True, True, False, True)
    # row 1 dog: whole image dog in GT, nothing predicted
    assert texts[1] == synthetic_description("dog", False, False, False, True)
    assert texts[2] == synthetic_description("cat", False, True, False, False)


def test_stray_pixels_are_no_fp_or_fn():
    """FP/FN count only from the describer's negligible size on: 5 % of the object, or of 1 % of the image."""
    gt = torch.zeros(64, 64, dtype=torch.bool)
    gt[10:30, 10:30] = True  # 400 px: FP/FN need 20 px
    pr = gt.clone()
    pr[50, 50] = True
    pr[40:42, 40:45] = True  # 11 stray px in two specks
    pr[10, 10:19] = False  # 9 px missed
    assert region_presence(gt, pr) == (True, True, True, True)  # counting single pixels, as before
    assert region_presence(gt, pr, negligible_fraction=0.05) == (True, True, False, False)
    pr[45:48, 45:48] = True  # 20 stray px in all
    pr[11, 10:21] = False  # 20 missed in all
    assert region_presence(gt, pr, negligible_fraction=0.05) == (True, True, True, True)
    # no object: 1 % of the 4096-px image is the reference, so FP needs 0.05 * 40.96 = 2.05 px
    empty = torch.zeros_like(gt)
    speck = empty.clone()
    speck[0, 0:2] = True
    assert region_presence(empty, speck, negligible_fraction=0.05) == (False, True, False, False)
    speck[0, 2] = True
    assert region_presence(empty, speck, negligible_fraction=0.05) == (False, True, True, False)


def test_synthetic_descriptions_ignore_negligible_errors_by_default():
    names = ["background", "cat"]
    gt = torch.zeros(1, 32, 32, dtype=torch.long)
    gt[0, 8:24, 8:24] = 1  # 256 px: FP/FN need 12.8 px
    pr = gt.clone()
    pr[0, 0, 0] = 1  # one stray pixel
    pr[0, 8, 8] = 0  # one missed pixel
    correct = synthetic_description("cat", True, True, False, False)
    assert synthetic_descriptions(gt, pr, [(0, 1)], names) == [correct]
    assert synthetic_descriptions(gt, pr, [(0, 1)], names, negligible_fraction=0.0) == [
        synthetic_description("cat", True, True, True, True)]
    pr[0, 0, :13] = 1  # 13 stray pixels
    assert synthetic_descriptions(gt, pr, [(0, 1)], names) == [synthetic_description("cat", True, True, True, False)]


DESCRIPTION = (
    "The prediction of the DOG region is incomplete on the left; a small spurious "
    "CAT region was hallucinated at the top-right corner."
)


def test_perturb_deterministic_and_different():
    pool = ["dog", "cat", "person"]
    a = perturb_description(DESCRIPTION, pool, 6, random.Random(3))
    b = perturb_description(DESCRIPTION, pool, 6, random.Random(3))
    assert a == b and len(a) == 6
    assert all(copy != DESCRIPTION for copy in a)
    assert len(set(a)) == 6
    assert perturb_description(DESCRIPTION, pool, 6, random.Random(4)) != a


def test_perturb_swaps_draw_only_from_pools():
    pool = ["dog", "cat", "person"]
    token = re.compile(r"[A-Za-z]+(?:-[A-Za-z]+)*")
    orig = token.findall(DESCRIPTION)
    checked = 0
    for seed in range(20):
        for copy in perturb_description(DESCRIPTION, pool, 4, random.Random(seed)):
            words = token.findall(copy)
            if len(words) != len(orig) or sorted(words) == sorted(orig):
                continue  # fallback shuffle or deletion
            checked += 1
            for old, new in zip(orig, words):
                if old == new:
                    continue
                if old.lower() in pool:  # class swap: from the pool, case kept
                    assert new.lower() in pool and new.isupper()
                elif old.lower() in ALL_POOL_WORDS:  # whole-word swap
                    assert new.lower() in ALL_POOL_WORDS and old[0].isupper() == new[0].isupper()
                else:  # compound such as "top-right": parts swapped one by one
                    changed = [(a, b) for a, b in zip(old.split("-"), new.split("-")) if a != b]
                    assert changed, (old, new)
                    for a, b in changed:
                        assert a.lower() in ALL_POOL_WORDS and b.lower() in ALL_POOL_WORDS, (a, b)
                        assert a[0].isupper() == b[0].isupper()
    assert checked > 40


def test_perturb_class_swap_only_from_pool():
    text = "The CAT region is shown."  # no pool words besides the class
    seen = set()
    for seed in range(30):
        for copy in perturb_description(text, ["cat", "horse"], 2, random.Random(seed)):
            assert copy != text
            for name in ("DOG", "PERSON", "dog"):
                assert name not in copy
            if "HORSE" in copy:
                seen.add(copy)
    assert "The HORSE region is shown." in seen


def test_perturb_fallback_without_pool_words():
    text = "Nothing here matches."
    copies = perturb_description(text, ["dog"], 3, random.Random(0))
    assert len(set(copies)) == 3 and text not in copies
    for copy in copies:  # only shuffles and deletions: a sub-multiset of the words
        assert set(copy.split()) <= set(text.split())


def test_perturb_degenerate_texts_still_differ():
    for text in ["", "dog", "a a a"]:
        copies = perturb_description(text, [], 2, random.Random(1))
        assert len(copies) == 2 and all(c != text for c in copies)
