"""COCO 2017 instances -> a Pascal-VOC-layout folder with the 20 VOC classes.

The converted folder is read by the same `SegmentationFolder` as VOC and the
synthetic set: JPEGImages/{uid}.jpg, SegmentationClass/{uid}.png (palette PNG,
pixel = VOC class index, 255 = void), ImageSets/Segmentation/{split}.txt, plus
classes.txt with the 21 VOC names.

Painting rules (each is a choice a reader of the masks must know):

* Only the 20 COCO categories that are VOC classes are painted, matched by
  *name* (ids differ between the datasets); every other COCO object stays
  background, the usual COCO->VOC convention.
* Annotations are painted largest first (by the annotation's `area`), so a
  small object lying on a large one stays visible instead of being buried.
* `iscrowd` annotations of VOC classes are painted void (255): a crowd region
  mixes the class with background at unknown pixels, so neither label would be
  right and the loss must ignore it. Crowds of non-VOC categories stay
  background (they are background either way). Because of the area order a
  separately annotated object inside a crowd keeps its class.
* Images whose mask ends up without any VOC-class pixel are skipped (with no
  annotations at all, or only void): they would only teach "background".

Masks are decoded by pycocotools (`pycocotools.mask`), the COCO API's own
code, so the converted labels are the masks COCO defines: polygons are
rasterised as `COCO.annToMask` does (pixel (x, y) covers [x, x+1) x [y, y+1),
so a polygon's pixel count matches its geometric area) and RLE strings are
parsed by the reference parser. pycocotools trusts its input, so the RLEs are
checked here first (size, run lengths, string alphabet). The module is
torch-free, so a conversion job starts in well under a second.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from PIL import Image
from pycocotools import mask as coco_mask

from ttdl.core.io import atomic_path, write_text
from ttdl.core.palette import voc_palette

VOID = 255

VOC_CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor"]

# COCO 2017 category name -> VOC class name (the 20 shared classes).
COCO_TO_VOC = {
    "airplane": "aeroplane", "bicycle": "bicycle", "bird": "bird", "boat": "boat", "bottle": "bottle",
    "bus": "bus", "car": "car", "cat": "cat", "chair": "chair", "cow": "cow", "dining table": "diningtable",
    "dog": "dog", "horse": "horse", "motorcycle": "motorbike", "person": "person",
    "potted plant": "pottedplant", "sheep": "sheep", "couch": "sofa", "train": "train", "tv": "tvmonitor",
}

COCO_HELP = (
    "COCO 2017 comes from https://cocodataset.org/#download: train2017.zip, val2017.zip and "
    "annotations_trainval2017.zip. Unpack them so that data.coco.root looks like\n"
    "  {root}/annotations/instances_train2017.json\n"
    "  {root}/annotations/instances_val2017.json\n"
    "  {root}/train2017/*.jpg\n"
    "  {root}/val2017/*.jpg\n"
    "and set data.coco.root (config/coco.yaml) to that folder."
)


class CocoError(RuntimeError):
    """A missing or malformed COCO input; the message names the file or annotation."""


# ---- masks (pycocotools) -------------------------------------------------------

# A compressed RLE string: 6-bit groups as characters '0'..'o'; the last group of a
# count has no continuation bit (0x20), so a complete string ends in '0'..'O'.
_RLE_STRING = re.compile(r"[0-o]*[0-O]")


def decode_rle(rle: dict) -> np.ndarray:
    """An RLE segmentation ({"size": [h, w], "counts": list or str}) as a bool (h, w) mask.

    Runs alternate background/foreground starting with background and walk the
    image column by column (Fortran order); `counts` is a list of run lengths
    (COCO's crowd regions) or COCO's compressed string. pycocotools decodes
    either but trusts the runs to cover exactly h*w pixels (too few leave the
    rest of its buffer unwritten), so that is checked here: on a list by its
    sum, on a string by re-encoding the decoded mask, which must give the same
    string back.
    """
    try:
        h, w = (int(v) for v in rle["size"])
        counts = rle["counts"]
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"RLE needs 'size' [h, w] and 'counts': {exc}") from exc
    if isinstance(counts, list):
        counts = [int(c) for c in counts]
        if any(c < 0 for c in counts):
            raise ValueError("negative run length in RLE")
        if sum(counts) != h * w:
            raise ValueError(f"RLE run lengths sum to {sum(counts)}, expected {h}x{w}={h * w}")
        return coco_mask.decode(coco_mask.frPyObjects({"size": [h, w], "counts": counts}, h, w)).astype(bool)
    if isinstance(counts, (bytes, bytearray)):
        counts = counts.decode("ascii", errors="replace")
    if not isinstance(counts, str) or not _RLE_STRING.fullmatch(counts):
        raise ValueError("'counts' is neither a list of run lengths nor a complete compressed RLE string")
    encoded = counts.encode("ascii")
    mask = coco_mask.decode({"size": [h, w], "counts": encoded})  # ValueError when the runs exceed h*w
    if coco_mask.encode(mask)["counts"] != encoded:
        raise ValueError(f"RLE string does not cover exactly {h}x{w}={h * w} pixels (in canonical runs)")
    return mask.astype(bool)


def polygon_mask(polygons: list[list[float]], h: int, w: int) -> np.ndarray:
    """The union of COCO polygons ([x1, y1, x2, y2, ...] in pixel coordinates) as a bool mask."""
    parts = [[float(v) for v in poly] for poly in polygons if len(poly) >= 6]  # < 3 points cover no area
    if not parts:
        return np.zeros((h, w), dtype=bool)
    return coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects(parts, h, w))).astype(bool)


def annotation_mask(ann: dict, h: int, w: int) -> np.ndarray:
    """One annotation's pixels (polygons or RLE), checked against the image size."""
    seg = ann.get("segmentation")
    if isinstance(seg, list):
        return polygon_mask(seg, h, w)
    if isinstance(seg, dict):
        try:
            mask = decode_rle(seg)
        except ValueError as exc:
            raise CocoError(f"annotation {ann.get('id')}: bad RLE: {exc}") from exc
        if mask.shape != (h, w):
            raise CocoError(f"annotation {ann.get('id')}: RLE size {list(mask.shape)} differs from its image "
                            f"({h}x{w})")
        return mask
    raise CocoError(f"annotation {ann.get('id')}: segmentation is neither polygons nor RLE")


# ---- painting ------------------------------------------------------------------

def voc_index_of_categories(categories: Iterable[dict]) -> dict[int, int]:
    """COCO category id -> VOC class index, for the categories that are VOC classes."""
    return {int(c["id"]): VOC_CLASSES.index(COCO_TO_VOC[c["name"]])
            for c in categories if c.get("name") in COCO_TO_VOC}


def paint_label(image: dict, annotations: list[dict], voc_index: dict[int, int]) -> np.ndarray:
    """The VOC label map of one COCO image (module docstring: area order, crowd = void)."""
    h, w = int(image["height"]), int(image["width"])
    label = np.zeros((h, w), dtype=np.uint8)
    ours = [a for a in annotations if int(a["category_id"]) in voc_index]
    ours.sort(key=lambda a: (-float(a.get("area", 0.0)), int(a.get("id", 0))))
    for ann in ours:
        mask = annotation_mask(ann, h, w)
        label[mask] = VOID if ann.get("iscrowd") else voc_index[int(ann["category_id"])]
    return label


# ---- conversion ----------------------------------------------------------------

@dataclass
class SplitStats:
    """What one split's conversion did (written to the conversion manifest)."""
    images: int = 0
    written: int = 0
    skipped_no_voc_pixels: int = 0
    crowd_annotations: int = 0
    annotations_painted: int = 0
    class_pixels: dict[str, int] = field(default_factory=dict)
    missing_categories: list[str] = field(default_factory=list)


def load_instances(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CocoError(f"COCO annotation file not found: {path}\n" + COCO_HELP.format(root=path.parent.parent))
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CocoError(f"cannot read COCO annotation file {path}: {exc}") from exc
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise CocoError(f"{path} has no {key!r}: not a COCO instances file")
    return data


def _place_image(source: Path, dest: Path) -> None:
    """Hard-link the JPEG when possible (COCO train is 18 GB), else copy it; atomic either way."""
    with atomic_path(dest) as tmp:
        tmp.unlink()
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)


def convert_split(instances: str | Path, image_dir: str | Path, out_root: str | Path, split: str, *,
                  max_images: int | None = None,
                  progress: Callable[[Iterable], Iterable] | None = None) -> SplitStats:
    """Convert one COCO split; returns its stats. Images are taken in id order (deterministic).

    `max_images` keeps the first N *written* images (for quick runs). The split
    list is written last, so an interrupted conversion never looks complete.
    """
    data = load_instances(instances)
    image_dir, out_root = Path(image_dir), Path(out_root)
    if not image_dir.is_dir():
        raise CocoError(f"COCO image folder not found: {image_dir}\n" + COCO_HELP.format(root=image_dir.parent))
    voc_index = voc_index_of_categories(data["categories"])
    present = {c.get("name") for c in data["categories"]}
    by_image: dict[int, list[dict]] = {}
    for ann in data["annotations"]:
        by_image.setdefault(int(ann["image_id"]), []).append(ann)
    palette = voc_palette()
    stats = SplitStats(missing_categories=sorted(set(COCO_TO_VOC) - present))
    pixels = np.zeros(256, dtype=np.int64)
    uids: list[str] = []
    images = sorted(data["images"], key=lambda im: int(im["id"]))
    for image in (progress(images) if progress else images):
        if max_images is not None and len(uids) >= max_images:
            break
        stats.images += 1
        anns = by_image.get(int(image["id"]), [])
        label = paint_label(image, anns, voc_index)
        counts = np.bincount(label.ravel(), minlength=256)
        if counts[1:len(VOC_CLASSES)].sum() == 0:
            stats.skipped_no_voc_pixels += 1
            continue
        source = image_dir / image["file_name"]
        if not source.is_file():
            raise CocoError(f"COCO image missing: {source} (image id {image['id']} in {instances})")
        uid = Path(image["file_name"]).stem
        _place_image(source, out_root / "JPEGImages" / f"{uid}.jpg")
        png = Image.frombytes("P", (label.shape[1], label.shape[0]), label.tobytes())
        png.putpalette(palette)
        with atomic_path(out_root / "SegmentationClass" / f"{uid}.png") as tmp:
            png.save(tmp, format="PNG")
        ours = [a for a in anns if int(a["category_id"]) in voc_index]
        stats.annotations_painted += len(ours)
        stats.crowd_annotations += sum(1 for a in ours if a.get("iscrowd"))
        pixels += counts
        uids.append(uid)
    stats.written = len(uids)
    stats.class_pixels = {name: int(pixels[i]) for i, name in enumerate(VOC_CLASSES)} | {"void": int(pixels[VOID])}
    if not uids:
        raise CocoError(f"no image of {instances} contains a VOC class; nothing to write for split {split!r}")
    write_text(out_root / "ImageSets" / "Segmentation" / f"{split}.txt", "\n".join(uids) + "\n")
    return stats


def convert_coco(coco_root: str | Path, out_root: str | Path, splits: dict[str, str], *,
                 max_images: dict[str, int | None] | None = None, progress=None) -> dict:
    """Convert every `{voc split: coco split}` (e.g. train: train2017) under `coco_root`.

    Returns the manifest (per-split stats including `missing_categories`: a
    COCO file lacking one of the 20 names would otherwise silently produce a
    class with no pixels, so the CLI reports them).
    """
    coco_root, out_root = Path(coco_root), Path(out_root)
    if not splits:
        raise CocoError("data.coco.splits is empty: map at least one VOC split to a COCO split, "
                        "e.g. {train: train2017, val: val2017}")
    if not coco_root.is_dir():
        raise CocoError(f"COCO root not found: {coco_root}\n" + COCO_HELP.format(root=coco_root))
    manifest: dict = {"coco_root": str(coco_root), "classes": VOC_CLASSES, "splits": {}}
    for split, coco_split in splits.items():
        instances = coco_root / "annotations" / f"instances_{coco_split}.json"
        limit = (max_images or {}).get(split)
        stats = convert_split(instances, coco_root / coco_split, out_root, split, max_images=limit,
                              progress=progress)
        manifest["splits"][split] = {"coco_split": coco_split, "max_images": limit} | stats.__dict__
    write_text(out_root / "classes.txt", "\n".join(VOC_CLASSES) + "\n")
    return manifest
