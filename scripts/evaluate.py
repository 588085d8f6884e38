#!/usr/bin/env python
"""Evaluate a run's weights.pth on the validation split; writes eval.json."""
import argparse

from ttdl.core.cli import add_run_arguments, run_settings, setup_logging
from ttdl.core.io import write_json
from ttdl.jobs.evaluation import evaluate_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_run_arguments(parser)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--out", required=True, help="eval.json to write")
    args = parser.parse_args()
    log = setup_logging()
    result = evaluate_checkpoint(run_settings(args), args.weights)
    write_json(args.out, result)
    log.info("%s: val mIoU %.4f, pixel acc %.4f", result["run_id"], result["miou"], result["pixel_acc"])


if __name__ == "__main__":
    main()
