"""The rules describer says what is really wrong, where, with which class; plus cleaning and registry."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ttdl.core.config import ConfigError
from ttdl.core.settings import DescriberSettings
from ttdl.text.describers import (
    Describer,
    DescribeRequest,
    build_describer,
    clean_answer,
    load_template,
    make_support_example,
)
from ttdl.text.describers.prompt import DEFAULT_TEMPLATE
from ttdl.text.describers.rules import REGIONS, analyse, erode, label_components, name_extents, translate
from ttdl.text.describers.rules import dilate as rules_dilate

NAMES = ["background", "circle", "square", "triangle", "ring", "star", "cross"]
SIZE = 96
KEYS = [f"img{i}-1" for i in range(8)]  # several keys exercise every phrasing variant

yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
DISK = ((yy - 48) ** 2 + (xx - 48) ** 2) <= 20**2
GT = torch.where(DISK, 1, 0)
IMAGE = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


def texts(pr: torch.Tensor, gt: torch.Tensor = GT, class_index: int = 1, cfg: dict | None = None) -> list[str]:
    d = build_describer(DescriberSettings.from_partial({"backend": "rules", **(cfg or {})}), NAMES)
    reqs = [DescribeRequest(k, IMAGE, gt, pr, class_index, NAMES[class_index], NAMES) for k in KEYS]
    out = d.describe(reqs)
    assert all(isinstance(t, str) and t for t in out)
    return [t.lower() for t in out]


def dilate(mask: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(mask[None, None].float(), 3, 1, 1)[0, 0] > 0


def diagnose(pr: torch.Tensor, gt: torch.Tensor = GT):
    return analyse(gt.numpy(), pr.numpy(), 1, NAMES, 0.05)


def disk_at(cy: int, cx: int, r: int = 20) -> torch.Tensor:
    return torch.where(((yy - cy) ** 2 + (xx - cx) ** 2) <= r**2, 1, 0)


def test_object_missing_left_half() -> None:
    pr = GT.clone()
    pr[:, :48] = 0
    for t in texts(pr):
        assert "circle" in t and "incomplete" in t and "left" in t
        assert "right" not in t and "hallucinated" not in t and "no significant" not in t
        assert "center" not in t and "shifted" not in t
    assert [e.code for e in diagnose(pr).missed_extents] == ["left"]


def test_detached_blob_bottom_right_is_hallucination() -> None:
    pr = GT.clone()
    pr[80:90, 80:90] = 1
    for t in texts(pr):
        assert "hallucinated" in t and "bottom right" in t and "circle" in t
        assert "incomplete" not in t and "over-extend" not in t and "missed" not in t


def test_perfect_prediction_has_no_significant_deviation() -> None:
    for t in texts(GT.clone()):
        assert "no significant deviation" in t and "circle" in t


def test_fully_missed_object_confused_with_other_class() -> None:
    gt = torch.zeros(SIZE, SIZE, dtype=torch.long)
    gt[5:30, 60:90] = 1  # object in the top-right cell of the image
    pr = torch.where(gt == 1, 2, 0)  # every object pixel predicted as "square"
    for t in texts(pr, gt):
        assert "missed" in t and "square" in t and "circle" in t and "top right" in t
        assert "incomplete" not in t


def test_fully_missed_object_left_as_background() -> None:
    for t in texts(torch.zeros_like(GT)):
        assert "missed" in t and "background" in t


def test_partial_miss_names_the_confused_class() -> None:
    pr = GT.clone()
    pr[DISK & (yy < 40)] = 3  # the top part is predicted as "triangle"
    for t in texts(pr):
        assert "incomplete" in t and "top" in t and "triangle" in t


def test_over_extension_on_the_right() -> None:
    pr = GT.clone()
    pr[38:58, 60:85] = 1  # attached to the disk, sticking out to the right
    for t in texts(pr):
        assert "over-extend" in t and "right" in t
        assert "hallucinated" not in t and "left" not in t and "shifted" not in t


def test_thin_band_errors_are_boundary_quality() -> None:
    loose = GT.clone()
    loose[dilate(DISK)] = 1
    for t in texts(loose):
        assert "coarse" in t and ("loose" in t or "past the true outline" in t)
        assert "over-extend" not in t and "hallucinated" not in t
    ragged = GT.clone()
    ring_out = dilate(DISK) & ~DISK
    ring_in = DISK & dilate(~DISK)
    ragged[ring_out & ((xx + yy) % 4 < 2)] = 1
    ragged[ring_in & ((xx + yy) % 4 >= 2)] = 0
    for t in texts(ragged):
        assert "coarse" in t and "ragged" in t


def test_errors_inside_void_are_ignored() -> None:
    gt = GT.clone()
    gt[:, :30] = 255
    pr = GT.clone()
    pr[10:25, 5:25] = 1  # a blob, but only where the label is void
    for t in texts(pr, gt):
        assert "no significant deviation" in t


def test_combined_errors_within_three_sentences_and_60_words() -> None:
    pr = GT.clone()
    pr[:, :48] = 0
    pr[5:15, 5:15] = 1
    pr[80:90, 80:90] = 1
    pr[38:58, 66:85] = 1
    for t in texts(pr):
        assert "incomplete" in t and "hallucinated" in t and "top left" in t and "bottom right" in t
        assert "shifted" not in t  # a cut-off half plus a bump moves the centroid, but is no shift
        assert t.count(".") <= 3 and len(t.split()) <= 60


def test_negligible_fraction_is_configurable() -> None:
    pr = GT.clone()
    pr[80:84, 80:84] = 1  # 16 px, ~1.3 % of the object's area
    assert all("no significant deviation" in t for t in texts(pr))  # default 0.05
    assert all("hallucinated" in t and "bottom right" in t for t in texts(pr, cfg={"negligible_fraction": 0.005}))


def test_wording_is_deterministic_and_varied() -> None:
    pr = GT.clone()
    pr[:, :48] = 0
    pr[80:90, 80:90] = 1
    first, again = texts(pr), texts(pr)
    assert first == again
    assert len(set(first)) > 1  # different keys pick different phrasings
    other_seed = texts(pr, cfg={"seed": 7})
    assert other_seed != first


def test_large_masks_are_downsampled_and_stats_count() -> None:
    big_gt = F.interpolate(GT[None, None].float(), size=(400, 400), mode="nearest")[0, 0].long()
    pr = big_gt.clone()
    pr[:, :200] = 0
    d = build_describer(DescriberSettings.from_partial({"backend": "rules", "analysis_size": 128}), NAMES)
    out = d.describe([DescribeRequest("k-1", torch.rand(3, 400, 400), big_gt, pr, 1, "circle", NAMES)] * 3)
    assert "left" in out[0].lower() and "incomplete" in out[0].lower()
    assert isinstance(d, Describer)
    stats = d.stats.as_dict()
    assert stats["calls"] == 3 and stats["malformed"] == 0 and stats["latency_s"] > 0


def test_support_example_agrees_with_rules_describer() -> None:
    """The template's ideal answer and the rules describer must tell the same story."""
    template = load_template(Path(__file__).resolve().parents[1] / DEFAULT_TEMPLATE)
    s = make_support_example(IMAGE, GT, 1, "circle", template)
    pr = torch.where(s.pr_mask, 1, 0)
    for t in texts(pr):
        assert "incomplete" in t and "left" in t and "hallucinated" in t and "bottom right" in t


