#!/usr/bin/env python
"""Convert COCO 2017 to a VOC-layout folder with the 20 VOC classes (rule prepare_coco).

    python scripts/prepare_coco.py --data-json '{"root": "resources/data/coco_voc", "coco": {...}}' --out manifest.json

Reads data.coco.root (annotations/instances_{split}.json, {split}/*.jpg), writes
data.root; the manifest (per-split counts, class pixels) is written last.
"""
from __future__ import annotations

import argparse
import json
import sys

from tqdm import tqdm

from ttdl.core.cli import setup_logging
from ttdl.core.config import ConfigError
from ttdl.core.io import write_json
from ttdl.core.settings import DataSettings
from ttdl.datasets.coco import CocoError, convert_coco


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-json", required=True, help="the resolved `data` config section as JSON")
    parser.add_argument("--out", required=True, help="conversion manifest JSON (written last)")
    args = parser.parse_args(argv)
    log = setup_logging()
    try:
        data = DataSettings.from_partial(json.loads(args.data_json), source="prepare_coco")
        manifest = convert_coco(data.coco.root, data.root, data.coco.splits, max_images=data.coco.max_images,
                                progress=lambda it: tqdm(it, desc="coco -> voc", mininterval=5))
    except (ConfigError, CocoError) as exc:
        print(str(exc), file=sys.stderr)
        return 1
    for split, stats in manifest["splits"].items():
        log.info("%s: wrote %d of %d images (%d without VOC-class pixels skipped, %d crowd regions as void)",
                 split, stats["written"], stats["images"], stats["skipped_no_voc_pixels"], stats["crowd_annotations"])
        if stats["missing_categories"]:
            log.warning("%s: COCO categories absent from the annotation file (their VOC classes get no pixels): %s",
                        split, ", ".join(stats["missing_categories"]))
    write_json(args.out, manifest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
