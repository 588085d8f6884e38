"""Where a step's texts come from: the describer through the cache (on a schedule), templates, or controls.

Each source turns a TextBatch into TextItems (pair positions with their text) and
counts what it did in Counters, the one count of describer traffic of a run.
"""
from __future__ import annotations

import queue
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ttdl.text.cache import CachePlan, MaskTextCache, batch_iou
from ttdl.text.synthetic_text import synthetic_descriptions
from ttdl.text.textbatch import TextBatch

SCHEDULES = ("sync", "lookahead", "background")


@dataclass
class TextItems:
    """The texts of one step: pair positions with their text; `fresh` marks describer output."""

    positions: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    fresh: list[bool] = field(default_factory=list)

    def add(self, position: int, text: str, fresh: bool) -> None:
        self.positions.append(position)
        self.texts.append(text)
        self.fresh.append(fresh)


@dataclass
class Counters:
    """The one count of describer traffic and text use (per epoch and per run; saved with the state)."""

    pairs: int = 0
    calls: int = 0
    reused: int = 0
    malformed: int = 0
    latency_s: float = 0.0
    texts: int = 0
    answer_words: int = 0  # words of the usable fresh answers (answer statistics)
    wait_s: float = 0.0  # seconds a step was blocked on the describer
    missing: int = 0  # pairs left without text (background: no text yet, or too old; any: text withheld as stale)
    stale_n: int = 0  # texts whose staleness was measured ...
    stale_age_steps: int = 0  # ... summed age in steps of the mask each describes
    stale_iou: float = 0.0  # ... summed IoU between the mask each describes and the mask trained on

    def add(self, other: "Counters") -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @property
    def usable_share(self) -> float:
        return (self.calls - self.malformed) / self.calls if self.calls else 1.0

    def answer_stats(self) -> dict:
        usable = self.calls - self.malformed
        return {"describer_usable_share": round(self.usable_share, 4),
                "answer_words_mean": round(self.answer_words / usable, 2) if usable else None}

    def as_logs(self, prefix: str = "") -> dict:
        hit = 1.0 - self.calls / self.pairs if self.pairs else 0.0
        logs = {f"{prefix}describer_calls": self.calls, f"{prefix}cache_hit_rate": round(hit, 4),
                f"{prefix}malformed": self.malformed, f"{prefix}texts": self.texts,
                f"{prefix}describer_latency_s": round(self.latency_s, 3),
                f"{prefix}describer_wait_s": round(self.wait_s, 3), f"{prefix}texts_missing": self.missing}
        if self.stale_n:
            logs[f"{prefix}staleness_age_steps"] = round(self.stale_age_steps / self.stale_n, 3)
            logs[f"{prefix}staleness_iou"] = round(self.stale_iou / self.stale_n, 4)
        return logs


# ---- text sources --------------------------------------------------------------------

class InlineExecutor:
    """An executor that runs the call at submit: in-process describers stay deterministic under any schedule."""

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # delivered at .result(), like a thread's failure
            future.set_exception(exc)
        return future

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        return None


def describer_executor(schedule: str, in_process: bool):
    """Where a schedule runs describer calls (and `on_answers`).

    In the step for sync and for an in-process describer (rules) on any schedule: its
    answers complete at submit, so every schedule stays reproducible. (A worker thread
    would let the text tower run beside the step, but its float rounding then depends on
    what the main thread allocates meanwhile: two lookahead runs differed at 1e-6.)
    An HTTP describer spreads a call's requests over its own pool of max_concurrency
    threads, which bounds what is in flight; two threads here let the next batch's call
    queue its requests in that pool while this batch's last ones finish (FIFO: they stay
    behind them), so the pool does not idle at a step boundary waiting for one straggler.
    """
    if schedule == "sync" or in_process:
        return InlineExecutor()
    return ThreadPoolExecutor(2, thread_name_prefix="ttdl-describer")


