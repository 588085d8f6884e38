"""Describer schedules: sync keeps the original semantics, lookahead and background are reproducible with
the rules describer, counters are logged, and a killed background run resumes."""
from __future__ import annotations

import csv
import subprocess
import sys

import pytest
import torch

from conftest import REPO, make_tiny_run
from ttdl.core.config import to_json
from ttdl.core.io import load_torch
from ttdl.jobs.train import Trainer
from ttdl.text.text_sources import DescriberTexts, TextItems

pytestmark = pytest.mark.usefixtures("one_thread")

GROUPED = {"name": "grouped_siglip", "lambda": 0.2}


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
    trainer.objective.before_step(batches[1], trainer.predict_masks)
    (sent,) = source.pending.values()  # requests for batch 1 are out
    logs = trainer.train_step(batches[0])  # batch 0 was not prefetched: planned and answered now
    assert logs["text/describer_calls"] > 0 and list(source.pending.values()) == [sent]
    logs = trainer.train_step(batches[1])  # uses the prefetched answers
    assert source.pending == {} and logs["text/describer_calls"] == len(sent.keys) > 0
    assert 0.0 < logs["text/staleness_iou"] <= 1.0 and logs["text/staleness_age_steps"] >= 0


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
