#!/usr/bin/env python
"""Qualitative panel of a finetuning run: val images, GT, PR before/after and the describer's text on each."""
import argparse

from ttdl.core.cli import add_run_arguments, run_settings, setup_logging
from ttdl.jobs.qualitative import qualitative_panel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_run_arguments(parser)
    parser.add_argument("--before", required=True, help="weights.pth of the init checkpoint")
    parser.add_argument("--after", required=True, help="weights.pth of the finetuned run")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--num-images", type=int, default=4, help="val images shown (default 4)")
    args = parser.parse_args()
    log = setup_logging()
    run = run_settings(args)
    rows = qualitative_panel(run, args.before, args.after, args.out, k=args.num_images)
    for row in rows:
        log.info("%s: image mIoU %.3f -> %.3f", row.uid, row.miou_before, row.miou_after)
    log.info("wrote %s (%d images)", args.out, len(rows))


if __name__ == "__main__":
    main()