@dataclass
class InFlight:
    """Describer requests sent for some keys, with the masks they describe and the step they were sent."""

    keys: list[str]
    masks: Tensor
    step: int
    future: Future
    plan: CachePlan | None = None  # lookahead: the plan of the batch they belong to
    batch_keys: tuple[str, ...] = ()


class DescriberTexts:
    """Texts from the describer, through the mask-text cache (docs/method.md §4), on one of three schedules.

    sync: a step plans its keys and waits for their answers (the original's semantics).
    lookahead: `prefetch` plans the next batch from masks predicted with the current
    weights and sends its requests, so they fly while this step trains; the next
    step waits only for what has not arrived. background: a step plans, queues the
    changed keys that are not already in flight, and never waits; each pair uses the
    freshest text the cache has within `max_staleness_steps`. Every schedule is
    reproducible with the in-process rules describer (see `describer_executor`).
    `on_answers` gets the usable answers as they arrive, where the call runs: the
    objective embeds them there, so with an HTTP describer under lookahead or background
    the text tower runs in the worker while the call waits for its slower answers.
    On every schedule a text whose mask moved too far (`cache.reuse_min_iou`) is not
    used; the pair is counted in `missing`.

    The owner calls `start_epoch(epoch)` at each epoch's start (train and val sources
    alike): the cache's per-epoch budget and text ages count in those epochs, and
    `epoch_latency_logs` covers the describer requests since then.
    """

    def __init__(self, describer, cache: MaskTextCache, class_names: list[str], schedule: str = "sync",
                 max_staleness_steps: int = 0, on_answers=None):
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown describer schedule {schedule!r}; known: {', '.join(SCHEDULES)}")
        self.describer, self.cache, self.class_names = describer, cache, class_names
        self.schedule, self.max_staleness = schedule, max_staleness_steps
        self.on_answers = on_answers  # called in the worker with each call's usable answers (embeds them early)
        self.executor = describer_executor(schedule, in_process=getattr(describer, "backend", "") == "rules")
        self.step = 0  # steps seen by this source (ages are counted in them)
        self.born: dict[str, int] = {}  # key -> step at which the mask its cached text describes was sent
        self.pending: dict[tuple[str, ...], InFlight] = {}  # lookahead: requests by the batch they are for
        self.queue: list[InFlight] = []  # background: requests in submission order
        self.deferred_prefetch: TextBatch | None = None  # lookahead: a next batch to send after this step's own
        self.latency_mark = self._latency_count()  # describer requests recorded before this epoch

    # -- epochs --
    def start_epoch(self, epoch: int) -> None:
        """Enter `epoch`: the cache's call budget starts afresh and its text ages advance (so
        `max_text_age_epochs` re-describes); latency percentiles start a new window."""
        self.cache.start_epoch(epoch)
        self.latency_mark = self._latency_count()

    def _latency_count(self) -> int:
        stats = getattr(self.describer, "stats", None)
        return stats.latency_count() if stats is not None else 0

    def epoch_latency_logs(self) -> dict:
        """p50/p95 seconds of the describer's requests since `start_epoch`, for the epoch's row.

        Per request (one (image, class) pair), retries included; where the describer is
        shared (train and val sources) the window holds both sources' requests.
        """
        stats = getattr(self.describer, "stats", None)
        window = stats.latency_percentiles(since=self.latency_mark) if stats is not None else {}
        return {"describer_latency_p50_s": window.get("latency_p50_s"),
                "describer_latency_p95_s": window.get("latency_p95_s")}

    # -- the three schedules --
    def __call__(self, tb: TextBatch, counters: Counters) -> TextItems:
        masks = tb.pr_masks()
        if self.schedule == "background":
            items = self._background(tb, masks, counters)
        else:
            items = self._planned(tb, masks, counters)
        self.step += 1
        return items

    def prefetch(self, tb: TextBatch) -> None:
        """lookahead: plan the next batch now and send its requests.

        With nothing prefetched for the current step (an epoch's first step) the next
        batch waits until the current one's requests are out: sent first, they would
        queue ahead of the requests this very step waits for.
        """
        if not self.pending:
            self.deferred_prefetch = tb
            return
        self._prefetch_now(tb)

    def _prefetch_now(self, tb: TextBatch) -> None:
        masks = tb.pr_masks()
        plan = self.cache.plan(tb.keys, masks)
        self.pending[tuple(tb.keys)] = self._send(tb, plan.describe, masks, plan=plan)

    def _send(self, tb: TextBatch, positions: list[int], masks: Tensor, plan: CachePlan | None = None) -> InFlight:
        requests = tb.requests(positions, self.class_names)
        future = self.executor.submit(self._describe, requests)
        return InFlight([tb.keys[p] for p in positions], masks[positions], self.step, future, plan, tuple(tb.keys))

    def _describe(self, requests: list) -> list[str | None]:
        """The executor's job: the describer's answers in request order, each passed to `on_answers` as it
        arrives (in the groups that arrive together), so embedding the first answers overlaps waiting for
        the last and only the last few are embedded after the call's slowest request."""
        submit = getattr(self.describer, "submit", None)
        if self.on_answers is None or submit is None:
            answers = self.describer.describe(requests)
            if self.on_answers is not None:
                self.on_answers([text for text in answers if text is not None])
            return answers
        sent = submit(requests)
        # Done-callbacks, not futures.wait: a future cancelled by its pool's shutdown runs its callbacks
        # but never wakes wait()'s waiters, which left the worker (and the process's exit) hanging.
        done: queue.SimpleQueue = queue.SimpleQueue()
        for f in sent:
            f.add_done_callback(done.put)
        try:
            remaining = len(sent)
            while remaining:
                group = [done.get()]  # blocks until the next answer; then takes all that came with it
                while not done.empty():
                    group.append(done.get_nowait())
                remaining -= len(group)
                arrived = [f.result() for f in group]  # a failed or cancelled request raises here
                self.on_answers([text for text in arrived if text is not None])
            return [f.result() for f in sent]
        except BaseException:
            for f in sent:
                f.cancel()
            raise

    def _receive(self, sent: InFlight, counters: Counters) -> list[str | None]:
        started = time.monotonic()
        answers = sent.future.result()
        counters.wait_s += time.monotonic() - started
        self.cache.update(sent.keys, sent.masks, answers)
        for key, text in zip(sent.keys, answers):
            if text is None:
                counters.malformed += 1  # counted and skipped, never trained on
            else:
                self.born[key] = sent.step
                counters.answer_words += len(text.split())
        return answers

    def _planned(self, tb: TextBatch, masks: Tensor, counters: Counters) -> TextItems:
        """sync and lookahead: the batch's plan is answered before the step's loss."""
        started = time.monotonic()
        sent = self.pending.pop(tuple(tb.keys), None)
        for stale in list(self.pending)[:-1]:  # prefetched for a batch that came with other keys: keep the answers
            orphan = self.pending.pop(stale)
            self._receive(orphan, counters)
            counters.calls += len(orphan.keys)
        if sent is not None:
            plan = sent.plan
        else:  # not prefetched (the first step of an epoch, or predicted classes changed the keys)
            plan = self.cache.plan(tb.keys, masks)
            sent = self._send(tb, plan.describe, masks, plan=plan) if plan.describe else None
        if self.deferred_prefetch is not None:  # lookahead's first step: the next batch goes out after ours
            upcoming, self.deferred_prefetch = self.deferred_prefetch, None
            self._prefetch_now(upcoming)
        answers = self._receive(sent, counters) if sent is not None else []
        counters.latency_s += time.monotonic() - started
        items = TextItems()
        for position, text in zip(plan.describe, answers):
            if text is not None:
                items.add(position, text, fresh=True)
        for position in plan.reuse:
            items.add(position, self.cache.text(tb.keys[position]), fresh=False)
        counters.calls += len(plan.describe)
        counters.reused += len(plan.reuse)
        counters.missing += len(plan.withheld)
        self._staleness(tb, masks, items, counters)
        return items

    def _background(self, tb: TextBatch, masks: Tensor, counters: Counters) -> TextItems:
        while self.queue and self.queue[0].future.done():  # harvest in submission order, never wait
            self._receive(self.queue.pop(0), counters)
        flying = {key for sent in self.queue for key in sent.keys}
        plan = self.cache.plan(tb.keys, masks, exclude=flying)  # keys in flight are neither sent nor charged again
        if plan.describe:
            self.queue.append(self._send(tb, plan.describe, masks))
        counters.calls += len(plan.describe)
        stale = set(plan.stale)  # described now or not: the cached text is about another mask
        items = TextItems()
        for position, key in enumerate(tb.keys):
            text = self.cache.text(key)
            if (text is not None and position not in stale
                    and self.step - self.born.get(key, self.step) <= self.max_staleness):
                items.add(position, text, fresh=False)
            else:
                counters.missing += 1
        counters.reused += len(items.positions)
        self._staleness(tb, masks, items, counters)
        return items

    def _staleness(self, tb: TextBatch, masks: Tensor, items: TextItems, counters: Counters) -> None:
        """Age (steps) and IoU between the mask each used text describes and the mask trained on.

        Every schedule logs it, sync included (its fresh texts score 1 and age 0, its
        reused ones show how far their masks moved). The mask is the one the text was
        written for (`cache.text_mask`), not a later one stored after a failed answer.
        """
        shape = tuple(masks.shape[-2:])
        positions, described = [], []
        for p in items.positions:
            m = self.cache.text_mask(tb.keys[p])
            if m is not None and tuple(m.shape) == shape:  # a text from other describer settings: not comparable
                positions.append(p)
                described.append(m)
        if not positions:
            return
        iou = batch_iou(torch.stack(described), masks[positions].cpu(), empty_vs_empty=1.0)
        counters.stale_n += len(positions)
        counters.stale_iou += float(iou.sum())
        counters.stale_age_steps += sum(self.step - self.born.get(tb.keys[p], self.step) for p in positions)

    # -- state --
    def state_dict(self) -> dict:
        """Ages survive a resume; requests in flight do not: their keys keep their old masks in the
        cache, so the resumed run plans and sends them again."""
        return {"step": self.step, "born": dict(self.born)}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.born = int(state["step"]), {str(k): int(v) for k, v in state["born"].items()}

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


