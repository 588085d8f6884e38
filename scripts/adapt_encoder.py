#!/usr/bin/env python
"""Encoder adaptation: vle/1 trains the image tower and text adapter on (dM overlay, text) pairs;
vle/2 (kind: concat) trains a concat adapter over [GT overlay || PR overlay] embeddings."""
import argparse
import json

from ttdl.cli import setup_logging
from ttdl.vle import run_adaptation, run_concat_adaptation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run-json", required=True, help="resolved adaptation settings (from the workflow)")
    parser.add_argument("--weights", required=True, help="checkpoint whose predictions are described")
    parser.add_argument("--out", required=True, help="output folder, e.g. results/vle/1")
    parser.add_argument("--encoder", help="concat kind: the adapted encoder it builds on (vle/1 output)")
    args = parser.parse_args()
    log = setup_logging()
    run = json.loads(args.run_json)
    if run["adaptation"]["kind"] == "concat":
        metrics = run_concat_adaptation(run, args.weights, args.out, log=log.info, encoder_path=args.encoder)
    else:
        metrics = run_adaptation(run, args.weights, args.out, log=log.info)
    after = metrics["after"] or {}
    log.info("held-out retrieval after adaptation: i2t %.3f t2i %.3f (chance %.3f)",
             after.get("i2t_top1", float("nan")), after.get("t2i_top1", float("nan")), after.get("chance", float("nan")))


if __name__ == "__main__":
    main()
