"""Describer schedules: sync keeps the original semantics, lookahead and background are reproducible with
the rules describer, counters are logged, and a killed background run resumes."""
from __future__ import annotations

import csv
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import pytest
import torch

from conftest import REPO, make_tiny_run
from ttdl.core.config import to_json
from ttdl.core.io import load_torch
from ttdl.text.text_sources import Counters, DescriberTexts, TextItems

if TYPE_CHECKING:
    from ttdl.jobs.train import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def Trainer(*args, **kwargs) -> "Trainer":  # noqa: N802 (the class, imported late)
    """The training loop, imported when a test needs it: the source-level tests below do not."""
    from ttdl.jobs.train import Trainer as Loop

    return Loop(*args, **kwargs)

GROUPED = {"name": "grouped_siglip", "lambda": 0.2, "head_warmup_steps": 0}  # text reaches the segmenter at once


class ReferenceSyncTexts:
    """The describer text source as it was before schedules existed: plan, wait for answers, reuse the rest."""

    def __init__(self, source: DescriberTexts):
        self.describer, self.cache, self.class_names = source.describer, source.cache, source.class_names

    def __call__(self, tb, counters):
        masks = tb.pr_masks()
        plan = self.cache.plan(tb.keys, masks)
        items = TextItems()
        if plan.describe:
            answers = self.describer.describe(tb.requests(plan.describe, self.class_names))
            self.cache.update([tb.keys[p] for p in plan.describe], masks[plan.describe], answers)
            for position, text in zip(plan.describe, answers):
                if text is None:
                    counters.malformed += 1
                    continue
                items.add(position, text, fresh=True)
        for position in plan.reuse:
            items.add(position, self.cache.text(tb.keys[position]), fresh=False)
        counters.calls += len(plan.describe)
        counters.reused += len(plan.reuse)
        return items


def trained(tiny_run, tmp_path, name: str, schedule: str, reference: bool = False, epochs: int = 1) -> Trainer:
    run = tiny_run("t", objective=GROUPED, describer={"image_size": 48, "schedule": schedule,
                                                     "max_staleness_steps": 2}, train={"epochs": epochs})
    trainer = Trainer(run, tmp_path / name, log=lambda *_: None)
    if reference:
        trainer.objective.source = ReferenceSyncTexts(trainer.objective.source)
    trainer.fit()
    return trainer


def same_weights(a: Trainer, b: Trainer) -> bool:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


def test_sync_gives_the_weights_of_the_code_before_schedules(tiny_run, tmp_path):
    assert same_weights(trained(tiny_run, tmp_path, "new", "sync"),
                        trained(tiny_run, tmp_path, "reference", "sync", reference=True))


@pytest.mark.parametrize("schedule", ["lookahead", "background"])
def test_other_schedules_are_reproducible_with_the_rules_describer(tiny_run, tmp_path, schedule):
    first, second = (trained(tiny_run, tmp_path, f"{schedule}{i}", schedule) for i in range(2))
    assert same_weights(first, second)
    assert not same_weights(first, trained(tiny_run, tmp_path, "sync", "sync"))  # the schedule did change training