class SyntheticTexts:
    """Template text from which of TP/TN/FP/FN exist (3.1 phase 2); no describer calls."""

    def __init__(self, class_names: list[str], ignore_index: int):
        self.class_names, self.ignore_index = class_names, ignore_index

    def __call__(self, tb: TextBatch, counters: Counters) -> TextItems:
        pairs = list(zip(tb.rows, tb.classes))
        texts = synthetic_descriptions(tb.gt, tb.pr, pairs, self.class_names, self.ignore_index)
        return TextItems(list(range(len(pairs))), texts, [True] * len(pairs))


class ClassNameTexts:
    """Control: a text that names the class and diagnoses nothing."""

    TEMPLATE = "a photo region of {name}"

    def __init__(self, class_names: list[str]):
        self.class_names = class_names

    def __call__(self, tb: TextBatch, counters: Counters) -> TextItems:
        texts = [self.TEMPLATE.format(name=self.class_names[c]) for c in tb.classes]
        return TextItems(list(range(len(texts))), texts, [True] * len(texts))


def shuffle_texts(items: TextItems, generator: torch.Generator) -> TextItems:
    """Control: each text moves to a random other pair of the step (a cyclic shift of a random order)."""
    n = len(items.texts)
    if n < 2:
        return items
    order = torch.randperm(n, generator=generator).tolist()
    moved = list(items.texts)
    for i in range(n):
        moved[order[i]] = items.texts[order[(i + 1) % n]]
    return TextItems(items.positions, moved, items.fresh)


