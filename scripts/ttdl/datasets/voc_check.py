"""Check a VOC-layout dataset folder before any job trains on it.

A real run reads a folder nobody in the workflow produced (Pascal VOC 2012, or
COCO converted by rule prepare_coco), so the workflow checks it once up front
(rule check_data) instead of failing an hour into training: split lists
present, non-empty, without duplicates or train/val overlap, their counts and
sha256 against `data.expected_counts` / `data.split_sha256` when set, every
listed image and label present and decodable to the last byte (a truncated JPEG
fails here, not an epoch into training), labels palette/grey PNGs of the image's
size holding only class indices or void. The samples are decoded in parallel
(threads: PIL decodes and hashlib hashes without the GIL) behind a progress bar.
All problems are reported together, with where to get the data and how to point
`data.root` at it.

The workflow reruns the check whenever `check_fingerprint` changes: the split
lists' contents plus the size and mtime of every listed image and label, so an
image or label edited after a passing check is checked again. The report also
records the sha256 of every split's files (`files_sha256`).

Torch-free on purpose: the Snakefile imports `dataset_key` at parse time and
the check job starts in a second. The workflow glue below takes the plain
`data` dicts the Snakefile holds; the check itself takes the typed
`DataSettings` its job builds once.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ttdl.core.settings import DataSettings

VOC2012_COUNTS = {"train": 1464, "val": 1449}
CHECKS_DIR = "resources/data_checks"
# the data keys a check depends on (resize, crop etc. do not change the folder)
CHECK_KEYS = ("kind", "root", "class_names", "image_ext", "ignore_index", "expected_counts", "split_sha256")
VOC_HOST = "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/"
VOC_TAR = "VOCtrainval_11-May-2012.tar"
SPLITS = ("train", "val")
MAX_EXAMPLES = 5

VOC_HELP = f"""\
Where to get Pascal VOC 2012: the official host {VOC_HOST}
(devkit archive {VOC_TAR}, about 2 GB: {VOC_HOST}{VOC_TAR}).
Unpacked, it is VOCdevkit/VOC2012/ with
  JPEGImages/<id>.jpg                 the photos
  SegmentationClass/<id>.png          palette PNGs: pixel = class index 0..20, 255 = void (ignored)
  ImageSets/Segmentation/train.txt    {VOC2012_COUNTS['train']} ids, one per line
  ImageSets/Segmentation/val.txt      {VOC2012_COUNTS['val']} ids
Point data.root at that VOC2012 folder: set `data: {{root: /path/to/VOCdevkit/VOC2012}}` in
config/voc.yaml (then `make all CONFIG=config/voc.yaml`), or add
  --config 'data={{"root": "/path/to/VOCdevkit/VOC2012"}}'
to the snakemake command. On a connected machine `.venv/bin/snakemake --cores 1 download_voc`
downloads and unpacks it to resources/VOCdevkit/VOC2012 (config/voc.yaml's default root)."""

COCO_CONVERTED_HELP = """\
This folder is written by rule prepare_coco from data.coco.root (COCO 2017 from
https://cocodataset.org/#download: train2017.zip, val2017.zip, annotations_trainval2017.zip).
Re-create it with `.venv/bin/snakemake --cores 1 --configfile config/coco.yaml --forcerun prepare_coco all`."""


class DataCheckError(RuntimeError):
    """The dataset folder is unusable; the message lists every problem and how to fix it."""


def dataset_key(root: str | Path) -> str:
    """A short, readable, unique folder name for a data root (`VOC2012-1a2b3c4d`).

    The workflow keeps its check records under resources/data_checks/{key}/
    rather than inside the dataset: a shared VOC copy may be read-only, and an
    absolute root cannot be embedded in log paths.
    """
    root = str(root)
    digest = hashlib.sha1(root.encode()).hexdigest()[:8]
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(root).name) or "root"
    return f"{name}-{digest}"


