#!/usr/bin/env python
"""Prefill the mask-text cache from a starting checkpoint (no describer calls)."""
import argparse

from ttdl.core.cli import add_run_arguments, run_settings, setup_logging
from ttdl.jobs.prefill import prefill_cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_run_arguments(parser)
    parser.add_argument("--weights", required=True, help="the starting checkpoint (weights.pth)")
    parser.add_argument("--out", required=True, help="cache file to write, e.g. results/good_ckp/prefill_cache.pt")
    args = parser.parse_args()
    log = setup_logging()
    info = prefill_cache(run_settings(args), args.weights, args.out)
    log.info("prefilled %d keys from %s into %s", info["keys"], args.weights, args.out)


if __name__ == "__main__":
    main()
