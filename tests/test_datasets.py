"""Real datasets: VOC 2012 and COCO 2017 fixtures in their exact layouts, the data check,
the opt-in VOC download, the voc/coco overlays and the workflow rules around them."""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import check_data  # the thin CLIs in scripts/ (pytest's pythonpath), called in-process
import download_voc
import prepare_coco
from conftest import REPO
from snakemake_helpers import SNAKEMAKE, copy_repo, job_stats
from ttdl.core.config import deep_merge, resolve_run, validate_config
from ttdl.core.data import DatasetError, SegmentationFolder, read_class_names
from ttdl.datasets.coco import (
    VOC_CLASSES,
    CocoError,
    convert_coco,
    decode_rle,
    paint_label,
    polygon_mask,
    voc_index_of_categories,
)
from ttdl.datasets.voc_check import (
    DataCheckError,
    check_dataset,
    check_fingerprint,
    check_inputs,
    check_record,
    coco_record,
    dataset_key,
    files_digest,
    key_pattern,
    lists_fingerprint,
    real_datasets,
)

VOID = 255
PERSON, CAR, SOFA, DININGTABLE = (VOC_CLASSES.index(n) for n in ("person", "car", "sofa", "diningtable"))


# ---- a VOCdevkit/VOC2012 fixture -------------------------------------------------------

def palette_png(label: np.ndarray, path: Path) -> None:
    label = np.ascontiguousarray(label, dtype=np.uint8)
    png = Image.frombytes("P", (label.shape[1], label.shape[0]), label.tobytes())
    png.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    png.save(path)


def voc_label(h: int, w: int, cls: int) -> np.ndarray:
    """Background, one object of `cls` and VOC's void outline around it."""
    label = np.zeros((h, w), np.uint8)
    label[4:h - 4, 6:w - 6] = VOID
    label[5:h - 5, 7:w - 7] = cls
    return label


@pytest.fixture
def voc(tmp_path) -> Path:
    """VOCdevkit/VOC2012 exactly as the devkit unpacks: 2 train ids, 1 val id."""
    root = tmp_path / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation", "Annotations"):
        (root / sub).mkdir(parents=True)
    samples = {"2007_000032": (24, 32, 1), "2007_000039": (30, 20, 20), "2007_000033": (28, 28, 15)}
    for uid, (h, w, cls) in samples.items():
        Image.fromarray(np.full((h, w, 3), 60 + cls, np.uint8)).save(root / "JPEGImages" / f"{uid}.jpg")
        palette_png(voc_label(h, w, cls), root / "SegmentationClass" / f"{uid}.png")
    (root / "ImageSets/Segmentation/train.txt").write_text("2007_000032\n2007_000039\n")
    (root / "ImageSets/Segmentation/val.txt").write_text("2007_000033\n")
    return root


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_voc_layout_reads_through_the_default_loader_with_void(voc) -> None:
    ds = SegmentationFolder(voc, "val", resize=28, crop=28)
    sample = ds[0]
    assert sample["uid"] == "2007_000033"
    assert np.array_equal(sample["mask"].numpy(), voc_label(28, 28, 15))  # 255 kept for ignore_index
    assert len(SegmentationFolder(voc, "train", resize=16, crop=16)) == 2


def test_check_passes_and_reports_counts_sha256_and_label_pixels(voc) -> None:
    lists = voc / "ImageSets" / "Segmentation"
    report = check_dataset(voc, expected_counts={"train": 2, "val": 1}, class_names=VOC_CLASSES,
                           split_sha256={"train": sha256(lists / "train.txt")})
    assert report["ok"] and report["num_classes"] == 21
    train, val = report["splits"]["train"], report["splits"]["val"]
    assert (train["count"], val["count"]) == (2, 1)
    assert train["sha256"] == sha256(lists / "train.txt") and train["sha256_verified"] is True
    assert val["sha256"] == sha256(lists / "val.txt") and val["sha256_verified"] is None  # reported, not pinned
    label = voc_label(28, 28, 15)
    assert val["label_pixels"] == {str(v): int((label == v).sum()) for v in (0, 15, VOID)}


def failure(voc: Path, **kwargs) -> str:
    with pytest.raises(DataCheckError) as info:
        check_dataset(voc, **({"class_names": VOC_CLASSES} | kwargs))
    return str(info.value)


def assert_explains_where_to_get_voc(message: str) -> None:
    for needle in ("host.robots.ox.ac.uk/pascal/VOC/voc2012", "VOCtrainval_11-May-2012.tar", "VOCdevkit/VOC2012",
                   "JPEGImages", "SegmentationClass", "ImageSets/Segmentation/train.txt", "data.root",
                   "download_voc"):
        assert needle in message, needle


