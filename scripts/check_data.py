#!/usr/bin/env python
"""Check a VOC-layout dataset folder (rule check_data); on success write the report JSON.

Every listed image and label is decoded completely, in parallel (one thread per
CPU), with a progress bar on stderr.

    python scripts/check_data.py --data-json '{"root": "...", "kind": "folder", ...}' --out check.json
    python scripts/check_data.py --root /path/to/VOCdevkit/VOC2012 --voc2012 --out check.json

A failed check exits 1 with every problem and where to get the data, no traceback.
"""
from __future__ import annotations

import argparse
import json
import sys

from ttdl.core.cli import setup_logging
from ttdl.core.config import ConfigError
from ttdl.core.io import write_json
from ttdl.core.settings import DataSettings
from ttdl.datasets.voc_check import VOC2012_COUNTS, DataCheckError, check_data_section


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data-json", help="the resolved `data` config section as JSON (what the workflow passes)")
    source.add_argument("--root", help="a VOC-layout folder (manual use)")
    parser.add_argument("--voc2012", action="store_true", help="with --root: expect VOC 2012's 1464/1449 images")
    parser.add_argument("--out", required=True, help="report JSON, written only when the check passes")
    args = parser.parse_args(argv)
    log = setup_logging()
    if args.data_json:
        values = json.loads(args.data_json)
    else:
        values = {"root": args.root, "kind": "folder", "expected_counts": VOC2012_COUNTS if args.voc2012 else None}
    try:
        report = check_data_section(DataSettings.from_partial(values, source="check_data"), progress=True)
    except (ConfigError, DataCheckError) as exc:
        print(str(exc), file=sys.stderr)
        return 1
    for split, info in report["splits"].items():
        pinned = {None: "not pinned", True: "verified", False: "MISMATCH"}[info["sha256_verified"]]
        log.info("%s: %d images, sha256 %s (%s); images and labels decoded, their sha256 %s", split, info["count"],
                 info["sha256"], pinned, info["files_sha256"])
    if any(info["expected_sha256"] is None for info in report["splits"].values()):
        log.info("to detect a changed split list later, pin these in data.split_sha256")
    write_json(args.out, report)
    log.info("dataset at %s is complete; report in %s", report["root"], args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
