#!/usr/bin/env python
"""Benchmark of the text branch, measured in one run on the configured data.

Prints (1) the text-finetune step time over the CE step time with a warm cache,
and (2) describer calls per (image, class) pair per epoch, for our cache policy
and the seed's. Needs the starting checkpoint, its prefilled cache and the
adapted encoder (`make bench` builds them first).
"""
import argparse
import statistics
import tempfile
import time

import torch

from ttdl.config import load_config, resolve_run
from ttdl.train import Trainer


def timed_epoch(trainer: Trainer, epoch: int) -> list[float]:
    times = []
    if trainer.objective is not None:
        trainer.objective.start_epoch(epoch)
    for batch in trainer.epoch_loader(epoch):
        started = time.perf_counter()
        trainer.train_step(batch)
        times.append(time.perf_counter() - started)
    return times


def make_trainer(config: dict, run_id: str, args, cache: bool, cache_mode: str | None = None) -> Trainer:
    run = resolve_run(config, run_id)
    run["train"]["progress"] = False
    if cache_mode is not None:
        run["cache"]["mode"] = cache_mode
    return Trainer(run, tempfile.mkdtemp(prefix="ttdl-bench-"), init_weights=args.init,
                   cache_path=args.cache if cache else None, encoder_path=args.encoder, log=lambda *_: None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="config/config.yaml")
    parser.add_argument("--text-run", default="3.3", help="a text finetuning run of the config")
    parser.add_argument("--ce-run", default="ft_ce", help="the CE-only run with the same start")
    parser.add_argument("--init", default="results/good_ckp/weights.pth")
    parser.add_argument("--cache", default="results/good_ckp/prefill_cache.pt")
    parser.add_argument("--encoder", default="results/vle/1/encoder.pt")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    config = load_config(args.config)

    ce = make_trainer(config, args.ce_run, args, cache=False)
    ce_times = timed_epoch(ce, 0)[1:]  # the first step pays one-off start-up costs
    print(f"CE step ({args.ce_run}): median {statistics.median(ce_times) * 1000:.0f} ms over {len(ce_times)} steps")

    calls_per_pair = {}
    for mode in ("ours", "seed"):
        text = make_trainer(config, args.text_run, args, cache=True, cache_mode=mode)
        per_epoch, warm_times = [], []
        for epoch in range(args.epochs):
            times = timed_epoch(text, epoch)
            counters = text.objective.epoch_counters
            per_epoch.append(counters.calls / max(counters.pairs, 1))
            if epoch > 0:
                warm_times += times
        calls_per_pair[mode] = per_epoch
        if mode == "ours":
            warm = statistics.median(warm_times)
            print(f"text step ({args.text_run}, warm cache, epochs 2..{args.epochs}): median {warm * 1000:.0f} ms "
                  f"over {len(warm_times)} steps")
            print(f"RATIO text-finetune step / CE step (warm cache): {warm / statistics.median(ce_times):.2f}")
        text.objective.close()
    for mode, values in calls_per_pair.items():
        shown = ", ".join(f"epoch {i + 1}: {v:.3f}" for i, v in enumerate(values))
        print(f"describer calls per (image, class) pair, cache mode {mode!r}: {shown}")
    print(f"RATIO describer calls ours/seed over {args.epochs} epochs: "
          f"{sum(calls_per_pair['ours']) / max(sum(calls_per_pair['seed']), 1e-9):.2f}")
    print(f"(device {ce.device}, torch threads {torch.get_num_threads()})")


if __name__ == "__main__":
    main()