def rows(trainer: Trainer) -> list[dict]:
    with open(trainer.out / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_lookahead_sends_the_next_batch_before_its_step(tiny_run, tmp_path):
    run = tiny_run("t", objective=GROUPED, describer={"image_size": 48, "schedule": "lookahead"})
    trainer = Trainer(run, tmp_path / "out", log=lambda *_: None)
    batches = list(trainer.epoch_loader(0))
    source = trainer.objective.source
    order: list[str] = []
    describe = source.describer.describe
    source.describer.describe = lambda requests: order.extend(r.key for r in requests) or describe(requests)
    trainer.objective.before_step(batches[1], trainer.predict_masks)
    # the first step: nothing was prefetched for batch 0, so batch 1 waits until batch 0's requests are out
    assert source.pending == {} and source.deferred_prefetch is not None and order == []
    logs = trainer.train_step(batches[0])  # batch 0 planned and answered now, then batch 1 sent
    (sent,) = source.pending.values()
    first = order[:logs["text/describer_calls"]]
    assert logs["text/describer_calls"] > 0 and order == first + sent.keys and not set(first) & set(sent.keys)
    trainer.objective.before_step(batches[2], trainer.predict_masks)  # steady state: sent at once
    assert len(source.pending) == 2 and source.deferred_prefetch is None
    logs = trainer.train_step(batches[1])  # uses the prefetched answers
    assert len(source.pending) == 1  # batch 2's requests, sent during step 1
    assert logs["text/describer_calls"] == len(sent.keys) > 0
    assert 0.0 < logs["text/staleness_iou"] <= 1.0 and logs["text/staleness_age_steps"] >= 0


def test_training_keys_each_text_by_the_view_it_was_written_for(tiny_run, tmp_path):
    """train.hflip (default on): a step's flipped rows describe and cache under keys of their own."""
    run = tiny_run("t", objective=GROUPED, describer={"image_size": 48})
    trainer = Trainer(run, tmp_path / "out", log=lambda *_: None)
    batch = next(iter(trainer.epoch_loader(0)))
    assert 0 < int(batch["flipped"].sum()) < len(batch["uid"])  # both views in the batch
    trainer.train_step(batch)
    keys = trainer.objective.cache.state_dict()["keys"]
    for uid, flipped in zip(batch["uid"], batch["flipped"].tolist()):
        own = [k for k in keys if k.startswith((f"{uid}-", f"{uid}~flip-"))]
        assert own and all(("~flip-" in k) == flipped for k in own), (uid, flipped, own)


def test_background_never_waits_and_counts_missing_texts(tiny_run, tmp_path):
    run = tiny_run("t", objective=GROUPED, describer={"image_size": 48, "schedule": "background",
                                                     "max_staleness_steps": 0})
    trainer = Trainer(run, tmp_path / "out", log=lambda *_: None)
    batch = next(iter(trainer.epoch_loader(0)))
    first = trainer.train_step(batch)
    # the requests of step 1 are queued, not waited for: no pair has text yet
    assert first["text/describer_calls"] > 0 and first["text/texts"] == 0
    assert first["text/texts_missing"] == first["text/describer_calls"]
    second = trainer.train_step(batch)  # harvested now; with staleness 0 the step-1 texts are already too old
    assert second["text/texts"] == 0 and second["text/texts_missing"] > 0


def test_schedule_counters_reach_metrics_csv(tiny_run, tmp_path):
    for schedule in ("sync", "background"):  # background: a batch's texts are there when its images come again
        row = rows(trained(tiny_run, tmp_path, schedule, schedule, epochs=2))[-1]
        for column in ("describer_calls", "texts", "describer_wait_s", "texts_missing",
                       "staleness_age_steps", "staleness_iou"):
            assert column in row, (schedule, column)
        assert float(row["describer_wait_s"]) >= 0.0 and 0.0 <= float(row["staleness_iou"]) <= 1.0


def test_killed_background_run_resumes_and_finishes(tiny_data, tmp_path):
    run = make_tiny_run(tiny_data, "bg", objective=GROUPED, train={"epochs": 2, "checkpoint_every_steps": 1},
                        describer={"image_size": 48, "schedule": "background"})
    out = tmp_path / "bg"
    cmd = ["--run-json", to_json(run), "--out", str(out)]
    killed = subprocess.run([sys.executable, str(REPO / "tests" / "train_until_killed.py"), "4", *cmd],
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    state = load_torch(out / "state" / "last.pt")
    assert state["step"] == 4 and state["objective"]["source"]["step"] == 4  # ages survive the kill
    resumed = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), *cmd],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed bg from" in resumed.stderr and (out / "weights.pth").is_file()
    assert load_torch(out / "state" / "last.pt")["step"] == 6


# ---- unit level: a fake describer that answers with the key it was asked about --------------------------
class KeyEcho:
    """Answers "about <key>"; in-process like rules (answers at submit), with real stats for latencies."""

    backend = "rules"

    def __init__(self, latency_s: float = 0.01):
        from ttdl.text.describers.base import DescriberStats

        self.stats, self.latency_s, self.asked = DescriberStats(), latency_s, []

    def describe(self, requests):
        for r in requests:
            self.stats.add_request(self.latency_s)
        self.asked.extend(r.key for r in requests)
        return [f"about {r.key}" for r in requests]

    def close(self):
        pass


def text_batch(uids, pr, flipped=None, num_classes=3):
    from ttdl.text.textbatch import build_text_batch

    pr = torch.as_tensor(pr)
    return build_text_batch(list(uids), torch.zeros(len(uids), 3, *pr.shape[-2:]), pr, pr, size=pr.shape[-1],
                            num_classes=num_classes, ignore_index=255, flipped=flipped)


def source_with(cache_settings: dict | None = None, schedule="sync", describer=None, names=("bg", "a", "b")):
    from ttdl.core.settings import CacheSettings
    from ttdl.text.cache import cache_from_settings

    cache = cache_from_settings(CacheSettings.from_partial(cache_settings or {}))
    return DescriberTexts(describer or KeyEcho(), cache, list(names), schedule)


def test_keys_name_the_view_and_old_callers_keep_theirs():
    pr = torch.zeros(2, 4, 4, dtype=torch.long)
    pr[:, :2, :2] = 1
    assert text_batch(["u", "v"], pr).keys == ["u-1", "v-1"]
    assert text_batch(["u", "v"], pr, flipped=torch.tensor([True, False])).keys == ["u~flip-1", "v-1"]
    with pytest.raises(ValueError, match="flipped"):
        text_batch(["u", "v"], pr, flipped=[True])
    from ttdl.text.textbatch import split_key

    assert split_key("2008_000123~flip-5") == ("2008_000123", 5, True) and split_key("a-b-0") == ("a-b", 0, False)


