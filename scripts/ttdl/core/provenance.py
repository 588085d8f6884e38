"""What produced a cache or a checkpoint, recorded in it and checked when it is loaded.

A mask-text cache holds masks at the describer's resolution and texts written
by one describer about one dataset; a checkpoint holds a model trained on one
dataset. Reusing either under another setup with the same keys would be silent
nonsense, so each records a small provenance dict and a mismatch on load is an
error that says what differs.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ttdl.core.settings import DataSettings, DescriberSettings

# Describer settings that change what a text says (transport settings such as URLs,
# timeouts and concurrency do not, so a cache may move between servers).
DESCRIBER_TEXT_KEYS = ("backend", "model", "image_size", "seed", "negligible_fraction", "analysis_size",
                       "max_words", "temperature", "max_tokens", "send_images", "num_ctx")
# The rules describer's wording version (ttdl.text.describers.rules): a cache of older wording is refused.
# 2: errors placed by their extent over a 3x3 grid, shifts named with their direction.
RULES_DESCRIBER_VERSION = 2
DATASET_FILES = ("ImageSets/Segmentation/train.txt", "ImageSets/Segmentation/val.txt", "classes.txt")


class ProvenanceError(ValueError):
    """A cache or checkpoint was produced by another setup than the one loading it."""


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def dataset_fingerprint(data: DataSettings) -> str:
    """The split lists and class names of the data folder, and the settings that shape its samples."""
    root = Path(data.root)
    files = {name: hashlib.sha256((root / name).read_bytes()).hexdigest() if (root / name).is_file() else None
             for name in DATASET_FILES}
    shape = {"resize": data.resize, "crop": data.crop, "ignore_index": data.ignore_index,
             "class_names": data.class_names}
    return _digest({"files": files, "shape": shape})


def describer_fingerprint(describer: DescriberSettings) -> dict:
    settings = {key: getattr(describer, key) for key in DESCRIBER_TEXT_KEYS}
    template = Path(describer.prompt_template)
    if describer.backend != "rules" and template.is_file():  # the rules describer reads no prompt
        settings["prompt"] = hashlib.sha256(template.read_bytes()).hexdigest()[:16]
    if describer.backend == "rules":
        settings["rules_version"] = RULES_DESCRIBER_VERSION
    return {"backend": describer.backend, "model": describer.model, "settings": _digest(settings)}


def for_cache(data: DataSettings, describer: DescriberSettings) -> dict:
    return {"dataset": dataset_fingerprint(data), "describer": describer_fingerprint(describer)}


def for_checkpoint(data: DataSettings, class_names: list[str]) -> dict:
    return {"dataset": dataset_fingerprint(data), "class_names": list(class_names)}


def check(expected: dict, found: dict | None, source: str | Path, what: str, fix: str) -> None:
    """Raise ProvenanceError naming every field of `found` that differs from `expected`."""
    if not found:
        raise ProvenanceError(f"{source}: this {what} records nothing about what produced it (written by an older "
                              f"ttdl?), so it cannot be checked against this run; {fix}")
    differences = [f"{key}: file has {found.get(key)!r}, this run has {value!r}"
                   for key, value in expected.items() if found.get(key) != value]
    if differences:
        raise ProvenanceError(f"{source}: this {what} was produced by another setup:\n  - "
                              + "\n  - ".join(differences) + f"\n{fix}")