def test_label_components() -> None:
    m = np.zeros((6, 8), dtype=bool)
    m[0:2, 0:2] = True  # blob A
    m[2, 2] = True  # diagonal neighbour of A: same component (8-connectivity)
    m[4:6, 5:8] = True  # blob B
    m[0, 7] = True  # single pixel C
    labels, n = label_components(m)
    assert n == 3
    assert labels[0, 0] == labels[2, 2] != labels[4, 6]
    assert (labels > 0).sum() == m.sum() and labels[~m].max() == 0
    spiral = np.zeros((9, 9), dtype=bool)
    spiral[0, :] = spiral[:, 8] = spiral[8, :] = spiral[2:, 0] = spiral[2, :7] = spiral[2:7, 6] = True
    assert label_components(spiral)[1] == 1
    assert label_components(np.zeros((3, 3), dtype=bool))[1] == 0


@pytest.mark.parametrize(
    "raw, expected",
    [
        ('  "The DOG region is\n\n incomplete on the left."  ', "The DOG region is incomplete on the left."),
        ("**Answer:** The CAT region over-extends.", "The CAT region over-extends."),
        ("```\nThe BIRD region was missed entirely.\n```", "The BIRD region was missed entirely."),
        ('{"description": "The DOG region is coarse."}', "The DOG region is coarse."),
        ("- The DOG region is incomplete.", "The DOG region is incomplete."),
        ("", None),
        ("   \n ", None),
        ("```\n```", None),
        ("... 123 !!", None),
        (None, None),
        (42, None),
    ],
)
def test_clean_answer(raw: object, expected: str | None) -> None:
    assert clean_answer(raw) == expected