# ---- workflow glue (workflow/rules/datasets.smk, common.smk) -------------------------

def check_record(root: str | Path) -> str:
    """The report rule check_data writes once the dataset at `root` has passed (jobs depend on it)."""
    return f"{CHECKS_DIR}/{dataset_key(root)}/check.json"


def coco_record(root: str | Path) -> str:
    """The manifest rule prepare_coco writes last, once `root` holds the converted COCO folder."""
    return f"{CHECKS_DIR}/{dataset_key(root)}/coco.json"


def real_datasets(sections: list[dict]) -> dict[str, dict]:
    """The non-synthetic `data` sections by dataset_key (the first section of a root wins)."""
    found: dict[str, dict] = {}
    for data in sections:
        if data["kind"] != "synthetic":
            found.setdefault(dataset_key(data["root"]), data)
    return found


def key_pattern(datasets: dict[str, dict], kinds: tuple[str, ...]) -> str:
    """A wildcard constraint matching exactly the dataset keys of these kinds (none: matches nothing)."""
    keys = [key for key, data in datasets.items() if data["kind"] in kinds]
    return "|".join(re.escape(key) for key in keys) or "(?!)"


def check_inputs(data: dict) -> list[str]:
    """A converted COCO folder is checked after (and whenever) prepare_coco wrote it."""
    return [coco_record(data["root"])] if data["kind"] == "coco" else []


def check_settings(data: dict) -> dict:
    """The keys of a `data` section the check reads (what rule check_data passes as JSON)."""
    return {key: data[key] for key in CHECK_KEYS if key in data}


def lists_fingerprint(data: dict) -> str:
    """What rule check_data's `lists` param tracks: check_fingerprint (an edited list or file re-runs the check)."""
    return check_fingerprint(data)


def check_fingerprint(data: dict) -> str:
    """The split lists' contents and every listed file's size and mtime, hashed (cheap enough for DAG time).

    An edited list, image or label changes it, so the workflow checks the folder
    again (and retrains on the edited data). Lists by content: a touched list is the
    same list. Files by size and mtime: reading 2 GB at every planning is too slow,
    and re-extracting the same archive restores the same mtimes (tar keeps them).
    A converted COCO folder is tracked through its manifest instead (its files
    appear only after prepare_coco, which must not look like an edit).
    """
    if data["kind"] != "folder":
        return "prepared by prepare_coco"
    return hashlib.sha256(f"{split_lists_digest(data['root'])};"
                          f"{files_digest(data['root'], data['image_ext'])}".encode()).hexdigest()


def sample_paths(root: Path, uid: str, image_ext: str) -> tuple[Path, Path]:
    """The image and label of one listed id (the loader's layout)."""
    return root / "JPEGImages" / f"{uid}{image_ext}", root / "SegmentationClass" / f"{uid}.png"


