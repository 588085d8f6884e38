"""The training loop: learning, resume after SIGKILL, early stop, restarts, outputs."""
from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import default_collate

from conftest import REPO, make_tiny_run
from ttdl.core.config import resolve_run, to_json
from ttdl.core.io import load_torch, save_torch
from ttdl.core.models import build_model
from ttdl.core.provenance import ProvenanceError
from ttdl.core.settings import RunSettings
from ttdl.jobs.evaluation import load_run
from ttdl.jobs.train import Trainer, epoch_order, lr_factor, run_fingerprint
from ttdl.text.objectives import CrossEntropyOnly

SUMMARY_FIELDS = {"run_id", "description", "best_val_miou", "best_val_pixel_acc", "best_epoch", "epochs", "steps",
                  "per_class_iou", "wall_time_s", "target_miou", "target_reached", "device", "init"}


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def model_state(path: Path) -> dict:
    return load_torch(path)["model"]


def assert_same_tensors(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if a[key].is_floating_point():
            assert torch.allclose(a[key], b[key], rtol=0, atol=atol), key
        else:
            assert torch.equal(a[key], b[key]), key


# ---- pieces --------------------------------------------------------------------

def test_lr_schedule() -> None:
    assert [lr_factor(s, 4, 20, "cosine") for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 4, 20, "cosine") == pytest.approx(1.0)
    assert lr_factor(12, 4, 20, "cosine") == pytest.approx(0.5)
    assert lr_factor(20, 4, 20, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(15, 4, 20, "constant") == 1.0
    assert lr_factor(0, 0, 10, "cosine") == pytest.approx(1.0)


def test_epoch_order_is_a_pure_function_of_seed_and_epoch() -> None:
    assert epoch_order(24, 0, 3) == epoch_order(24, 0, 3)
    assert sorted(epoch_order(24, 0, 3)) == list(range(24))
    assert epoch_order(24, 0, 3) != epoch_order(24, 0, 4)
    assert epoch_order(24, 0, 3) != epoch_order(24, 1, 3)


def test_fingerprint_covers_settings_and_input_files(tiny_run, tmp_path) -> None:
    run = tiny_run()
    cosmetic = tiny_run(train={"progress": True, "threads": 2, "num_workers": 1}, description="other words")
    assert run_fingerprint(run) == run_fingerprint(cosmetic)
    assert run_fingerprint(run) != run_fingerprint(tiny_run(train={"lr": 0.002}))
    assert run_fingerprint(run) != run_fingerprint(tiny_run(model={"bn_momentum": 0.2}))
    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    a.write_bytes(b"first init")
    b.write_bytes(b"second init")
    assert run_fingerprint(run, str(a)) != run_fingerprint(run, str(b))
    assert run_fingerprint(run, str(a)) == run_fingerprint(run, str(a), None)


def test_config_choices_reach_the_model(tiny_run, tmp_path) -> None:
    trainer = Trainer(tiny_run(model={"bn_momentum": 0.3}), tmp_path / "out", log=lambda *_: None)
    layers = [m for m in trainer.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert layers and all(m.momentum == 0.3 for m in layers)
    assert trainer.num_classes == 7 and trainer.steps_per_epoch == 3 and trainer.total_steps == 3
    assert isinstance(trainer.objective, CrossEntropyOnly)  # a plain CE run: the null objective


def test_batch_larger_than_the_train_split_is_an_error(tiny_run, tmp_path) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        Trainer(tiny_run(train={"batch_size": 64}), tmp_path / "out")


# ---- (a) it learns -------------------------------------------------------------

def test_two_steps_on_a_fixed_batch_lower_the_loss(tiny_run, tmp_path) -> None:
    trainer = Trainer(tiny_run(train={"schedule": "constant", "lr": 0.002}), tmp_path / "out", log=lambda *_: None)
    batch = default_collate([trainer.train_set[i] for i in range(8)])
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    first = trainer.train_step(batch)
    second = trainer.train_step(batch)
    assert {"loss", "ce", "lr"} <= first.keys()
    assert first["lr"] == pytest.approx(0.002)
    assert second["loss"] < first["loss"], (first["loss"], second["loss"])
    after = trainer.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point())


# ---- (b) resume after SIGKILL is equivalent to an uninterrupted run ------------

def train_cli(run: dict, out: Path, kill_at: int | None = None) -> subprocess.CompletedProcess:
    script = ["scripts/train.py"] if kill_at is None else ["tests/train_until_killed.py", str(kill_at)]
    cmd = [sys.executable, str(REPO / script[0]), *script[1:], "--run-json", to_json(run), "--out", str(out)]
    return subprocess.run(cmd, cwd=out.parent, capture_output=True, text=True, timeout=300)


KILL_AT = 4  # 3 steps per epoch: the kill lands one step into epoch 2


@pytest.fixture(scope="module")
def resume_runs(tiny_data, tmp_path_factory) -> dict:
    run = make_tiny_run(tiny_data, "0", train={"epochs": 2, "checkpoint_every_steps": 1})
    base = tmp_path_factory.mktemp("resume")
    straight = train_cli(run, base / "straight")
    assert straight.returncode == 0, straight.stderr
    killed = train_cli(run, base / "killed", kill_at=KILL_AT)
    state_after_kill = load_torch(base / "killed" / "state" / "last.pt") if killed.returncode else None
    resumed = train_cli(run, base / "killed")
    return {"base": base, "straight": straight, "killed": killed, "resumed": resumed,
            "state_after_kill": state_after_kill}


def test_sigkill_then_rerun_resumes_to_the_same_weights(resume_runs) -> None:
    base = resume_runs["base"]
    killed, resumed = resume_runs["killed"], resume_runs["resumed"]
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    state = resume_runs["state_after_kill"]
    assert state["step"] == KILL_AT and state["epoch"] == 1 and state["step_in_epoch"] == 1 and not state["done"]
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed 0 from" in resumed.stderr and f"step {KILL_AT}" in resumed.stderr
    assert "resumed" not in resume_runs["straight"].stderr
    a, b = base / "straight", base / "killed"
    state_a, state_b = load_torch(a / "state" / "last.pt"), load_torch(b / "state" / "last.pt")
    assert state_a["step"] == state_b["step"] == 6 and state_a["done"] and state_b["done"]
    assert_same_tensors(state_a["model"], state_b["model"])
    assert_same_tensors(model_state(a / "weights.pth"), model_state(b / "weights.pth"))
    rows_a, rows_b = read_csv(a / "metrics.csv"), read_csv(b / "metrics.csv")
    assert [(r["epoch"], r["step"], r["val_miou"], r["lr"]) for r in rows_a] == \
           [(r["epoch"], r["step"], r["val_miou"], r["lr"]) for r in rows_b]
    sum_a, sum_b = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert sum_a["best_val_miou"] == sum_b["best_val_miou"] and sum_a["steps"] == sum_b["steps"] == 6


def test_resumed_epoch_logs_the_same_train_loss(resume_runs) -> None:
    """metrics.csv of a resumed run matches the uninterrupted one (train_* are epoch means)."""
    base = resume_runs["base"]
    assert resume_runs["resumed"].returncode == 0
    rows_a, rows_b = read_csv(base / "straight" / "metrics.csv"), read_csv(base / "killed" / "metrics.csv")
    for row_a, row_b in zip(rows_a, rows_b, strict=True):
        for key in ("train_loss", "train_ce"):
            assert float(row_a[key]) == pytest.approx(float(row_b[key]), abs=1e-6), (row_a["epoch"], key)


# ---- (c) target mIoU stops early -----------------------------------------------

def test_target_miou_stops_early(tiny_run, tmp_path) -> None:
    logs: list[str] = []
    out = tmp_path / "out"
    summary = Trainer(tiny_run(train={"epochs": 3, "target_miou": 0.0}), out, log=logs.append).fit()
    assert summary["epochs"] == 1 and summary["steps"] == 3
    assert summary["target_miou"] == 0.0 and summary["target_reached"] is True
    assert json.loads((out / "summary.json").read_text())["target_reached"] is True
    assert len(read_csv(out / "metrics.csv")) == 1
    assert any("reached target mIoU" in line for line in logs)


# ---- (d) changed settings restart instead of resuming ----------------------------

def test_changed_fingerprint_restarts_and_same_settings_resume(tiny_run, tmp_path) -> None:
    out = tmp_path / "out"
    first = Trainer(tiny_run(train={"lr": 0.001}), out, log=lambda *_: None).fit()
    assert first["steps"] == 3
    old = load_torch(out / "state" / "last.pt")

    logs: list[str] = []
    changed = tiny_run(train={"lr": 0.002})
    summary = Trainer(changed, out, log=logs.append).fit()
    assert any("starting this run over" in line for line in logs), logs
    assert not any("resumed" in line for line in logs)
    assert summary["steps"] == 3 and summary["epochs"] == 1
    assert len(read_csv(out / "metrics.csv")) == 1
    new = load_torch(out / "state" / "last.pt")
    assert new["fingerprint"] != old["fingerprint"]
    assert any(not torch.equal(old["model"][k], new["model"][k]) for k in old["model"])

    logs.clear()
    again = Trainer(changed, out, log=logs.append).fit()  # finished and unchanged: nothing to train
    assert any("resumed" in line for line in logs), logs
    assert again["steps"] == 3 and len(read_csv(out / "metrics.csv")) == 1
    assert_same_tensors(load_torch(out / "state" / "last.pt")["model"], new["model"], atol=0)


def test_state_of_another_run_is_refused(tiny_run, tmp_path) -> None:
    out = tmp_path / "out"
    Trainer(tiny_run("a"), out, log=lambda *_: None).fit()
    with pytest.raises(RuntimeError, match="another run"):
        Trainer(tiny_run("b"), out, log=lambda *_: None).fit()


# ---- (e) declared outputs --------------------------------------------------------

def test_outputs(tiny_run, tiny_config, tmp_path) -> None:
    logs: list[str] = []
    out = tmp_path / "out"
    run = tiny_run(train={"epochs": 2, "target_miou": 1.0}, description="outputs test")
    summary = Trainer(run, out, log=logs.append).fit()

    weights = torch.load(out / "weights.pth", map_location="cpu", weights_only=True)
    assert weights["run_id"] == "0" and weights["model_name"] == "lraspp_mobilenet_v3_large"
    assert weights["class_names"][0] == "background" and len(weights["class_names"]) == 7
    best = load_torch(out / "state" / "best.pt")
    assert weights["epoch"] == best["epoch"] == summary["best_epoch"]
    assert_same_tensors(weights["model"], best["model"], atol=0)
    model = build_model("lraspp_mobilenet_v3_large", 7, weights=str(out / "weights.pth"))
    assert_same_tensors(model.state_dict(), best["model"], atol=0)

    rows = read_csv(out / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2] and [int(r["step"]) for r in rows] == [3, 6]
    assert {"train_loss", "train_ce", "lr", "val_miou", "val_pixel_acc", "wall_time_s"} <= rows[0].keys()
    assert max(float(r["val_miou"]) for r in rows) == pytest.approx(summary["best_val_miou"])

    on_disk = json.loads((out / "summary.json").read_text())
    assert SUMMARY_FIELDS <= on_disk.keys()
    assert on_disk == json.loads(json.dumps(summary))
    assert on_disk["run_id"] == "0" and on_disk["description"] == "outputs test"
    assert on_disk["epochs"] == 2 and on_disk["steps"] == 6 and on_disk["best_epoch"] in (1, 2)
    assert on_disk["target_miou"] == 1.0 and on_disk["target_reached"] is False
    assert on_disk["device"] == "cpu" and on_disk["init"] is None
    assert set(on_disk["per_class_iou"]) == set(weights["class_names"])
    assert 0.0 <= on_disk["best_val_miou"] <= 1.0
    assert any("not reached" in line for line in logs)

    # a chained run starts from weights.pth
    chain = tiny_config(runs={"0": {}, "ft": {"init": "0"}})
    chained = Trainer(RunSettings.from_dict(resolve_run(chain, "ft")), tmp_path / "ft",
                      init_weights=str(out / "weights.pth"), log=lambda *_: None)
    assert chained.run.init == "0"
    assert_same_tensors(chained.model.state_dict(), best["model"], atol=0)


def test_init_weights_of_the_wrong_shape_fail_naming_the_file(tiny_run, tmp_path) -> None:
    path = tmp_path / "three_classes.pth"
    save_torch(path, {"model": build_model("lraspp_mobilenet_v3_large", 3).state_dict()})
    with pytest.raises(RuntimeError, match="three_classes.pth"):
        Trainer(tiny_run(), tmp_path / "out", init_weights=str(path))


def test_checkpoints_record_provenance_and_an_init_from_other_data_is_refused(tiny_run, tmp_path) -> None:
    out = tmp_path / "out"
    Trainer(tiny_run(), out, log=lambda *_: None).fit()
    weights = load_torch(out / "weights.pth")
    assert set(weights["provenance"]) == {"dataset", "class_names"} and len(weights["class_names"]) == 7
    # the same data: the chain starts
    Trainer(tiny_run("ft"), tmp_path / "ft", init_weights=str(out / "weights.pth"), log=lambda *_: None)
    # other classes: refused, naming the file and what differs
    renamed = tiny_run("ft2", data={"class_names": ["bg", "a", "b", "c", "d", "e", "f"]})
    with pytest.raises(ProvenanceError, match=r"weights.pth: this checkpoint was produced by another setup:"
                                              r"(.|\n)*class_names: file has \['background'"):
        Trainer(renamed, tmp_path / "ft2", init_weights=str(out / "weights.pth"), log=lambda *_: None)
    # a checkpoint that records nothing cannot be checked
    bare = tmp_path / "bare.pth"
    save_torch(bare, {"model": weights["model"]})
    with pytest.raises(ProvenanceError, match="records nothing about what produced it"):
        Trainer(tiny_run("ft3"), tmp_path / "ft3", init_weights=str(bare), log=lambda *_: None)
    # and the jobs that read finished weights (evaluation, prefill, adaptation data) check them too
    assert load_run(tiny_run(), str(out / "weights.pth")).class_names == weights["class_names"]
    with pytest.raises(ProvenanceError, match=r"weights.pth: this checkpoint was produced by another setup"):
        load_run(renamed, str(out / "weights.pth"))
    with pytest.raises(ProvenanceError, match="records nothing about what produced it"):
        load_run(tiny_run(), str(bare))