def test_missing_root_explains_where_to_get_voc(tmp_path) -> None:
    message = failure(tmp_path / "nowhere" / "VOC2012")
    assert str(tmp_path / "nowhere" / "VOC2012") in message
    assert_explains_where_to_get_voc(message)


def test_missing_split_list(voc) -> None:
    (voc / "ImageSets/Segmentation/val.txt").unlink()
    message = failure(voc)
    assert f"split list missing: {voc / 'ImageSets/Segmentation/val.txt'}" in message
    assert_explains_where_to_get_voc(message)


def test_voc2012_counts_are_enforced(voc) -> None:
    message = failure(voc, expected_counts={"train": 1464, "val": 1449})
    assert "lists 2 images, expected 1464 (data.expected_counts.train)" in message
    assert "lists 1 images, expected 1449 (data.expected_counts.val)" in message


def test_split_sha256_mismatch(voc) -> None:
    wrong = "0" * 64
    message = failure(voc, split_sha256={"val": wrong})
    assert f"expected {wrong} (data.split_sha256.val)" in message
    assert sha256(voc / "ImageSets/Segmentation/val.txt") in message


def test_every_problem_is_listed_with_the_files(voc) -> None:
    (voc / "JPEGImages" / "2007_000039.jpg").unlink()
    (voc / "ImageSets/Segmentation/val.txt").write_text("2007_000033\n2007_000032\n2007_000033\n")
    message = failure(voc)
    assert str(voc / "JPEGImages" / "2007_000039.jpg") in message
    assert "lists ids more than once: 2007_000033" in message
    assert "listed in both train.txt and val.txt" in message and "2007_000032" in message


@pytest.mark.parametrize("damage, needles", [
    ("rgb", ["mode RGB", "palette"]),
    ("value", ["label values [30]", "outside 0..20"]),
    ("size", ["is 31x24 but"]),
])
def test_unusable_labels_name_the_file(voc, damage, needles) -> None:
    label_path = voc / "SegmentationClass" / "2007_000032.png"
    if damage == "rgb":
        Image.new("RGB", (32, 24), (128, 0, 0)).save(label_path)
    elif damage == "value":
        label = voc_label(24, 32, 1)
        label[0, 0] = 30
        palette_png(label, label_path)
    else:
        palette_png(np.zeros((24, 31), np.uint8), label_path)
    message = failure(voc)
    assert str(label_path) in message
    for needle in needles:
        assert needle in message