def test_a_flipped_view_never_reuses_a_text_written_for_the_other_view(tiny_data):
    """Real loader flips over three epochs: every text a pair uses was written for its own view."""
    from torch.utils.data import DataLoader

    from ttdl.core.data import SegmentationFolder, read_class_names

    data = SegmentationFolder(tiny_data, "train", resize=48, crop=48, hflip=True, seed=3)
    names = read_class_names(tiny_data, None)
    source = source_with({"reuse_min_iou": 0}, names=names)  # reuse whatever the mask did: the key parts views
    seen: dict[str, set[bool]] = {}
    used = 0
    for epoch in range(3):
        data.set_epoch(epoch)
        source.start_epoch(epoch)
        for batch in DataLoader(data, batch_size=8, shuffle=False):
            pr = batch["mask"].clone()
            pr[pr == 255] = 0
            tb = text_batch(batch["uid"], pr, flipped=batch["flipped"], num_classes=len(names))
            items = source(tb, Counters())
            for position, text in zip(items.positions, items.texts):
                row = tb.rows[position]
                flipped = bool(batch["flipped"][row])
                assert text == f"about {tb.keys[position]}"
                assert ("~flip-" in tb.keys[position]) == flipped
                used += 1
            for uid, flipped in zip(batch["uid"], batch["flipped"].tolist()):
                seen.setdefault(uid, set()).add(flipped)
    assert used and any(views == {True, False} for views in seen.values())  # some image changed view


def test_stale_texts_are_withheld_and_counted_missing_in_sync():
    pr = torch.zeros(2, 4, 4, dtype=torch.long)
    pr[0, :2, :2] = 1
    pr[1, :, :] = 2
    source = source_with({"reuse_min_iou": 0.5, "policy": "budget", "redescribe_below_iou": 0.2,
                          "calls_per_epoch": 2})
    source(text_batch(["u", "v"], pr), Counters())  # described: two calls, the epoch's budget
    moved = pr.clone()
    moved[0] = 0
    moved[0, 0, :2] = 1
    moved[0, 3, 3] = 1  # u-1: IoU 2/5 = 0.4, not moved enough for the policy (0.2) but too far for its text
    counters = Counters()
    items = source(text_batch(["u", "v"], moved), counters)
    assert counters.calls == 0 and counters.missing == 1 and items.texts == ["about v-2"]
    assert counters.stale_n == 1 and counters.stale_iou == 1.0  # staleness is logged under sync too
    source.start_epoch(1)  # a new epoch, a new budget: the stale key is described again
    counters = Counters()
    items = source(text_batch(["u", "v"], moved), counters)
    assert counters.calls == 1 and counters.missing == 0 and sorted(items.texts) == ["about u-1", "about v-2"]


def test_start_epoch_lets_text_age_trigger_redescription():
    pr = torch.zeros(1, 4, 4, dtype=torch.long)
    pr[0, :2, :2] = 1
    source = source_with({"policy": "budget", "max_text_age_epochs": 2})
    counters = Counters()
    source(text_batch(["u"], pr), counters)
    source.start_epoch(1)
    source(text_batch(["u"], pr), counters)
    assert counters.calls == 1 and counters.reused == 1  # one epoch old: reused
    source.start_epoch(2)
    source(text_batch(["u"], pr), counters)
    assert counters.calls == 2 and source.cache.stamp("u-1") == 2  # two epochs old: described again


def test_epoch_latency_percentiles_cover_the_epoch_only():
    pr = torch.zeros(1, 4, 4, dtype=torch.long)
    pr[0, :2, :2] = 1
    describer = KeyEcho(latency_s=1.0)
    source = source_with(describer=describer)
    assert source.epoch_latency_logs() == {"describer_latency_p50_s": None, "describer_latency_p95_s": None}
    source(text_batch(["u"], pr), Counters())
    assert source.epoch_latency_logs() == {"describer_latency_p50_s": 1.0, "describer_latency_p95_s": 1.0}
    source.start_epoch(1)
    describer.latency_s = 0.25
    source(text_batch(["v"], pr), Counters())
    assert source.epoch_latency_logs() == {"describer_latency_p50_s": 0.25, "describer_latency_p95_s": 0.25}


