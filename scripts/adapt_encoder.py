#!/usr/bin/env python
"""Encoder adaptation: vle/1 trains the image tower and text adapter on (dM overlay, text) pairs;
vle/2 (kind: concat) trains a concat adapter over [GT overlay || PR overlay] embeddings."""
import argparse
import json

from ttdl.core.cli import setup_logging
from ttdl.core.settings import AdaptationJob
from ttdl.jobs.encoder_adaptation import run_adaptation_job


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run-json", required=True, help="resolved adaptation settings (from the workflow)")
    parser.add_argument("--weights", required=True, help="checkpoint whose predictions are described")
    parser.add_argument("--out", required=True, help="output folder, e.g. results/vle/1")
    parser.add_argument("--encoder", help="concat kind: the adapted encoder it builds on (vle/1 output)")
    args = parser.parse_args()
    log = setup_logging()
    job = AdaptationJob.from_dict(json.loads(args.run_json))
    metrics = run_adaptation_job(job, args.weights, args.out, log=log.info, encoder_path=args.encoder)
    after = metrics["after"] or {}
    nan = float("nan")
    log.info("held-out retrieval after adaptation: i2t %.3f t2i %.3f (chance %.3f)",
             after.get("i2t_top1", nan), after.get("t2i_top1", nan), after.get("chance", nan))


if __name__ == "__main__":
    main()
