#!/usr/bin/env python
"""Benchmark of the text branch, measured in one run on the configured data.

Prints (1) the text-finetune step time over the CE step time with a warm cache,
and (2) describer calls per (image, class) pair per epoch, for our cache policy
and the original's. Needs the starting checkpoint, its prefilled cache and the
adapted encoder (`make bench` builds them first).
"""
import argparse
import statistics
import tempfile
import time

import torch

from ttdl.core.config import load_config, resolve_run
from ttdl.core.settings import RunSettings
from ttdl.jobs.train import Trainer


class StepTimer:
    """A Trainer step hook: the wall time between consecutive steps of an epoch (data loading included)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._last: float | None = None

    def start_epoch(self) -> None:
        self._last = time.perf_counter()

    def __call__(self, trainer: Trainer, logs: dict) -> None:
        now = time.perf_counter()
        self.times.append(now - self._last)
        self._last = now


class NoWriter:
    def add_scalar(self, *args, **kwargs) -> None:
        pass


def timed_epoch(trainer: Trainer, timer: StepTimer) -> list[float]:
    """One epoch of the Trainer's own loop (validation included, not timed); the step times of it."""
    before = len(timer.times)
    timer.start_epoch()
    trainer.run_epoch(NoWriter())
    return timer.times[before:]


def make_trainer(config: dict, run_id: str, args, cache: bool, cache_mode: str | None = None):
    run = RunSettings.from_dict(resolve_run(config, run_id))
    run = run.replace(train=run.train.replace(progress=False))
    if cache_mode is not None:
        run = run.replace(cache=run.cache.replace(mode=cache_mode))
    timer = StepTimer()
    trainer = Trainer(run, tempfile.mkdtemp(prefix="ttdl-bench-"), init_weights=args.init,
                      cache_path=args.cache if cache else None, encoder_path=args.encoder, log=lambda *_: None,
                      step_hooks=(timer,))
    return trainer, timer


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

    ce, ce_timer = make_trainer(config, args.ce_run, args, cache=False)
    ce_times = timed_epoch(ce, ce_timer)[1:]  # the first step pays one-off start-up costs
    print(f"CE step ({args.ce_run}): median {statistics.median(ce_times) * 1000:.0f} ms over {len(ce_times)} steps")

    calls_per_pair = {}
    for mode in ("ours", "original"):
        text, timer = make_trainer(config, args.text_run, args, cache=True, cache_mode=mode)
        per_epoch, warm_times = [], []
        for epoch in range(args.epochs):
            times = timed_epoch(text, timer)
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
    print(f"RATIO describer calls ours/original over {args.epochs} epochs: "
          f"{sum(calls_per_pair['ours']) / max(sum(calls_per_pair['original']), 1e-9):.2f}")
    print(f"(device {ce.device}, torch threads {torch.get_num_threads()})")


if __name__ == "__main__":
    main()
