"""The VOC-layout loader on a hand-written VOC folder and on the synthetic set."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage
from torch.utils.data import DataLoader

from ttdl.core.data import (
    DatasetError,
    SegmentationFolder,
    class_names_of,
    read_class_names,
    read_split,
    resize_and_crop,
    split_of,
)
from ttdl.core.degrade import box_labels, degrade_label, rng_for, void_part_labels

VOID = 255
# a hand-made palette (not the generator's): class k -> (40k, 255 - 40k, 7k), void -> light grey
PALETTE = [c for k in range(256) for c in ((40 * k) % 256, (255 - 40 * k) % 256, (7 * k) % 256)]
PALETTE[VOID * 3:VOID * 3 + 3] = [224, 224, 192]


def block_labels(h: int, w: int) -> np.ndarray:
    """Labels constant on 2x2 blocks, so a factor-2 nearest downscale is exact; 7 stands for void."""
    yy, xx = np.mgrid[0:h, 0:w]
    lab = ((yy // 2) * 3 + (xx // 2)) % 8
    return np.where(lab == 7, VOID, lab).astype(np.uint8)


def write_voc_sample(root: Path, uid: str, image: np.ndarray, label: np.ndarray) -> None:
    Image.fromarray(image, mode="RGB").save(root / "JPEGImages" / f"{uid}.jpg", quality=95)
    png = Image.fromarray(label, mode="P")
    png.putpalette(PALETTE)
    png.save(root / "SegmentationClass" / f"{uid}.png")


@pytest.fixture
def voc(tmp_path) -> Path:
    """A VOC2012-like folder: JPEGImages/*.jpg, SegmentationClass/*.png, ImageSets/Segmentation/train.txt.

    - wide:   40x60 (h x w), red channel = 4 * x (a horizontal ramp), block labels
    - tall:   45x30, labels in vertical stripes (non-integer resize factor)
    - square: 20x20, already at the target size
    """
    root = tmp_path / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    h, w = 40, 60
    wide = np.zeros((h, w, 3), np.uint8)
    wide[..., 0] = (np.arange(w) * 4)[None, :]
    wide[..., 1] = 90
    write_voc_sample(root, "2007_000001", wide, block_labels(h, w))
    tall_label = np.zeros((45, 30), np.uint8)
    for x0, cls in ((0, 0), (5, 3), (11, VOID), (13, 15), (20, 1), (26, 0)):
        tall_label[:, x0:] = cls
    write_voc_sample(root, "2007_000002", np.full((45, 30, 3), 128, np.uint8), tall_label)
    write_voc_sample(root, "2007_000003", np.full((20, 20, 3), 30, np.uint8), block_labels(20, 20))
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_000001\n2007_000002\n2007_000003\n")
    return root


def folder(root: Path, **kwargs) -> SegmentationFolder:
    return SegmentationFolder(root, "train", **({"resize": 20, "crop": 16} | kwargs))


# ---- reading, resizing, cropping ---------------------------------------------

def test_reads_voc_layout(voc) -> None:
    ds = folder(voc)
    assert len(ds) == 3 and ds.uids == ["2007_000001", "2007_000002", "2007_000003"]
    batch = next(iter(DataLoader(ds, batch_size=3)))
    assert batch["uid"] == ds.uids
    assert batch["image"].shape == (3, 3, 16, 16) and batch["image"].dtype == torch.float32
    assert batch["mask"].shape == (3, 16, 16) and batch["mask"].dtype == torch.int64
    assert 0.0 <= float(batch["image"].min()) and float(batch["image"].max()) <= 1.0


def test_non_square_image_is_resized_on_the_shorter_side_and_centre_cropped(voc) -> None:
    """40x60 -> shorter side 20 -> 20x30 -> centre 16x16: rows 2..17, columns 7..22."""
    sample = folder(voc)[0]
    assert sample["uid"] == "2007_000001"
    top, left = (20 - 16) // 2, (30 - 16) // 2
    resized = block_labels(40, 60)[::2, ::2]  # exact for labels constant on 2x2 blocks
    expected = torch.from_numpy(resized[top:top + 16, left:left + 16].astype(np.int64))
    assert torch.equal(sample["mask"], expected)
    # the image went through the same geometry: the red ramp 4*x (x in the original) at
    # resized column c is about 4 * (2c + 0.5); after the crop c = j + left
    red = sample["image"][0].mean(0) * 255
    want = torch.tensor([4 * (2 * (j + left) + 0.5) for j in range(16)])
    assert torch.allclose(red, want, atol=6.0), (red, want)
    assert torch.allclose(sample["image"][1], torch.full((16, 16), 90 / 255), atol=0.03)


def test_labels_stay_class_ids_after_a_non_integer_resize(voc) -> None:
    sample = folder(voc)[1]  # 45x30 -> 30x20 (factor 2/3), crop 16
    assert sample["mask"].dtype == torch.int64
    original = {0, 3, VOID, 15, 1}
    values = set(sample["mask"].unique().tolist())
    assert values <= original, values  # nearest: no blended ids such as 2 or 129
    assert len(values) >= 4
    # vertical stripes stay vertical stripes
    assert torch.equal(sample["mask"], sample["mask"][:1].expand(16, 16))


def test_square_image_at_target_size_is_only_cropped(voc) -> None:
    sample = folder(voc)[2]
    expected = torch.from_numpy(block_labels(20, 20)[2:18, 2:18].astype(np.int64))
    assert torch.equal(sample["mask"], expected)


@pytest.mark.parametrize("h, w, resize, crop", [(40, 60, 20, 16), (45, 30, 20, 20), (32, 32, 32, 32),
                                                (32, 32, 32, 48), (40, 60, 40, 48), (20, 50, 30, 40)])
def test_resize_and_crop_always_returns_a_crop_square(h, w, resize, crop) -> None:
    """'Shorter side to `resize`, then a centred `crop` square' -- also when crop > resize."""
    image, label = resize_and_crop(torch.rand(3, h, w), torch.zeros(h, w, dtype=torch.long), resize, crop)
    assert tuple(image.shape) == (3, crop, crop) and tuple(label.shape) == (crop, crop)


def test_synthetic_set_through_the_same_loader(tiny_data) -> None:
    ds = SegmentationFolder(tiny_data, "val", resize=48, crop=48)
    sample = ds[0]
    assert sample["image"].shape == (3, 48, 48) and sample["mask"].shape == (48, 48)
    with Image.open(tiny_data / "SegmentationClass" / f"{sample['uid']}.png") as png:
        assert torch.equal(sample["mask"], torch.from_numpy(np.array(png).astype(np.int64)))


def test_a_run_reads_its_splits_through_its_settings(tiny_run) -> None:
    run = tiny_run(train={"hflip": True}, data={"image_ext": ".jpg"})
    train, val = split_of(run.data, "train", run.train), split_of(run.data, "val", run.train)
    assert (train.hflip, train.seed, val.hflip) == (True, run.train.seed, False)  # only train is augmented
    assert (train.num_classes, train.ignore_index) == (7, 255)  # label values are checked against classes.txt
    assert train.resize == run.data.resize and train.crop == run.data.crop and train.image_ext == ".jpg"
    assert not split_of(run.data, "train").hflip  # without train settings: no augmentation
    assert not split_of(run.data, "train", run.train.replace(hflip=False)).hflip
    assert class_names_of(run.data)[0] == "background"
    assert class_names_of(run.data.replace(class_names=["bg", "thing"])) == ["bg", "thing"]


# ---- deterministic flips -----------------------------------------------------

def test_hflip_is_a_function_of_seed_epoch_and_uid(voc) -> None:
    plain = folder(voc)
    flips = {}
    for seed in (0, 1):
        a, b = folder(voc, hflip=True, seed=seed), folder(voc, hflip=True, seed=seed)
        for epoch in range(8):
            a.set_epoch(epoch)
            b.set_epoch(epoch)
            for index in (2, 0, 1):  # order does not matter
                x, y, ref = a[index], b[index], plain[index]
                assert torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"])
                same = torch.equal(x["mask"], ref["mask"]) and torch.equal(x["image"], ref["image"])
                flipped = (torch.equal(x["mask"], ref["mask"].flip(-1))
                           and torch.equal(x["image"], ref["image"].flip(-1)))
                assert same != flipped, "image and mask must be flipped together or not at all"
                flips[(seed, epoch, x["uid"])] = flipped
    # the coin varies over epochs and seeds (a constant would pass everything above)
    assert 0 < sum(flips.values()) < len(flips)
    assert any(flips[(0, e, u)] != flips[(1, e, u)] for (_, e, u) in flips)
    # without hflip nothing is ever flipped
    off = folder(voc, hflip=False)
    off.set_epoch(3)
    assert torch.equal(off[0]["mask"], plain[0]["mask"])


# ---- failures name the file --------------------------------------------------

def test_missing_image_names_the_file(voc) -> None:
    (voc / "JPEGImages" / "2007_000002.jpg").unlink()
    with pytest.raises(DatasetError, match=r"JPEGImages[/\\]2007_000002\.jpg"):
        folder(voc)


def test_missing_label_names_the_file(voc) -> None:
    (voc / "SegmentationClass" / "2007_000003.png").unlink()
    with pytest.raises(DatasetError, match=r"SegmentationClass[/\\]2007_000003\.png"):
        folder(voc)


@pytest.mark.parametrize("how", ["garbage", "truncated"])
def test_corrupt_png_names_the_file(voc, how) -> None:
    path = voc / "SegmentationClass" / "2007_000001.png"
    data = path.read_bytes()
    path.write_bytes(b"this is not a png" if how == "garbage" else data[: len(data) // 2])
    ds = folder(voc)
    assert torch.is_tensor(ds[1]["mask"])  # other samples still load
    with pytest.raises(DatasetError) as info:
        ds[0]
    assert str(path) in str(info.value)


def test_truncated_jpeg_names_the_file(voc) -> None:
    path = voc / "JPEGImages" / "2007_000001.jpg"
    noise = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, quality=95)  # most of the file is pixel data
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # the header survives: only decoding the pixels finds it
    with Image.open(path) as img:
        assert img.size == (60, 40)
    ds = folder(voc)
    with pytest.raises(DatasetError) as info:
        ds[0]
    assert str(info.value).startswith(f"cannot read dataset file {path}: image file is truncated")
    with pytest.raises(DatasetError, match="image file is truncated"):  # also from a loader's worker process
        next(iter(DataLoader(ds, batch_size=3, num_workers=1)))


def test_label_values_outside_the_classes_name_the_file_and_the_values(voc) -> None:
    ds = folder(voc, num_classes=16)  # the fixture's labels: 0..15 and void
    assert [int(ds[i]["mask"].max()) for i in range(3)] == [VOID, VOID, VOID]  # void is not a class, and allowed
    path = voc / "SegmentationClass" / "2007_000002.png"
    label = np.array(Image.open(path))
    label[0, 0], label[1, 1] = 20, 16
    png = Image.fromarray(label, mode="P")
    png.putpalette(PALETTE)
    png.save(path)
    with pytest.raises(DatasetError) as info:
        ds[1]
    assert str(info.value) == (f"label map {path} holds values [16, 20] outside the classes 0..15 and the ignore "
                               f"index {VOID}; fix the file, or data.class_names / data.ignore_index if they are wrong")
    assert torch.is_tensor(ds[0]["mask"]) and torch.is_tensor(ds[2]["mask"])
    assert torch.is_tensor(folder(voc, num_classes=21)[1]["mask"])  # with 21 classes, 16 and 20 are classes
    assert torch.is_tensor(folder(voc)[1]["mask"])  # without num_classes nothing is checked


def test_rgb_label_map_is_rejected_with_the_file(voc) -> None:
    path = voc / "SegmentationClass" / "2007_000003.png"
    Image.new("RGB", (20, 20), (128, 0, 0)).save(path)
    with pytest.raises(DatasetError, match="2007_000003.png.*palette"):
        folder(voc)[2]


def test_size_mismatch_names_both_files(voc) -> None:
    Image.new("RGB", (21, 20)).save(voc / "JPEGImages" / "2007_000003.jpg")
    with pytest.raises(DatasetError) as info:
        folder(voc)[2]
    assert "2007_000003.jpg" in str(info.value) and "2007_000003.png" in str(info.value)


def test_missing_split_list_says_what_to_do(voc) -> None:
    with pytest.raises(DatasetError) as info:
        SegmentationFolder(voc, "val", resize=20, crop=16)
    message = str(info.value)
    assert str(voc / "ImageSets" / "Segmentation" / "val.txt") in message
    assert "snakemake" in message and "data.root" in message


def test_empty_split_list_is_an_error(voc) -> None:
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("\n\n")
    with pytest.raises(DatasetError, match="empty"):
        read_split(voc, "val")


def test_class_names_from_config_or_classes_txt(voc, tiny_data) -> None:
    assert read_class_names(voc, ["bg", "cat"]) == ["bg", "cat"]
    assert read_class_names(tiny_data, None)[:2] == ["background", "circle"]
    with pytest.raises(DatasetError, match="classes.txt"):
        read_class_names(voc, None)


# ---- degraded train labels (privileged information) ---------------------------

def two_objects() -> np.ndarray:
    """A 12x12 map: a plus of class 2 (box rows 1..5, cols 1..5) with a void pixel in a corner of its box,
    a 2x2 class-3 square in another corner, and a second class-2 object (an L) far from the first."""
    label = np.zeros((12, 12), np.int64)
    label[3, 1:6] = 2
    label[1:6, 3] = 2
    label[5, 5] = VOID
    label[1:3, 1:3] = 3  # in a corner of the plus's box, not touching the plus
    label[8:11, 8] = 2
    label[10, 8:11] = 2
    return label


def test_box_labels_turn_each_object_into_its_bounding_box() -> None:
    label = two_objects()
    out = box_labels(label, VOID)
    want = np.zeros_like(label)
    want[1:6, 1:6] = 2  # the plus's box (the larger object is drawn first) ...
    want[1:3, 1:3] = 3  # ... the smaller square stays on top
    want[5, 5] = VOID  # void stays void
    want[8:11, 8:11] = 2  # the L: its own box, not one box around both class-2 objects
    assert np.array_equal(out, want), out
    assert np.array_equal(label, two_objects())  # the input is not changed


def test_void_part_voids_a_half_plane_share_of_every_object_only() -> None:
    label = np.zeros((40, 40), np.int64)
    yy, xx = np.mgrid[0:40, 0:40]
    label[(yy - 12) ** 2 + (xx - 12) ** 2 <= 64] = 1  # a disc of class 1
    label[25:35, 22:38] = 4  # a rectangle of class 4
    label[0, :] = VOID
    for fraction in (0.5, 0.25):
        out = void_part_labels(label, VOID, fraction, rng_for(0, "a"))
        for cls in (1, 4):
            n = int((label == cls).sum())
            voided = (label == cls) & (out == VOID)
            assert voided.sum() == round(fraction * n)
            assert ((label == cls) & (out == cls)).sum() == n - round(fraction * n)  # the rest keeps its class
            # a half-plane cut of a convex object leaves one connected part on each side
            assert ndimage.label(voided)[1] == 1 and ndimage.label((label == cls) & ~voided)[1] == 1
        assert np.array_equal(out[label == 0], label[label == 0]) and (out[0] == VOID).all()
    assert np.array_equal(void_part_labels(label, VOID, 0.0, rng_for(0, "a")), label)
    assert (void_part_labels(label, VOID, 1.0, rng_for(0, "a"))[label != 0] == VOID).all()


def test_void_part_is_fixed_per_seed_and_image() -> None:
    label = two_objects()
    kw = {"fraction": 0.5, "ignore_index": VOID}
    runs = [degrade_label(label, "void_part", seed=0, uid="u1", **kw) for _ in range(3)]
    assert all(np.array_equal(r, runs[0]) for r in runs)
    others = [degrade_label(label, "void_part", seed=s, uid=u, **kw) for s, u in ((1, "u1"), (0, "u2"), (2, "u3"))]
    assert any(not np.array_equal(o, runs[0]) for o in others)  # the cut differs between images and seeds
    assert np.array_equal(degrade_label(label, "none", seed=0, uid="u1", **kw), label)
    with pytest.raises(ValueError, match="unknown label degradation"):
        degrade_label(label, "blur", seed=0, uid="u1", **kw)


@pytest.mark.parametrize("kind", ["box", "void_part"])
def test_degraded_train_split_keeps_the_clean_label_and_flips_both(tiny_run, kind) -> None:
    run = tiny_run(train={"hflip": True}, data={"degrade_labels": {"kind": kind}})
    assert run.data.degrade_labels.active and run.data.degrade_labels.fraction == 0.5
    train = split_of(run.data, "train", run.train)
    plain = split_of(run.data, "train")  # no train settings: neither flipped nor degraded
    assert "clean_mask" not in plain[0]
    changed, flipped = 0, 0
    for epoch in range(4):
        train.set_epoch(epoch)
        for index in range(4):
            sample, ref = train[index], plain[index]
            flip = torch.equal(sample["image"], ref["image"].flip(-1)) and not torch.equal(sample["image"],
                                                                                           ref["image"])
            flipped += flip
            clean = ref["mask"].flip(-1) if flip else ref["mask"]
            assert torch.equal(sample["clean_mask"], clean)  # the describer's label: clean, flipped with the image
            degraded = torch.from_numpy(degrade_label(ref["mask"].numpy(), kind, fraction=0.5, seed=0,
                                                      uid=ref["uid"], ignore_index=VOID))
            assert torch.equal(sample["mask"], degraded.flip(-1) if flip else degraded)  # fixed over epochs
            assert sample["mask"].dtype == sample["clean_mask"].dtype == torch.int64
            changed += not torch.equal(sample["mask"], sample["clean_mask"])
    assert changed > 0 and 0 < flipped < 16
    batch = next(iter(DataLoader(train, batch_size=3)))
    assert batch["clean_mask"].shape == batch["mask"].shape == (3, run.data.crop, run.data.crop)


def test_validation_and_undegraded_runs_read_clean_labels(tiny_run) -> None:
    run = tiny_run(data={"degrade_labels": {"kind": "box"}})
    val, plain_val = split_of(run.data, "val", run.train), split_of(run.data, "val")
    for ds in (val, plain_val, split_of(run.data, "train")):
        assert ds.degrade is None and "clean_mask" not in ds[0]
    assert torch.equal(val[0]["mask"], plain_val[0]["mask"])
    default = tiny_run()
    assert default.data.degrade_labels.kind == "none" and not default.data.degrade_labels.active
    assert "clean_mask" not in split_of(default.data, "train", default.train)[0]