def test_background_plans_around_keys_in_flight():
    """Keys in flight are excluded at planning: neither sent again nor charged to the budget."""
    import threading

    release = threading.Event()

    class Slow(KeyEcho):
        backend = "openai"  # not in-process: a worker thread runs it

        def describe(self, requests):
            release.wait(30)
            return super().describe(requests)

    pr = torch.zeros(1, 4, 4, dtype=torch.long)
    pr[0, :2, :2] = 1
    source = source_with({"calls_per_epoch": 10}, schedule="background", describer=Slow())
    try:
        first, second = Counters(), Counters()
        source(text_batch(["u"], pr), first)
        moved = pr.clone()
        moved[0, 3, 3] = 2
        source(text_batch(["u"], moved), second)  # u-1 still in flight; u-2 is new
        assert first.calls == 1 and second.calls == 1 and source.cache.epoch_calls == 2
        assert [sent.keys for sent in source.queue] == [["u-1"], ["u-2"]]
    finally:
        release.set()
        source.close()


@pytest.mark.parametrize("schedule", ["sync", "lookahead"])
def test_rules_answers_are_embedded_in_the_step(tiny_run, tmp_path, schedule):
    """The rules describer and the text tower run in the step on every schedule (reproducible runs)."""
    run = tiny_run("t", objective=GROUPED, describer={"image_size": 48, "schedule": schedule})
    trainer = Trainer(run, tmp_path / schedule, log=lambda *_: None)
    encoder = trainer.objective.encoder[0]
    where: list[str] = []
    tower = encoder._tower_text
    encoder._tower_text = lambda chunk: where.append(threading.current_thread().name) or tower(chunk)
    trainer.fit()
    assert where and set(where) == {threading.main_thread().name}
    assert trainer.objective.total.texts > 0


class Staggered(KeyEcho):
    """A server-like describer: `submit` answers each request when the test releases it."""

    backend = "openai"

    def __init__(self):
        super().__init__()
        self.release: dict[str, threading.Event] = {}
        self.pool = ThreadPoolExecutor(4)

    def submit(self, requests):
        def answer(key):
            self.release.setdefault(key, threading.Event()).wait(30)
            if key == "v-2" and "fail" in self.release:
                raise ConnectionError("server gone")
            return f"about {key}"

        return [self.pool.submit(answer, r.key) for r in requests]


def test_server_answers_are_embedded_as_they_arrive():
    """lookahead with a server: `on_answers` sees the first answer before the last has arrived, the step
    gets every answer in request order, and a failed request fails the call."""
    describer = Staggered()
    embedded: list[list[str]] = []
    arrived = threading.Event()
    source = source_with(schedule="lookahead", describer=describer)
    source.on_answers = lambda texts: embedded.append(texts) or arrived.set()
    pr = torch.zeros(1, 4, 4, dtype=torch.long)
    pr[0, :2, :2], pr[0, 2:, 2:] = 1, 2
    try:
        counters, items = Counters(), []
        step = threading.Thread(target=lambda: items.append(source(text_batch(["u"], pr), counters)))
        step.start()
        describer.release.setdefault("u-1", threading.Event()).set()
        assert arrived.wait(10) and embedded == [["about u-1"]]  # u-2 still in flight
        describer.release.setdefault("u-2", threading.Event()).set()
        step.join(10)
        assert embedded == [["about u-1"], ["about u-2"]] and counters.calls == 2
        assert items[0].texts == ["about u-1", "about u-2"]
        failing = source._send(text_batch(["v"], pr), [0, 1], pr.expand(2, 4, 4))
        describer.release["fail"] = threading.Event()
        for key in ("v-1", "v-2"):
            describer.release.setdefault(key, threading.Event()).set()
        with pytest.raises(ConnectionError, match="server gone"):
            failing.future.result(10)
    finally:
        for event in describer.release.values():
            event.set()
        source.close()
        describer.pool.shutdown()


def test_a_call_whose_requests_are_cancelled_ends_instead_of_hanging():
    """Closing the describer cancels its queued requests: the call waiting on them fails at once (it used to
    wait forever, and the process could not exit)."""
    from concurrent.futures import CancelledError

    describer = Staggered()
    describer.pool = ThreadPoolExecutor(1)  # one request runs, the other waits in the queue
    source = source_with(schedule="lookahead", describer=describer)
    source.on_answers = lambda texts: None
    submitted = threading.Event()
    submit = describer.submit

    def submit_then_signal(requests):
        futures = submit(requests)
        submitted.set()
        return futures

    describer.submit = submit_then_signal
    pr = torch.zeros(1, 4, 4, dtype=torch.long)
    pr[0, :2, :2], pr[0, 2:, 2:] = 1, 2
    try:
        sent = source._send(text_batch(["w"], pr), [0, 1], pr.expand(2, 4, 4))
        assert submitted.wait(10)  # both requests are with the pool before it is shut down
        describer.pool.shutdown(wait=False, cancel_futures=True)  # what describer.close() does
        describer.release.setdefault("w-1", threading.Event()).set()
        with pytest.raises(CancelledError):
            sent.future.result(10)
    finally:
        for event in describer.release.values():
            event.set()
        source.close()
