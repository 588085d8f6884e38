"""The embedded synthetic dataset: determinism, mask validity, layout and split files."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import TINY_SPEC
from ttdl.datasets.synthetic import CLASS_NAMES, VOID, SyntheticSpec, generate, render_sample, voc_palette

VALID_LABELS = set(range(len(CLASS_NAMES))) | {VOID}


def split(root: Path, name: str) -> list[str]:
    return (root / "ImageSets" / "Segmentation" / f"{name}.txt").read_text().split()


def all_uids(root: Path) -> list[str]:
    return split(root, "train") + split(root, "val")


def mask(root: Path, uid: str) -> np.ndarray:
    with Image.open(root / "SegmentationClass" / f"{uid}.png") as img:
        return np.array(img)


def boundary(label: np.ndarray) -> np.ndarray:
    """Pixels with a 4-neighbour (inside the image) of another label."""
    edge = np.zeros(label.shape, dtype=bool)
    diff_v = label[1:, :] != label[:-1, :]
    diff_h = label[:, 1:] != label[:, :-1]
    edge[1:, :] |= diff_v
    edge[:-1, :] |= diff_v
    edge[:, 1:] |= diff_h
    edge[:, :-1] |= diff_h
    return edge


# ---- determinism -------------------------------------------------------------

def test_two_generations_are_identical(tiny_data, tmp_path) -> None:
    again = tmp_path / "again"
    generate(again, TINY_SPEC)
    for name in ("train", "val"):
        rel = Path("ImageSets/Segmentation") / f"{name}.txt"
        assert (again / rel).read_bytes() == (tiny_data / rel).read_bytes()
    assert (again / "classes.txt").read_bytes() == (tiny_data / "classes.txt").read_bytes()
    uids = all_uids(tiny_data)
    assert len(uids) == TINY_SPEC.num_train + TINY_SPEC.num_val
    for uid in uids:
        png = Path("SegmentationClass") / f"{uid}.png"
        assert (again / png).read_bytes() == (tiny_data / png).read_bytes(), png
        jpg = Path("JPEGImages") / f"{uid}.jpg"
        with Image.open(again / jpg) as a, Image.open(tiny_data / jpg) as b:
            assert np.array_equal(np.array(a), np.array(b)), jpg
    # nothing else (temp files of the atomic writes, stray outputs) is left behind
    def listing(root: Path) -> list[str]:
        return sorted(str(p.relative_to(root)) for p in root.rglob("*"))

    assert listing(again) == listing(tiny_data)


def test_another_seed_gives_other_data() -> None:
    """The determinism test above can fail: the seed does change the content."""
    other = dataclasses.replace(TINY_SPEC, seed=1)
    differs = [not np.array_equal(render_sample(i, TINY_SPEC)[1], render_sample(i, other)[1]) for i in range(4)]
    assert any(differs)


def test_a_sample_depends_only_on_seed_and_index() -> None:
    """Sample i is the same whatever the split sizes are (each image has its own RNG)."""
    bigger = dataclasses.replace(TINY_SPEC, num_train=50, num_val=3)
    for index in (0, 7, 30):
        img_a, lab_a = render_sample(index, TINY_SPEC)
        img_b, lab_b = render_sample(index, bigger)
        assert np.array_equal(img_a, img_b) and np.array_equal(lab_a, lab_b)


# ---- files and masks ---------------------------------------------------------

def test_split_counts_and_files(tiny_data) -> None:
    train, val = split(tiny_data, "train"), split(tiny_data, "val")
    assert len(train) == TINY_SPEC.num_train and len(val) == TINY_SPEC.num_val
    assert not set(train) & set(val)
    assert len(set(train + val)) == len(train + val)
    for uid in train + val:
        assert (tiny_data / "JPEGImages" / f"{uid}.jpg").is_file()
        assert (tiny_data / "SegmentationClass" / f"{uid}.png").is_file()
    assert len(list((tiny_data / "JPEGImages").glob("*.jpg"))) == len(train + val)
    assert len(list((tiny_data / "SegmentationClass").glob("*.png"))) == len(train + val)


def test_classes_txt(tiny_data) -> None:
    lines = (tiny_data / "classes.txt").read_text().splitlines()
    assert lines == CLASS_NAMES
    assert lines[0] == "background" and len(lines) == 7


def test_images_are_rgb_and_masks_are_palette_pngs(tiny_data) -> None:
    size = (TINY_SPEC.image_size, TINY_SPEC.image_size)
    palette = voc_palette()
    for uid in all_uids(tiny_data):
        with Image.open(tiny_data / "JPEGImages" / f"{uid}.jpg") as img:
            assert img.format == "JPEG" and img.mode == "RGB" and img.size == size
        with Image.open(tiny_data / "SegmentationClass" / f"{uid}.png") as png:
            assert png.format == "PNG" and png.mode == "P" and png.size == size
            assert png.getpalette()[:3 * 8] == palette[:3 * 8]  # VOC colours: 1 = (128, 0, 0), ...
    assert palette[3:6] == [128, 0, 0] and palette[255 * 3:256 * 3] == [224, 224, 192]


def test_mask_values_and_objects(tiny_data) -> None:
    with_void = 0
    for uid in all_uids(tiny_data):
        label = mask(tiny_data, uid)
        values = set(np.unique(label).tolist())
        assert values <= VALID_LABELS, (uid, values)
        assert ((label >= 1) & (label < len(CLASS_NAMES))).any(), f"{uid} has no object"
        assert (label == 0).any(), f"{uid} has no background"
        with_void += bool((label == VOID).any())
    # void boundaries are drawn with probability 1/2: some images have them, some not
    assert 0 < with_void < len(all_uids(tiny_data))


def test_void_only_on_class_boundaries(tiny_data) -> None:
    """Void pixels are exactly a subset of the object side of class boundaries."""
    no_void = dataclasses.replace(TINY_SPEC, void_boundary_prob=0.0)
    for index, uid in enumerate(all_uids(tiny_data)):
        label = mask(tiny_data, uid)
        assert np.array_equal(label, render_sample(index, TINY_SPEC)[1]), f"{uid}: PNG differs from the render"
        raw = render_sample(index, no_void)[1]
        void = label == VOID
        assert np.array_equal(label[~void], raw[~void]), uid
        assert not (void & ~boundary(raw)).any(), f"{uid}: void pixel away from any class boundary"
        assert not (void & (raw == 0)).any(), f"{uid}: void on the background side"
        # the same property read from the PNG alone: a void pixel never has all its
        # 4-neighbours in one object class (it would be inside that object)
        padded = np.pad(label.astype(np.int32), 1, constant_values=-1)
        ys, xs = np.nonzero(void)
        for y, x in zip(ys + 1, xs + 1):
            neighbours = {int(v) for v in (padded[y - 1, x], padded[y + 1, x], padded[y, x - 1], padded[y, x + 1])}
            neighbours.discard(-1)
            assert not (len(neighbours) == 1 and neighbours.pop() not in (0, VOID)), (uid, y - 1, x - 1)


def test_every_image_has_an_object_at_the_smallest_allowed_size() -> None:
    """The schema allows data.synthetic.image_size down to 32; images must still hold an object.

    At 32 px some draws are all skipped (< 20 pixels) or a thin object is voided entirely.
    """
    spec = SyntheticSpec(num_train=120, num_val=1, image_size=32, seed=0)
    empty = []
    for index in range(120):
        label = render_sample(index, spec)[1]
        if not ((label >= 1) & (label < len(CLASS_NAMES))).any():
            empty.append(index)
    assert empty == [], f"images without any (non-void) object pixel: {empty}"