def test_clean_answer_truncates_to_max_words() -> None:
    long = " ".join(f"word{i}" for i in range(100))
    assert len(clean_answer(long).split()) == 60
    assert len(clean_answer(long, max_words=10).split()) == 10


def test_unknown_backend_lists_known_ones() -> None:
    with pytest.raises(ValueError, match=r"nope.*ollama.*openai.*rules"):
        build_describer(DescriberSettings.from_partial({}).replace(backend="nope"), NAMES)
    with pytest.raises(ConfigError, match=r"describer.backend.*nope"):  # a config never gets that far
        DescriberSettings.from_partial({"backend": "nope"})


def test_shifted_prediction_of_missed_object_is_hallucination() -> None:
    gt = torch.zeros(SIZE, SIZE, dtype=torch.long)
    gt[40:60, 10:30] = 1
    pr = torch.zeros_like(gt)
    pr[40:60, 30:50] = 1  # right next to the object, touching it, none of it correct
    for t in texts(pr, gt):
        assert "missed" in t and "hallucinated" in t and "over-extend" not in t


# ---- the measured (vectorised) describer says exactly what the reference one said -------------
def reference_labels(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """The reference labelling: min-label propagation over 3x3 neighbourhoods, labels in raster order."""
    h, w = mask.shape
    if not mask.any():
        return np.zeros((h, w), dtype=np.int32), 0
    none = h * w
    lab = np.where(mask, np.arange(h * w).reshape(h, w), none)
    while True:
        padded = np.pad(lab, 1, constant_values=none)
        new = lab.copy()
        for dy in range(3):
            for dx in range(3):
                np.minimum(new, padded[dy:dy + h, dx:dx + w], out=new)
        new = np.where(mask, new, none)
        new = np.append(new.ravel(), none)[new]
        if np.array_equal(new, lab):
            break
        lab = new
    out = np.zeros((h, w), dtype=np.int32)
    uniq, inverse = np.unique(lab[mask], return_inverse=True)
    out[mask] = inverse + 1
    return out, len(uniq)


def test_label_numbering_matches_the_reference() -> None:
    """Part numbers break ties between equal parts when they are worded, so the numbering must not change."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        m = rng.random((int(rng.integers(1, 30)), int(rng.integers(1, 30)))) < rng.random()
        labels, n = label_components(m)
        ref, n_ref = reference_labels(m)
        assert n == n_ref and np.array_equal(labels, ref)


def test_dilate_matches_padded_reference() -> None:
    rng = np.random.default_rng(1)
    for r in (1, 2, 3, 7):
        m = rng.random((13, 9)) < 0.1
        ref = F.max_pool2d(torch.from_numpy(m)[None, None].float(), 2 * r + 1, 1, r)[0, 0].numpy() > 0
        assert np.array_equal(rules_dilate(m, r), ref)


def golden_requests() -> list[DescribeRequest]:
    """Blobs of several classes with every kind of error, drawn from one seeded generator."""
    gen = torch.Generator().manual_seed(1234)
    size = 64
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    reqs = []
    for i in range(24):
        cy, cx, r = (torch.randint(12, 52, (3,), generator=gen)).tolist()
        r = 4 + r % 14
        c = 1 + i % 6
        gt = torch.where((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r, c, 0)
        gt[torch.rand(size, size, generator=gen) < 0.01] = 255
        pr = torch.roll(gt.clamp(max=6), tuple(torch.randint(-6, 7, (2,), generator=gen).tolist()), (0, 1))
        blob = torch.randint(0, size - 8, (2,), generator=gen).tolist()
        pr[blob[0]:blob[0] + 1 + i % 8, blob[1]:blob[1] + 1 + i % 8] = c if i % 3 else (c % 6) + 1
        if i % 4 == 0:
            pr[pr == c] = torch.where(torch.rand(int((pr == c).sum()), generator=gen) < 0.2, 0, c)
        if i % 5 == 0:
            pr[:, : size // 3] = 0
        reqs.append(DescribeRequest(f"g{i}-{c}", torch.zeros(3, size, size), gt, pr, c, NAMES[c], NAMES))
    return reqs




# ---- where: errors are placed by their extent, and a moved mask reads as one shift ----------------
@pytest.mark.parametrize("step", [3, 20])
@pytest.mark.parametrize(
    "dy, dx, key, direction, behind, ahead",
    [
        (0, 1, "right", "to the right", "left", "right"),
        (0, -1, "left", "to the left", "right", "left"),
        (-1, 0, "up", "upward", "bottom", "top"),
        (1, 0, "down", "downward", "top", "bottom"),
    ],
)
def test_shifted_mask_names_its_direction_and_sides(
    step: int, dy: int, dx: int, key: str, direction: str, behind: str, ahead: str
) -> None:
    """Missing on the side it left, extra on the side it moved to, even for 3 px on a 40 px disk."""
    pr = disk_at(48 + step * dy, 48 + step * dx)
    diag = diagnose(pr)
    assert diag.shift == key and diag.shift_px == (step * dy, step * dx)
    assert [e.code for e in diag.missed_extents] == [behind] and [e.code for e in diag.over_extents] == [ahead]
    assert (diag.shift_size < 0.15) == (step == 3)
    opposite = {"to the right": "to the left", "to the left": "to the right", "upward": "downward",
                "downward": "upward"}[direction]
    for t in texts(pr):
        assert "shifted" in t and direction in t and opposite not in t and "center" not in t
        rest = t.split(direction, 1)[1]  # the missing side is named before the extra side in every phrasing
        assert behind in rest and ahead in rest and rest.index(behind) < rest.index(ahead)
        assert ("slightly" in t) == (step == 3)


def test_diagonal_shift_and_shifted_square() -> None:
    diag = diagnose(disk_at(51, 51))
    assert diag.shift == "down_right" and diag.missed_extents[0].code == "top_left"
    assert all("shifted down and to the right" in t for t in texts(disk_at(51, 51)))
    square = torch.zeros(SIZE, SIZE, dtype=torch.long)
    square[28:68, 28:68] = 1
    for t in texts(torch.roll(square, 3, 1), square):
        assert "shifted to the right" in t and "left" in t.split("right", 1)[1]


def test_one_pixel_shift_is_boundary_noise_not_a_shift() -> None:
    for t in texts(disk_at(48, 49)):
        assert "shifted" not in t and ("coarse" in t or "no significant" in t)


def test_ring_error_reads_around_the_boundary() -> None:
    """PR = GT eroded by 4 px: its centroid is the object's center, its extent is the whole border."""
    eroded = torch.from_numpy(erode(DISK.numpy(), 4)).long()
    diag = diagnose(eroded)
    assert [e.region.name for e in diag.missed_extents] == ["ring"] and diag.missed_extents[0].code == "whole"
    for t in texts(eroded):
        assert "incomplete" in t and "all around the boundary" in t and "center" not in t and "shifted" not in t
    grown = disk_at(48, 48, 24)
    for t in texts(grown):
        assert "over-extend" in t and "all around the boundary" in t and "center" not in t
    top_ring = torch.where(yy < 48, eroded, GT)  # only the upper half of the ring is missing
    for t in texts(top_ring):
        assert "incomplete" in t and "top" in t and "bottom" not in t and "center" not in t


def test_strips_along_two_edges_name_both_edges() -> None:
    square = torch.zeros(SIZE, SIZE, dtype=torch.long)
    square[28:68, 28:68] = 1
    pr = square.clone()
    pr[28:68, 28:34] = 0
    pr[28:34, 28:68] = 0
    assert diagnose(pr, square).missed_extents[0].code == "top_left"
    for t in texts(pr, square):
        assert "on the left and top edges" in t and "center" not in t


def test_name_extents_picks_the_covering_region() -> None:
    def named(cells: list[int]) -> str:
        counts = np.zeros(9)
        counts[cells] = 10
        return name_extents(counts[None], in_image=False)[0].region.name

    assert named([8]) == "bottom_right" and named([4]) == "center"
    assert named([0, 3, 6]) == "left_side" and named([0, 1, 2]) == "top_side"
    assert named([0, 1, 2, 3, 6]) == "left_top_edges"
    assert named([0, 1, 2, 3, 5, 6, 7, 8]) == "ring" and named(list(range(9))) == "whole"
    assert named([0, 1, 3, 4, 6, 7]) == "left_half"
    lopsided = np.array([[70, 15, 0, 15, 0, 0, 0, 0, 0]])  # mostly one corner cell: that cell, not a shape
    extent = name_extents(lopsided, in_image=True)[0]
    assert extent.where == "at the top left" and extent.code == "top_left" and sum(extent.shares) == pytest.approx(1)
    assert len({r.name for r in REGIONS}) == len(REGIONS)
    assert {r.code for r in REGIONS} == {"top_left", "top", "top_right", "left", "center", "right", "bottom_left",
                                         "bottom", "bottom_right", "whole"}


def test_translate_moves_and_drops() -> None:
    rng = np.random.default_rng(2)
    m = rng.random((7, 9)) < 0.4
    for dy, dx in [(0, 0), (2, -3), (-1, 4), (6, 0), (0, -8), (7, 0)]:
        ref = np.zeros_like(m)
        for y, x in zip(*np.nonzero(m)):
            if 0 <= y + dy < 7 and 0 <= x + dx < 9:
                ref[y + dy, x + dx] = True
        assert np.array_equal(translate(m, dy, dx), ref)


# Pinned texts of the golden requests: they are what a sync run trains on, so they (and its
# weights) must change only on purpose. Rewritten when errors came to be placed by their extent
# and shifted masks to be reported as shifts (regenerate from the describer after such a change).
GOLDEN = [
    'The CIRCLE region is incomplete on the left and top edges: about half of it is missing.',
    ('The predicted SQUARE region is shifted upward, so it is incomplete along the bottom edge and over-'
     'extends along the top edge.'),
    ('The TRIANGLE region is shifted up and to the right: missing most of it on the left half, extra at '
     'the top right; the prediction hallucinated a small spurious TRIANGLE region at the top right.'),
    'The RING region is segmented accurately, with no significant deviation from the ground truth.',
    ('The STAR region is incomplete on the left and bottom edges: a sizeable part of it is missing; the '
     'STAR region over-extends along the right side; a spurious STAR region was hallucinated at the bottom'
     ' left.'),
    'The predicted CROSS region is incomplete, missing most of the object on the left half.',
    ('The predicted CIRCLE region is incomplete, missing a small part of the object along the bottom edge.'
     ' A small CIRCLE region was hallucinated at the bottom.'),
    ('The SQUARE region is incomplete along the top edge: a small part of it is missing. The SQUARE '
     'prediction over-extends past the object along the bottom edge.'),
    ('The TRIANGLE prediction is shifted up and to the right: about half of it on the left and bottom '
     'edges is missing and the prediction spills past the object at the top right.'),
    ('The RING prediction is shifted downward: a sizeable part of it along the top edge is missing and the'
     ' prediction spills past the object along the bottom edge.'),
    ('The STAR region is shifted to the left: missing a sizeable part of it along the right side, extra '
     'along the left side.'),
    ('The predicted CROSS region is shifted to the right, so it is incomplete on the left and top edges '
     'and over-extends along the right side. The prediction hallucinated a small spurious CROSS region in '
     'the center.'),
    ('The prediction of the CIRCLE region is incomplete on the bottom half. The predicted CIRCLE region is'
     ' over-extended along the top edge, beyond the true outline.'),
    ('The SQUARE prediction is shifted up and to the left: about half of it toward the bottom right is '
     'missing and the prediction spills past the object along the left side. The prediction hallucinated a'
     ' small spurious SQUARE region along the top edge of the image.'),
    ('The TRIANGLE prediction is shifted up and to the right: about half of it toward the bottom left is '
     'missing and the prediction spills past the object at the top right; a spurious TRIANGLE region was '
     'hallucinated on the left.'),
    'The RING outline is coarse, with ragged edges.',
    ('The prediction of the STAR region is incomplete on the left and top edges; the predicted STAR region'
     ' is over-extended along the right side, beyond the true outline.'),
    'The CROSS region is shifted downward: missing about half of it on the top half, extra along the bottom edge.',
    ('The predicted CIRCLE region is shifted downward, so it is incomplete on the left and top edges and '
     'over-extends along the bottom edge.'),
    ('The predicted SQUARE region is shifted down and to the right, so it is incomplete on the left and '
     'top edges and over-extends toward the bottom right; a small SQUARE region was hallucinated at the '
     'bottom.'),
    ('The predicted TRIANGLE region is incomplete, missing about half of the object on the left half. The '
     'predicted TRIANGLE region is over-extended toward the bottom right, beyond the true outline.'),
    ('The predicted RING region is shifted to the right, so it is incomplete along the left side and over-'
     'extends along the right side.'),
    ('The prediction of the STAR region is incomplete on the bottom half. The STAR prediction over-extends'
     ' past the object along the top edge and along the bottom edge.'),
    ('The CROSS region is shifted down and to the left: missing a sizeable part of it on the right and top'
     ' edges, extra along the left side. A spurious CROSS region was hallucinated at the bottom.'),
]


def test_texts_are_pinned() -> None:
    d = build_describer(DescriberSettings.from_partial({"backend": "rules"}), NAMES)
    assert d.describe(golden_requests()) == GOLDEN
