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
    retrieval = metrics.get("retrieval")
    if retrieval is None:
        log.info("no held-out split (val_fraction 0): retrieval not measured; text runs will refuse this encoder")
    else:
        log.info("held-out top-1 (mean of i2t, t2i) %.3f = %.2fx chance %.4f (binomial p %.2g); "
                 "logit scale %.3f -> %.3f, bias %.3f -> %.3f", retrieval["mean_top1"], retrieval["over_chance"],
                 retrieval["chance"], retrieval["p_value"], metrics["logit_scale_before"], metrics["logit_scale"],
                 metrics["logit_bias_before"], metrics["logit_bias"])


if __name__ == "__main__":
    main()