def files_digest(root: str | Path, image_ext: str, splits=SPLITS) -> str:
    """One hash over (path, size, mtime_ns) of every image and label the split lists name ('missing' included)."""
    root = Path(root)
    digest = hashlib.sha256()
    for split in splits:
        path = root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not path.is_file():
            continue
        for uid in read_ids(path):
            for file in sample_paths(root, uid, image_ext):
                try:
                    stat = file.stat()
                    digest.update(f"{split}/{file.name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
                except OSError:
                    digest.update(f"{split}/{file.name}:missing\n".encode())
    return digest.hexdigest()


def sha256_file(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_ids(path: Path) -> list[str]:
    """Ids of a split list, with the loader's rule (stripped lines, blanks dropped)."""
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def split_lists_digest(root: str | Path, splits=SPLITS) -> str:
    """One hash over the split lists' contents ('missing' parts included); cheap enough for DAG time."""
    parts = []
    for split in splits:
        path = Path(root) / "ImageSets" / "Segmentation" / f"{split}.txt"
        parts.append(f"{split}:{sha256_file(path) if path.is_file() else 'missing'}")
    return hashlib.sha256(";".join(parts).encode()).hexdigest()


def class_count(root: Path, class_names: list[str] | None) -> int | None:
    """Number of classes from the config or classes.txt; None when neither says (range check skipped)."""
    if class_names:
        return len(class_names)
    path = root / "classes.txt"
    if path.is_file():
        return len(read_ids(path))
    return None


def _examples(items: list, total: int | None = None) -> str:
    total = len(items) if total is None else total
    shown = ", ".join(str(i) for i in items[:MAX_EXAMPLES])
    return shown + (f" (and {total - MAX_EXAMPLES} more)" if total > MAX_EXAMPLES else "")


DECODE_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError)


def check_workers() -> int:
    """Threads for decoding: the CPUs this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass
class SampleResult:
    error: str | None = None
    counts: np.ndarray | None = None  # label pixels per value 0..255
    image_sha256: str = ""
    label_sha256: str = ""


def _decode(path: Path) -> tuple[Image.Image, str]:
    """The file decoded to its last pixel (PIL's load(), not only the header), and its sha256."""
    data = path.read_bytes()
    img = Image.open(io.BytesIO(data))
    img.load()
    return img, hashlib.sha256(data).hexdigest()


def _check_pair(image_path: Path, label_path: Path, num_classes: int | None, ignore_index: int) -> SampleResult:
    """One listed sample: both files decode completely, label mode, sizes, label values."""
    result = SampleResult()
    try:
        image, result.image_sha256 = _decode(image_path)
    except DECODE_ERRORS as exc:
        result.error = f"cannot decode image {image_path}: {exc}"
        return result
    try:
        label, result.label_sha256 = _decode(label_path)
    except DECODE_ERRORS as exc:
        result.error = f"cannot decode label {label_path}: {exc}"
        return result
    if label.mode not in ("P", "L"):
        result.error = (f"{label_path} has mode {label.mode}; labels must be palette (P) or grey (L) PNGs of "
                        f"class indices (a colour-rendered mask is not a label map)")
    elif label.size != image.size:
        result.error = (f"{label_path} is {label.size[0]}x{label.size[1]} but {image_path} is "
                        f"{image.size[0]}x{image.size[1]}")
    else:
        result.counts = np.asarray(label.histogram()[:256], dtype=np.int64)
        if num_classes is not None:
            bad = [int(v) for v in np.flatnonzero(result.counts) if v >= num_classes and v != ignore_index]
            if bad:
                result.error = (f"{label_path} holds label values {bad[:5]} outside 0..{num_classes - 1} "
                                f"and void {ignore_index}")
    return result


def check_dataset(root: str | Path, *, kind: str = "folder", expected_counts: dict | None = None,
                  split_sha256: dict | None = None, class_names: list[str] | None = None,
                  image_ext: str = ".jpg", ignore_index: int = 255, splits=SPLITS,
                  workers: int | None = None, progress: bool = False) -> dict:
    """Check the folder; return the report (counts, sha256, class pixels) or raise DataCheckError.

    Every listed image and label is decoded completely, by `workers` threads (default:
    one per CPU), with a progress bar on stderr when `progress` is set.
    """
    root = Path(root)
    expected_counts = expected_counts or {}
    split_sha256 = split_sha256 or {}
    if not root.is_dir():
        _fail(root, kind, [f"data.root does not exist or is not a folder: {root}"])
    problems: list[str] = []
    num_classes = class_count(root, class_names)
    report: dict = {"root": str(root), "kind": kind, "num_classes": num_classes, "ignore_index": ignore_index,
                    "files_fingerprint": files_digest(root, image_ext, splits), "splits": {}}
    ids_of: dict[str, list[str]] = {}
    for split in splits:
        path = root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not path.is_file():
            problems.append(f"split list missing: {path}")
            continue
        ids = read_ids(path)
        digest = sha256_file(path)
        expected_sha = split_sha256.get(split)
        expected_n = expected_counts.get(split)
        report["splits"][split] = {"count": len(ids), "sha256": digest, "expected_count": expected_n,
                                   "expected_sha256": expected_sha,
                                   "sha256_verified": None if expected_sha is None else digest == expected_sha}
        if not ids:
            problems.append(f"split list is empty: {path}")
        duplicates = sorted(uid for uid, n in Counter(ids).items() if n > 1)
        if duplicates:
            problems.append(f"{path} lists ids more than once: {_examples(duplicates)}")
        if expected_n is not None and len(ids) != expected_n:
            problems.append(f"{path} lists {len(ids)} images, expected {expected_n} (data.expected_counts.{split})")
        if expected_sha is not None and digest != expected_sha:
            problems.append(f"sha256 of {path} is {digest}, expected {expected_sha} (data.split_sha256.{split}): "
                            f"a different or edited split list")
        ids_of[split] = ids
    names = list(ids_of)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            shared = sorted(set(ids_of[first]) & set(ids_of[second]))
            if shared:
                problems.append(f"{len(shared)} id(s) are listed in both {first}.txt and {second}.txt "
                                f"(evaluation images leak into training): {_examples(shared)}")
    from tqdm import tqdm  # here, not at the top: the Snakefile imports this module at parse time

    workers = workers or check_workers()
    for split, ids in ids_of.items():
        missing: list[Path] = []
        bad: list[str] = []
        histogram = np.zeros(256, dtype=np.int64)
        present: list[tuple[str, Path, Path]] = []
        for uid in dict.fromkeys(ids):
            image_path, label_path = sample_paths(root, uid, image_ext)
            absent = [p for p in (image_path, label_path) if not p.is_file()]
            if absent:
                missing += absent
            else:
                present.append((uid, image_path, label_path))
        files_sha = hashlib.sha256()
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = pool.map(lambda s: _check_pair(s[1], s[2], num_classes, ignore_index), present)
            bar = tqdm(results, total=len(present), desc=f"decoding {split} ({workers} threads)", unit="sample",
                       disable=not progress, mininterval=0.5 if sys.stderr.isatty() else 30.0)
            for result, (uid, _, _) in zip(bar, present, strict=True):  # the bar first: it counts the last one
                if result.error:
                    bad.append(result.error)
                if result.counts is not None:
                    histogram += result.counts
                files_sha.update(f"{uid}:{result.image_sha256}:{result.label_sha256}\n".encode())
        if missing:
            problems.append(f"{len(missing)} file(s) listed in {split}.txt are missing: {_examples(missing)}")
        if bad:
            problems.append(f"{len(bad)} unusable sample(s) in {split}.txt: " + "; ".join(bad[:MAX_EXAMPLES])
                            + (f" (and {len(bad) - MAX_EXAMPLES} more)" if len(bad) > MAX_EXAMPLES else ""))
        report["splits"][split]["label_pixels"] = {str(v): int(histogram[v]) for v in np.flatnonzero(histogram)}
        report["splits"][split]["files_sha256"] = files_sha.hexdigest()
    if problems:
        _fail(root, kind, problems)
    report["ok"] = True
    return report


def _fail(root: Path, kind: str, problems: list[str]) -> None:
    lines = [f"dataset check failed for data.root = {root} (data.kind: {kind}):"]
    lines += [f"  - {p}" for p in problems]
    lines.append(COCO_CONVERTED_HELP if kind == "coco" else VOC_HELP)
    raise DataCheckError("\n".join(lines))


def check_data_section(data: DataSettings, *, progress: bool = False) -> dict:
    """check_dataset with the settings of a run's `data` section."""
    return check_dataset(data.root, kind=data.kind, expected_counts=data.expected_counts,
                         split_sha256=data.split_sha256, class_names=data.class_names, image_ext=data.image_ext,
                         ignore_index=data.ignore_index, progress=progress)