def test_check_data_cli_writes_the_report_or_exits_1_with_the_explanation(voc, tmp_path, capsys) -> None:
    out = tmp_path / "checks" / "check.json"
    data = {"root": str(voc), "kind": "folder", "class_names": VOC_CLASSES, "expected_counts": {"train": 2, "val": 1}}
    assert check_data.main(["--data-json", json.dumps(data), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["splits"]["train"]["count"] == 2
    out.unlink()
    assert check_data.main(["--root", str(voc), "--voc2012", "--out", str(out)]) == 1
    assert not out.exists()
    err = capsys.readouterr().err
    assert "expected 1464" in err and "host.robots.ox.ac.uk" in err and "Traceback" not in err
    # the section is validated against the schema before anything is read
    assert check_data.main(["--data-json", json.dumps(data | {"kind": "voc"}), "--out", str(out)]) == 1
    assert "data.kind" in capsys.readouterr().err and not out.exists()


def test_dataset_key_is_readable_and_distinguishes_roots() -> None:
    a, b = dataset_key("/data/VOCdevkit/VOC2012"), dataset_key("resources/VOCdevkit/VOC2012")
    assert a.startswith("VOC2012-") and b.startswith("VOC2012-") and a != b
    assert "/" not in a and dataset_key("/data/VOCdevkit/VOC2012") == a
    assert check_record("/data/VOCdevkit/VOC2012") == f"resources/data_checks/{a}/check.json"


def test_workflow_glue_keys_and_fingerprint(voc) -> None:
    synthetic = {"kind": "synthetic", "root": "resources/data/synthetic"}
    folder = {"kind": "folder", "root": str(voc), "resize": 520, "image_ext": ".jpg"}
    datasets = real_datasets([synthetic, folder, folder | {"resize": 64}])
    assert list(datasets) == [dataset_key(str(voc))] and datasets[dataset_key(str(voc))]["resize"] == 520
    assert not re.fullmatch(key_pattern(datasets, ("coco",)), dataset_key(str(voc)))
    assert re.fullmatch(key_pattern(datasets, ("folder",)), dataset_key(str(voc)))
    assert not re.fullmatch(key_pattern(datasets, ("folder",)), dataset_key(str(voc)) + "x")
    assert check_inputs(folder) == [] and check_inputs({"kind": "coco", "root": "x"}) == [coco_record("x")]
    before = lists_fingerprint(folder)
    assert before == check_fingerprint(folder)  # what rule check_data tracks (its param `lists`)
    val = voc / "ImageSets/Segmentation/val.txt"
    os.utime(val, (1, 1))
    assert lists_fingerprint(folder) == before  # a touched list is the same list
    val.write_text("2007_000033\n2007_000032\n")
    assert lists_fingerprint(folder) != before
    assert lists_fingerprint({"kind": "coco", "root": str(voc)}) == "prepared by prepare_coco"


def test_fingerprint_follows_every_listed_file(voc) -> None:
    folder = {"kind": "folder", "root": str(voc), "image_ext": ".jpg"}
    seen = {check_fingerprint(folder)}
    label = voc / "SegmentationClass" / "2007_000039.png"
    os.utime(label, ns=(label.stat().st_atime_ns, label.stat().st_mtime_ns + 1))  # rewritten, same size
    seen.add(check_fingerprint(folder))
    palette_png(voc_label(30, 20, 19), label)  # edited
    seen.add(check_fingerprint(folder))
    (voc / "JPEGImages" / "2007_000033.jpg").unlink()  # gone
    seen.add(check_fingerprint(folder))
    assert len(seen) == 4
    unlisted = voc / "SegmentationClass" / "2099_000001.png"
    palette_png(voc_label(8, 8, 1), unlisted)  # a file no list names does not matter
    assert check_fingerprint(folder) in seen
    assert check_fingerprint(folder | {"image_ext": ".png"}) not in seen


def test_re_extracting_the_same_archive_keeps_the_fingerprint(voc, tmp_path) -> None:
    """tar restores the archived mtimes, so unpacking VOC again does not re-check and retrain everything."""
    archive = tmp_path / "voc.tar"
    archive.write_bytes(tar_of(voc))
    dest = tmp_path / "unpacked"
    folder = {"kind": "folder", "root": str(dest / "VOCdevkit" / "VOC2012"), "image_ext": ".jpg"}
    fingerprints = []
    for _ in range(2):
        shutil.rmtree(dest, ignore_errors=True)
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter="data")
        fingerprints.append(check_fingerprint(folder))
    assert fingerprints[0] == fingerprints[1]


def noisy_jpeg(path: Path, h: int, w: int) -> None:
    """A JPEG that is mostly pixel data, so cutting it in half keeps its header."""
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=95)


def test_truncated_jpeg_fails_the_check_naming_the_file(voc) -> None:
    path = voc / "JPEGImages" / "2007_000039.jpg"
    noisy_jpeg(path, 30, 20)
    check_dataset(voc, class_names=VOC_CLASSES)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with Image.open(path) as img:
        assert img.size == (20, 30)  # the header alone looks fine
    message = failure(voc)
    assert f"1 unusable sample(s) in train.txt: cannot decode image {path}: image file is truncated (" in message
    assert_explains_where_to_get_voc(message)


def test_check_decodes_in_parallel_and_records_what_it_read(voc, capsys) -> None:
    reports = [check_dataset(voc, class_names=VOC_CLASSES, workers=n) for n in (1, 3)]
    assert reports[0] == reports[1]
    report = reports[0]
    expected = hashlib.sha256()
    for uid in ("2007_000032", "2007_000039"):
        expected.update(f"{uid}:{sha256(voc / 'JPEGImages' / f'{uid}.jpg')}:"
                        f"{sha256(voc / 'SegmentationClass' / f'{uid}.png')}\n".encode())
    assert report["splits"]["train"]["files_sha256"] == expected.hexdigest()
    assert report["files_fingerprint"] == files_digest(voc, ".jpg") and report["ignore_index"] == VOID
    check_dataset(voc, class_names=VOC_CLASSES, progress=True)
    err = capsys.readouterr().err
    assert "decoding train (" in err and "2/2" in err and "decoding val (" in err and "1/1" in err


def test_a_label_edited_after_a_passing_check_is_caught_by_the_recheck_and_the_loader(voc) -> None:
    folder = {"kind": "folder", "root": str(voc), "image_ext": ".jpg"}
    check_dataset(voc, class_names=VOC_CLASSES)
    before = check_fingerprint(folder)
    path = voc / "SegmentationClass" / "2007_000033.png"
    label = voc_label(28, 28, 15)
    label[14, 14] = 27
    palette_png(label, path)
    assert check_fingerprint(folder) != before  # so the workflow runs check_data again
    message = failure(voc)
    assert f"1 unusable sample(s) in val.txt: {path} holds label values [27] outside 0..20 and void 255" in message
    with pytest.raises(DatasetError) as info:
        SegmentationFolder(voc, "val", resize=28, crop=28, num_classes=21)[0]
    assert str(info.value) == (f"label map {path} holds values [27] outside the classes 0..20 and the ignore index "
                               f"255; fix the file, or data.class_names / data.ignore_index if they are wrong")


