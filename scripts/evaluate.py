#!/usr/bin/env python
"""Evaluate a run's weights.pth on the validation split; writes eval.json."""
import argparse

from ttdl.cli import add_run_arguments, resolved_run, setup_logging
from ttdl.evaluation import evaluate_checkpoint
from ttdl.io import write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_run_arguments(parser)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--out", required=True, help="eval.json to write")
    args = parser.parse_args()
    log = setup_logging()
    result = evaluate_checkpoint(resolved_run(args), args.weights)
    write_json(args.out, result)
    log.info("%s: val mIoU %.4f, pixel acc %.4f", result["run_id"], result["miou"], result["pixel_acc"])


if __name__ == "__main__":
    main()
