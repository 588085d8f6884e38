#!/usr/bin/env python
"""Train one run of the experiment matrix (the single training entry point)."""
import argparse

from ttdl.core.cli import add_run_arguments, resolved_run, setup_logging
from ttdl.core.settings import RunSettings
from ttdl.jobs.train import Trainer


def main(step_hooks=()) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_run_arguments(parser)
    parser.add_argument("--out", required=True, help="output folder, e.g. results/0")
    parser.add_argument("--init", help="weights.pth to start from (the run's init)")
    parser.add_argument("--cache", help="prefilled mask-text cache to start from")
    parser.add_argument("--encoder", help="adapted text/image encoder (vle/1 output)")
    parser.add_argument("--concat-adapter", help="GT_PR concat adapter (vle/2 output), for the B_PR runs")
    args = parser.parse_args()
    run = RunSettings.from_dict(resolved_run(args))
    log = setup_logging()
    summary = Trainer(run, args.out, init_weights=args.init, cache_path=args.cache,
                      encoder_path=args.encoder,
                      concat_path=args.concat_adapter, log=log.info, step_hooks=step_hooks).fit()
    log.info("done: best val mIoU %.4f at epoch %d", summary["best_val_miou"], summary["best_epoch"])


if __name__ == "__main__":
    main()