# ---- COCO RLE and polygons (decoded by pycocotools; checked against hand-computed masks) ----

def encode_counts(counts: list[int]) -> str:
    """COCO's rleToString (maskApi.c), written independently for the tests."""
    out = []
    for i, x in enumerate(counts):
        if i > 2:
            x -= counts[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if c & 0x10 else (x != 0)
            out.append(chr((c | 0x20 if more else c) + 48))
    return "".join(out)


def counts_of(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE counts: runs over the column-major pixels, starting with 0s."""
    flat = mask.T.ravel().astype(np.uint8)
    counts, value, run = [], 0, 0
    for pixel in flat:
        if pixel != value:
            counts.append(run)
            value, run = pixel, 0
        run += 1
    return counts + [run]


def test_compressed_rle_hand_vectors() -> None:
    # '5','3','4' are plain 5-bit groups; 'O' (31) is -1 with the sign bit, added to the count
    # two back (3) -> 2; 'T3' is 100 = 4 + 3<<5 with the continuation bit on 'T'.
    assert encode_counts([5, 3, 4, 2]) == "534O" and encode_counts([100]) == "T3"
    # runs 5 off, 3 on, 4 off, 2 on, walking a 2x7 image column by column
    assert decode_rle({"size": [2, 7], "counts": "534O"}).astype(int).tolist() == [[0, 0, 0, 1, 0, 0, 1],
                                                                                  [0, 0, 1, 1, 0, 0, 1]]
    assert not decode_rle({"size": [10, 10], "counts": "T3"}).any()
    rng = np.random.default_rng(0)
    counts = [int(v) for v in rng.integers(1, 5000, size=40)]
    h = sum(counts) // 7 + 1
    counts[-1] += h * 7 - sum(counts)
    mask = decode_rle({"size": [h, 7], "counts": encode_counts(counts)})
    assert np.array_equal(mask, decode_rle({"size": [h, 7], "counts": counts})) and counts_of(mask) == counts


@pytest.mark.parametrize("counts, reason", [
    ("53", "does not cover exactly"),   # runs for 8 of the 14 pixels
    ("534O5", "Invalid RLE"),           # one run too many
    ("T", "complete compressed RLE"),   # the last group announces another one
    ("5a~", "complete compressed RLE"),  # '~' is outside the alphabet
    ([5, 3, 4], "sum to 12, expected 2x7=14"),
    ([5, -3, 4, 8], "negative run length"),
])
def test_malformed_rle_is_rejected_before_pycocotools_trusts_it(counts, reason) -> None:
    with pytest.raises(ValueError, match=reason):
        decode_rle({"size": [2, 7], "counts": counts})


def test_rle_is_column_major_and_both_forms_agree() -> None:
    assert decode_rle({"size": [2, 3], "counts": [1, 2, 3]}).tolist() == [[False, True, False],
                                                                          [True, False, False]]
    mask = np.random.default_rng(1).random((13, 17)) > 0.6
    counts = counts_of(mask)
    assert np.array_equal(decode_rle({"size": [13, 17], "counts": counts}), mask)
    assert np.array_equal(decode_rle({"size": [13, 17], "counts": encode_counts(counts)}), mask)
    with pytest.raises(ValueError, match="sum to"):
        decode_rle({"size": [13, 17], "counts": counts[:-1]})


def test_the_shared_palette_is_vocs() -> None:
    from ttdl.datasets.synthetic import voc_palette
    palette = voc_palette()
    assert palette[:6] == [0, 0, 0, 128, 0, 0]  # background, aeroplane
    assert palette[15 * 3:15 * 3 + 3] == [192, 128, 128]  # person
    assert palette[255 * 3:] == [224, 224, 192]  # void


def test_polygon_fill_and_degenerate_parts() -> None:
    # COCO's pixel grid: pixel (x, y) covers [x, x+1) x [y, y+1), so the rectangle with corners
    # (2, 1) and (6, 3) covers columns 2..5 and rows 1..2: 8 pixels, its geometric area.
    mask = polygon_mask([[2, 1, 6, 1, 6, 3, 2, 3], [0, 0, 1, 1]], h=5, w=8)  # second part: 2 points, no area
    expected = np.zeros((5, 8), bool)
    expected[1:3, 2:6] = True
    assert np.array_equal(mask, expected)
    assert not polygon_mask([[0, 0, 1, 1]], h=5, w=8).any()


def test_polygon_parts_are_united_and_clipped_to_the_image() -> None:
    mask = polygon_mask([[0, 0, 3, 0, 3, 2, 0, 2], [2, 1, 5, 1, 5, 4, 2, 4], [6, 3, 9, 3, 9, 9, 6, 9]], h=5, w=8)
    expected = np.zeros((5, 8), bool)
    expected[0:2, 0:3] = True   # first part
    expected[1:4, 2:5] = True   # second part, overlapping the first
    expected[3:5, 6:8] = True   # third part, cut at the image's right and bottom edges
    assert np.array_equal(mask, expected)


def test_paint_order_is_by_area_not_file_order_and_crowd_is_void() -> None:
    voc_index = voc_index_of_categories([{"id": 1, "name": "person"}, {"id": 3, "name": "car"},
                                         {"id": 25, "name": "giraffe"}])
    small = {"id": 1, "category_id": 3, "area": 4, "segmentation": [[2, 2, 4, 2, 4, 4, 2, 4]]}
    large = {"id": 2, "category_id": 1, "area": 64, "segmentation": [[0, 0, 8, 0, 8, 8, 0, 8]]}
    crowd = {"id": 3, "category_id": 1, "area": 4, "iscrowd": 1, "segmentation": [[5, 5, 7, 5, 7, 7, 5, 7]]}
    giraffe = {"id": 4, "category_id": 25, "area": 4, "segmentation": [[0, 0, 2, 0, 2, 2, 0, 2]]}
    label = paint_label({"height": 8, "width": 8}, [small, giraffe, crowd, large], voc_index)
    assert (label[2:4, 2:4] == CAR).all()      # painted after the larger person
    assert (label[5:7, 5:7] == VOID).all()     # crowd of a VOC class
    assert (label[0:2, 0:2] == PERSON).all()   # a non-VOC object does not erase anything
    assert set(np.unique(label)) == {PERSON, CAR, VOID}


# ---- a COCO 2017 fixture ----------------------------------------------------------------

def rect(x0, y0, x1, y1) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


@pytest.fixture
def coco(tmp_path) -> Path:
    """COCO 2017 layout: annotations/instances_{train,val}2017.json, {train,val}2017/*.jpg."""
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    categories = [{"id": 1, "name": "person", "supercategory": "person"},
                  {"id": 3, "name": "car", "supercategory": "vehicle"},
                  {"id": 25, "name": "giraffe", "supercategory": "animal"},
                  {"id": 63, "name": "couch", "supercategory": "furniture"},
                  {"id": 67, "name": "dining table", "supercategory": "furniture"}]
    car = np.zeros((30, 40), bool)
    car[10:15, 10:16] = True
    crowd = np.zeros((30, 40), bool)
    crowd[0:6, 32:40] = True
    only_crowd = np.ones((20, 20), bool)
    train = {
        "images": [{"id": 139, "file_name": "000000000139.jpg", "height": 30, "width": 40},
                   {"id": 5, "file_name": "000000000005.jpg", "height": 20, "width": 20},
                   {"id": 7, "file_name": "000000000007.jpg", "height": 20, "width": 20},
                   {"id": 9, "file_name": "000000000009.jpg", "height": 20, "width": 20}],
        "annotations": [
            {"id": 11, "image_id": 139, "category_id": 3, "iscrowd": 0, "area": 30.0, "bbox": [10, 10, 6, 5],
             "segmentation": {"size": [30, 40], "counts": encode_counts(counts_of(car))}},
            {"id": 10, "image_id": 139, "category_id": 1, "iscrowd": 0, "area": 672.0, "bbox": [2, 2, 28, 24],
             "segmentation": [rect(2, 2, 30, 26)]},
            {"id": 12, "image_id": 139, "category_id": 1, "iscrowd": 1, "area": 48.0, "bbox": [32, 0, 8, 6],
             "segmentation": {"size": [30, 40], "counts": counts_of(crowd)}},
            {"id": 13, "image_id": 139, "category_id": 25, "iscrowd": 0, "area": 45.0, "bbox": [34, 20, 5, 9],
             "segmentation": [rect(34, 20, 39, 29)]},
            {"id": 14, "image_id": 5, "category_id": 25, "iscrowd": 0, "area": 100.0, "bbox": [0, 0, 10, 10],
             "segmentation": [rect(0, 0, 10, 10)]},
            {"id": 15, "image_id": 7, "category_id": 1, "iscrowd": 1, "area": 400.0, "bbox": [0, 0, 20, 20],
             "segmentation": {"size": [20, 20], "counts": counts_of(only_crowd)}},
        ],
        "categories": categories,
    }
    val = {
        "images": [{"id": 200, "file_name": "000000000200.jpg", "height": 16, "width": 16}],
        "annotations": [
            {"id": 20, "image_id": 200, "category_id": 63, "iscrowd": 0, "area": 48.0, "bbox": [2, 2, 8, 6],
             "segmentation": [rect(2, 2, 10, 8)]},
            {"id": 21, "image_id": 200, "category_id": 67, "iscrowd": 0, "area": 9.0, "bbox": [4, 4, 3, 3],
             "segmentation": [rect(4, 4, 7, 7)]},
        ],
        "categories": categories,
    }
    for split, data in (("train2017", train), ("val2017", val)):
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
        (root / split).mkdir()
        for image in data["images"]:
            pixels = np.full((image["height"], image["width"], 3), image["id"] % 200, np.uint8)
            Image.fromarray(pixels).save(root / split / image["file_name"], quality=95)
    return root


def expected_coco_train() -> np.ndarray:
    label = np.zeros((30, 40), np.uint8)
    label[2:26, 2:30] = PERSON   # COCO's pixel grid: x 2..30 covers columns 2..29 (28x24 = its area)
    label[10:15, 10:16] = CAR    # smaller, listed first in the file, still on top
    label[0:6, 32:40] = VOID     # crowd person; the giraffe at 34..39 x 20..29 stays background
    return label


def expected_coco_val() -> np.ndarray:
    label = np.zeros((16, 16), np.uint8)
    label[2:8, 2:10] = SOFA
    label[4:7, 4:7] = DININGTABLE
    return label


def test_coco_converts_to_a_voc_folder_the_loader_and_the_check_read(coco, tmp_path) -> None:
    out = tmp_path / "coco_voc"
    manifest = convert_coco(coco, out, {"train": "train2017", "val": "val2017"})
    assert (out / "ImageSets/Segmentation/train.txt").read_text() == "000000000139\n"
    assert (out / "ImageSets/Segmentation/val.txt").read_text() == "000000000200\n"
    train = manifest["splits"]["train"]
    counts = (train["images"], train["written"], train["skipped_no_voc_pixels"], train["crowd_annotations"])
    assert counts == (4, 1, 3, 1)
    assert "tv" in train["missing_categories"] and "couch" not in train["missing_categories"]
    assert train["class_pixels"]["car"] == 30 and train["class_pixels"]["void"] == 48
    assert read_class_names(out, None) == VOC_CLASSES
    for split, expected in (("train", expected_coco_train()), ("val", expected_coco_val())):
        h, w = expected.shape
        sample = SegmentationFolder(out, split, resize=min(h, w), crop=min(h, w))[0]
        top, left = (h - min(h, w)) // 2, (w - min(h, w)) // 2
        assert np.array_equal(sample["mask"].numpy(), expected[top:top + min(h, w), left:left + min(h, w)])
    with Image.open(out / "SegmentationClass" / "000000000139.png") as png:
        assert png.mode == "P" and np.array_equal(np.array(png), expected_coco_train())
    assert (out / "JPEGImages/000000000139.jpg").read_bytes() == (coco / "train2017/000000000139.jpg").read_bytes()
    report = check_dataset(out, kind="coco")
    assert report["num_classes"] == 21 and report["splits"]["val"]["label_pixels"][str(SOFA)] == 48 - 9


def test_coco_limit_missing_files_and_bad_rle(coco, tmp_path) -> None:
    manifest = convert_coco(coco, tmp_path / "a", {"val": "val2017"}, max_images={"val": 1})
    assert manifest["splits"]["val"]["written"] == 1
    with pytest.raises(CocoError, match="cocodataset.org"):
        convert_coco(tmp_path / "no_coco", tmp_path / "b", {"train": "train2017"})
    (coco / "train2017" / "000000000139.jpg").unlink()
    with pytest.raises(CocoError, match="000000000139.jpg"):
        convert_coco(coco, tmp_path / "c", {"train": "train2017"})
    path = coco / "annotations" / "instances_val2017.json"
    data = json.loads(path.read_text())
    data["annotations"][0]["segmentation"] = {"size": [15, 16], "counts": [240]}
    path.write_text(json.dumps(data))
    with pytest.raises(CocoError, match=r"annotation 20: RLE size \[15, 16\]"):
        convert_coco(coco, tmp_path / "d", {"val": "val2017"})


def test_prepare_coco_cli(coco, tmp_path) -> None:
    out, manifest = tmp_path / "coco_voc", tmp_path / "m" / "coco.json"
    data = {"root": str(out), "coco": {"root": str(coco), "splits": {"val": "val2017"}, "max_images": {}}}
    assert prepare_coco.main(["--data-json", json.dumps(data), "--out", str(manifest)]) == 0
    assert json.loads(manifest.read_text())["splits"]["val"]["written"] == 1
    assert prepare_coco.main(["--data-json", json.dumps(data | {"coco": {"root": str(tmp_path / "x")}}),
                              "--out", str(tmp_path / "m2.json")]) == 1
    empty = data | {"coco": {"root": str(coco), "splits": {}}}
    assert prepare_coco.main(["--data-json", json.dumps(empty), "--out", str(tmp_path / "m3.json")]) == 1
    assert not (tmp_path / "m2.json").exists() and not (tmp_path / "m3.json").exists()


# ---- opt-in VOC download ----------------------------------------------------------------

class FakeResponse:
    def __init__(self, payload: bytes):
        self.payload, self.headers = payload, {"content-length": str(len(payload))}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def raise_for_status(self) -> None:
        pass

    def iter_content(self, chunk_size: int):
        for i in range(0, len(self.payload), 1000):
            yield self.payload[i:i + 1000]


class FakeSession:
    def __init__(self, payload: bytes):
        self.payload, self.urls = payload, []

    def get(self, url, stream, timeout):
        assert stream, "the 2 GB archive must be streamed"
        self.urls.append(url)
        return FakeResponse(self.payload)


def tar_of(voc: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(voc.parent, arcname="VOCdevkit")
    return buffer.getvalue()


def test_download_voc_streams_verifies_unpacks_and_checks(voc, tmp_path) -> None:
    payload = tar_of(voc)
    dest, out = tmp_path / "resources", tmp_path / "resources" / "VOCdevkit" / "download_voc.json"
    url = "http://mirror.invalid/VOCtrainval_11-May-2012.tar"
    args = ["--url", url, "--dest", str(dest), "--out", str(out), "--expect-counts", "any"]
    bad = FakeSession(payload)
    assert download_voc.main([*args, "--md5", "0" * 32], session=bad) == 1
    assert bad.urls == [url] and not (dest / "VOCdevkit").exists() and not list(dest.glob("*.part"))
    good = FakeSession(payload)
    assert download_voc.main([*args, "--md5", hashlib.md5(payload).hexdigest()], session=good) == 0
    root = dest / "VOCdevkit" / "VOC2012"
    assert (root / "ImageSets/Segmentation/val.txt").read_text() == "2007_000033\n"
    assert not (dest / "VOCtrainval_11-May-2012.tar").exists()  # archive removed after a good unpack
    manifest = json.loads(out.read_text())
    assert manifest["check"]["splits"]["train"]["count"] == 2 and manifest["url"] == url


def test_download_defaults_to_the_official_archive_and_md5() -> None:
    assert download_voc.OFFICIAL_URL == "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar"
    assert download_voc.VOC_MD5 == "6cd6e144f989b92b3379bac3b3de84fd"


# ---- config overlays ------------------------------------------------------------------

def overlay(*names: str) -> dict:
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    for name in names:
        config = deep_merge(config, yaml.safe_load((REPO / "config" / name).read_text()))
    return validate_config(config, source=f"config.yaml + {names}")


def test_voc_overlay_is_the_seed_reference_profile_over_the_same_matrix() -> None:
    config = overlay("voc.yaml")
    shipped = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    assert set(config["runs"]) == set(shipped["runs"]) and config["summary"] == shipped["summary"]
    for run_id in shipped["runs"]:
        run = resolve_run(config, run_id)
        text = run["objective"]["name"] != "none" or run_id in ("ft_ce", "3.1/ce")
        assert run["train"]["batch_size"] == (32 if text else 8), run_id
        assert run["train"]["epochs"] == (50 if run_id == "3.1/ce" else 25), run_id
        assert (run["train"]["lr"], run["train"]["warmup_steps"], run["train"]["amp"]) == (1e-4, 200, "bf16"), run_id
        assert (run["data"]["resize"], run["data"]["crop"], run["data"]["kind"]) == (520, 520, "folder")
        assert run["data"]["expected_counts"] == {"train": 1464, "val": 1449}
        assert (run["describer"]["model"], run["describer"]["temperature"]) == ("gemma3:12b-it-qat", 0.1)
        assert (run["describer"]["seed"], run["describer"]["image_size"], run["cache"]["percentile"]) == (42, 224, 0.4)
    assert resolve_run(config, "good_ckp")["train"]["target_miou"] == 0.30
    assert len(config["data"]["class_names"]) == 21 and config["data"]["class_names"][15] == "person"


def test_coco_overlay_layers_over_voc() -> None:
    config = overlay("voc.yaml", "coco.yaml")
    data = resolve_run(config, "3.3")["data"]
    assert data["kind"] == "coco" and data["coco"]["splits"] == {"train": "train2017", "val": "val2017"}
    assert data["expected_counts"] is None and data["resize"] == 520 and data["class_names"] == VOC_CLASSES


# ---- the workflow: check before training, COCO conversion, download never implied ------

def snakemake(repo: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(SNAKEMAKE), "--cores", "1", *args], cwd=repo, capture_output=True, text=True,
                          timeout=120, env={k: v for k, v in os.environ.items() if not k.startswith("SNAKEMAKE")})
    proc.output = proc.stdout + proc.stderr  # type: ignore[attr-defined]
    return proc


@pytest.fixture
def repo(tmp_path) -> Path:
    return copy_repo(tmp_path / "repo")


def test_workflow_checks_data_before_training_and_explains_a_missing_voc(repo, voc, coco, tmp_path) -> None:
    converted, missing = tmp_path / "converted", tmp_path / "elsewhere" / "VOCdevkit" / "VOC2012"
    (repo / "config" / "test.yaml").write_text(yaml.safe_dump({
        "data": {"kind": "folder", "root": str(voc), "class_names": VOC_CLASSES, "resize": 16, "crop": 16,
                 "expected_counts": {"train": 2, "val": 1}},
        "runs": {"c": {"description": "on COCO", "data": {"kind": "coco", "root": str(converted),
                                                          "expected_counts": None, "coco": {"root": str(coco)}}},
                 "m": {"description": "VOC not there", "data": {"root": str(missing)}}},
    }))
    checks = [f"resources/data_checks/{dataset_key(str(root))}/check.json" for root in (voc, converted, missing)]
    dry = snakemake(repo, "--configfile=config/test.yaml", "-n", *(f"results/{r}/weights.pth" for r in "0cm"))
    assert dry.returncode == 0, dry.output
    assert job_stats(dry.output) == {"check_data": 3, "prepare_coco": 1, "train": 3, "total": 7}, dry.output
    assert all(check in dry.output for check in checks)
    assert not converted.exists()  # a dry run writes nothing

    ran = snakemake(repo, "--configfile=config/test.yaml", "--keep-going", *checks)
    assert ran.returncode != 0, ran.output  # the missing VOC fails ...
    assert json.loads((repo / checks[0]).read_text())["splits"]["val"]["count"] == 1  # ... the others pass
    assert json.loads((repo / checks[1]).read_text())["splits"]["train"]["count"] == 1
    assert not (repo / checks[2]).exists()
    assert "Error in rule check_data" in ran.output
    assert str(missing) in ran.output and "VOCtrainval_11-May-2012.tar" in ran.output and "data.root" in ran.output
    assert not (repo / "resources" / "VOCdevkit").exists()  # never downloads on its own
    assert sorted(p.name for p in voc.iterdir()) == ["Annotations", "ImageSets", "JPEGImages", "SegmentationClass"]
    assert (repo / "logs/check_data").is_dir() and (repo / "benchmarks/prepare_coco").is_dir()


def test_workflow_rechecks_a_label_edited_after_a_passing_check(repo, voc) -> None:
    (repo / "config" / "test.yaml").write_text(yaml.safe_dump({
        "data": {"kind": "folder", "root": str(voc), "class_names": VOC_CLASSES, "resize": 16, "crop": 16}}))
    check = f"resources/data_checks/{dataset_key(str(voc))}/check.json"
    config = "--configfile=config/test.yaml"
    first = snakemake(repo, config, check)
    assert first.returncode == 0, first.output
    unchanged = snakemake(repo, config, "-n", check)
    assert unchanged.returncode == 0 and "Nothing to be done" in unchanged.output, unchanged.output
    label = voc / "SegmentationClass" / "2007_000039.png"
    edited = voc_label(30, 20, 20)
    edited[15, 10] = 27
    palette_png(edited, label)
    dry = snakemake(repo, config, "-n", check)
    assert dry.returncode == 0 and job_stats(dry.output) == {"check_data": 1, "total": 1}, dry.output
    again = snakemake(repo, config, check)
    assert again.returncode != 0 and not (repo / check).exists()
    log = (repo / "logs" / "check_data" / f"{dataset_key(str(voc))}.log").read_text()
    assert f"{label} holds label values [27] outside 0..20 and void 255" in log


def test_integration_keeps_the_synthetic_default_and_download_is_explicit(repo) -> None:
    proc = snakemake(repo, "-n", "results/0/weights.pth", "download_voc")
    assert proc.returncode == 0, proc.output
    assert job_stats(proc.output) == {"download_voc": 1, "make_data": 1, "train": 1, "total": 3}
    assert "resources/VOCdevkit/download_voc.json" in proc.output
