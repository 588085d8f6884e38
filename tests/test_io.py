"""Corrupt and interrupted files: atomic writes, stale temp files, empty or truncated
checkpoints, and a training state that cannot be read (issue 11, items 7 and 10)."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_settings
from ttdl.core.io import CheckpointError, atomic_path, is_temp_file, load_torch, save_torch, sweep_stale_temp
from ttdl.jobs.train import Trainer

AN_HOUR_AGO = time.time() - 3600


def temp_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob("*") if is_temp_file(p))


def make_stale(path: Path, data: bytes = b"half a checkpoint") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, (AN_HOUR_AGO, AN_HOUR_AGO))
    return path


# ---- atomic writes and their temp files -----------------------------------------------

def test_atomic_path_names_its_temp_file_so_that_a_sweep_finds_it(tmp_path) -> None:
    target = tmp_path / "weights.pth"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".weights.pth.") and is_temp_file(tmp)
        tmp.write_text("complete")
    assert target.read_text() == "complete" and temp_files(tmp_path) == []
    with pytest.raises(ValueError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise ValueError("the writer failed")
    assert target.read_text() == "complete" and temp_files(tmp_path) == []  # cleaned up, target untouched


def test_keep_previous_rotates_the_replaced_file(tmp_path) -> None:
    last, prev = tmp_path / "last.pt", tmp_path / "last.prev.pt"
    save_torch(last, {"n": 1}, keep_previous=prev)
    assert load_torch(last) == {"n": 1} and not prev.exists()  # nothing to keep yet
    save_torch(last, {"n": 2}, keep_previous=prev)
    save_torch(last, {"n": 3}, keep_previous=prev)
    assert load_torch(last) == {"n": 3} and load_torch(prev) == {"n": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.prev.pt", "last.pt"]  # no temp or link left


def test_temp_name_pattern_is_only_ours() -> None:
    assert is_temp_file(".last.pt.k3_9zq0a.tmp") and is_temp_file(".weights.pth.0123abcd.tmp")
    for other in ("last.pt", ".last.pt.tmp", "notes.tmp", ".x.abc.tmp", ".x.ABCDEFGH.tmp", ".x.abcdefgh.tmp.bak"):
        assert not is_temp_file(other), other


def test_sweep_removes_only_stale_temp_files_of_atomic_writes(tmp_path) -> None:
    stale = make_stale(tmp_path / "state" / ".last.pt.ab12cd34.tmp")
    stale_top = make_stale(tmp_path / ".metrics.csv.zz_9yy8x.tmp")
    fresh = tmp_path / "state" / ".best.pt.ef56gh78.tmp"
    fresh.write_bytes(b"a write in progress")  # newer than this process's start
    foreign = [make_stale(tmp_path / name) for name in (".hidden.tmp", "notes.tmp", ".x.abc.tmp", "last.pt")]
    assert sweep_stale_temp(tmp_path) == [stale_top]  # not recursive: a subfolder may be another job's
    assert stale.exists() and not stale_top.exists()
    assert sweep_stale_temp(tmp_path / "state") == [stale] and not stale.exists()
    assert fresh.exists() and all(p.exists() for p in foreign)
    assert sweep_stale_temp(tmp_path) == [] and sweep_stale_temp(tmp_path / "absent") == []
    assert sweep_stale_temp(tmp_path / "state", older_than=time.time() + 60) == [fresh]


KILLED_WRITER = """
import os, signal, sys
from ttdl.core.io import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    with open(tmp, "wb") as handle:
        handle.write(b"x" * 1_000_000)
        handle.flush()
        os.kill(os.getpid(), signal.SIGKILL)  # killed mid-write, like kill -9 of a job
"""


def test_a_kill_during_a_write_leaves_a_temp_file_that_the_next_process_sweeps(tmp_path) -> None:
    target = tmp_path / "state" / "last.pt"
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(target)], capture_output=True)
    assert killed.returncode == -9
    left = temp_files(tmp_path)
    assert len(left) == 1 and left[0].startswith(".last.pt.") and not target.exists()
    assert sweep_stale_temp(tmp_path / "state") == []  # this process started before the kill: maybe ours
    sweep = "import sys; from ttdl.core.io import sweep_stale_temp; print(*sweep_stale_temp(sys.argv[1]))"
    again = subprocess.run([sys.executable, "-c", sweep, str(tmp_path / "state")], capture_output=True, text=True,
                           check=True)
    assert again.stdout.strip() == str(tmp_path / "state" / left[0]) and temp_files(tmp_path) == []


# ---- checkpoints that cannot be read -----------------------------------------------------

REMEDY = ("delete it and rerun the workflow (`make all`, or `.venv/bin/snakemake --cores 1 <target>`); "
          "the rule that writes this file runs again")


def test_zero_byte_checkpoint_says_it_is_empty_and_what_to_do(tmp_path) -> None:
    path = tmp_path / "weights.pth"
    path.touch()
    with pytest.raises(CheckpointError) as info:
        load_torch(path)
    assert str(info.value) == (f"cannot load checkpoint {path}: the file is empty (0 bytes), so it was never "
                               f"written completely; {REMEDY}")
    assert info.value.path == path and info.value.reason.startswith("the file is empty")


def test_truncated_checkpoint_says_it_is_truncated_and_what_to_do(tmp_path) -> None:
    path = tmp_path / "last.pt"
    torch.save({"model": torch.arange(10_000)}, path)
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[: size // 2])
    with pytest.raises(CheckpointError) as info:
        load_torch(path, remedy="delete it to start over")
    message = str(info.value)
    assert message == (f"cannot load checkpoint {path}: the file is truncated or not a PyTorch checkpoint "
                       f"({size // 2} bytes, not a complete zip archive); delete it to start over")
    assert isinstance(info.value, RuntimeError)  # callers catching RuntimeError still do
    with pytest.raises(FileNotFoundError, match=f"checkpoint not found: {tmp_path / 'absent.pt'}"):
        load_torch(tmp_path / "absent.pt")


def test_a_pickle_of_arbitrary_objects_is_refused_with_what_it_holds(tmp_path) -> None:
    path = tmp_path / "foreign.pt"
    torch.save({"args": argparse.Namespace(lr=1)}, path)
    with pytest.raises(CheckpointError) as info:
        load_torch(path)
    assert str(info.value) == (f"cannot load checkpoint {path}: it holds Python objects besides tensors, which are "
                               f"not unpickled here (weights_only=True): argparse.Namespace; only a file of tensors, "
                               f"lists and dicts can be used: re-save its tensors from the program that wrote it")


def test_zero_byte_init_checkpoint_names_the_file(tiny_run, tmp_path) -> None:
    init = tmp_path / "results" / "init" / "weights.pth"
    init.parent.mkdir(parents=True)
    init.touch()
    with pytest.raises(CheckpointError) as info:
        Trainer(tiny_run(), tmp_path / "out", init_weights=str(init), log=lambda *_: None)
    assert str(info.value) == (f"cannot load checkpoint {init}: the file is empty (0 bytes), so it was never "
                               f"written completely; {REMEDY}")


# ---- a training state that cannot be read -----------------------------------------------

class StopAfter(Exception):
    pass


def stop_after(step: int):
    def hook(trainer, logs) -> None:
        if trainer.step == step:
            raise StopAfter(step)  # after the step's checkpoint, like a kill
    return hook


TWO_EPOCHS = {"epochs": 2, "checkpoint_every_steps": 1}  # 3 steps per epoch


@pytest.fixture(scope="module")
def interrupted(tiny_data, tmp_path_factory, one_thread) -> dict:
    """A straight 2-epoch run, and the same run stopped after step 4 (last.pt: step 4, last.prev.pt: step 3)."""
    run = make_tiny_settings(tiny_data, train=TWO_EPOCHS)
    base = tmp_path_factory.mktemp("corrupt_state")
    Trainer(run, base / "straight", log=lambda *_: None).fit()
    with pytest.raises(StopAfter):
        Trainer(run, base / "stopped", log=lambda *_: None, step_hooks=(stop_after(4),)).fit()
    return {"run": run, "base": base}


def copy_of(interrupted: dict, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(interrupted["base"] / "stopped", out)
    return out


def test_save_state_keeps_the_previous_state(interrupted) -> None:
    state = interrupted["base"] / "stopped" / "state"
    assert (load_torch(state / "last.pt")["step"], load_torch(state / "last.prev.pt")["step"]) == (4, 3)
    assert temp_files(interrupted["base"]) == []


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:1000])


def test_a_corrupt_last_state_falls_back_to_the_previous_one(interrupted, tmp_path) -> None:
    out = copy_of(interrupted, tmp_path)
    state = out / "state"
    truncate(state / "last.pt")
    logs: list[str] = []
    trainer = Trainer(interrupted["run"], out, log=logs.append)
    assert trainer.try_resume() and (trainer.step, trainer.epoch, trainer.step_in_epoch) == (3, 1, 0)
    assert logs[0] == (f"WARNING: [0] {state / 'last.pt'} is unreadable (the file is truncated or not a PyTorch "
                       f"checkpoint (1000 bytes, not a complete zip archive)); resuming from "
                       f"{state / 'last.prev.pt'}, saved one checkpoint earlier. The unreadable file was moved to "
                       f"{state / 'last.pt.corrupt'}; delete it once you no longer need it.")
    assert logs[1] == f"resumed 0 from {state / 'last.prev.pt'}: epoch 1, step 3 (0 into the epoch)"
    assert not (state / "last.pt").exists() and (state / "last.pt.corrupt").stat().st_size == 1000

    summary = Trainer(interrupted["run"], out, log=lambda *_: None).fit()  # the rerun: from last.prev.pt again
    assert summary["steps"] == 6
    straight = load_torch(interrupted["base"] / "straight" / "weights.pth")["model"]
    resumed = load_torch(out / "weights.pth")["model"]
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert load_torch(state / "last.prev.pt")["step"] == 6 and load_torch(state / "last.pt")["done"]


def test_a_corrupt_last_state_without_a_previous_one_says_what_to_delete(interrupted, tmp_path) -> None:
    out = copy_of(interrupted, tmp_path)
    state = out / "state"
    (state / "last.prev.pt").unlink()
    (state / "last.pt").write_bytes(b"")
    expected = (f"[0] cannot resume: {state / 'last.pt'}: the file is empty (0 bytes), so it was never written "
                f"completely. Delete {state / 'last.pt'} and rerun to start this run over from its first epoch "
                f"(its progress is lost).")
    for _ in range(2):  # every rerun says the same, and what to do
        with pytest.raises(CheckpointError) as info:
            Trainer(interrupted["run"], out, log=lambda *_: None).fit()
        assert str(info.value) == expected
    (state / "last.pt").unlink()
    assert Trainer(interrupted["run"], out, log=lambda *_: None).fit()["steps"] == 6  # as the message said


def test_both_states_corrupt_names_both_files(interrupted, tmp_path) -> None:
    out = copy_of(interrupted, tmp_path)
    state = out / "state"
    truncate(state / "last.pt")
    (state / "last.prev.pt").write_bytes(b"")
    with pytest.raises(CheckpointError) as info:
        Trainer(interrupted["run"], out, log=lambda *_: None).try_resume()
    message = str(info.value)
    assert message == (f"[0] cannot resume: {state / 'last.pt'}: the file is truncated or not a PyTorch checkpoint "
                       f"(1000 bytes, not a complete zip archive); {state / 'last.prev.pt'}: the file is empty "
                       f"(0 bytes), so it was never written completely. Delete {state / 'last.pt'} and "
                       f"{state / 'last.prev.pt'} and rerun to start this run over from its first epoch (its "
                       f"progress is lost).")
    assert (state / "last.pt").exists()  # nothing is moved or deleted when there is nothing to fall back to


def test_a_stale_temp_file_is_swept_when_the_job_starts_again(interrupted, tmp_path) -> None:
    out = copy_of(interrupted, tmp_path)
    stale = make_stale(out / "state" / ".last.pt.q1w2e3r4.tmp", b"\0" * 100_000)
    stale_weights = make_stale(out / ".weights.pth.a_b_c_d_.tmp")
    keep = make_stale(out / "state" / "notes.tmp")
    logs: list[str] = []
    Trainer(interrupted["run"], out, log=logs.append).fit()
    assert not stale.exists() and not stale_weights.exists() and keep.exists()
    assert logs[:2] == [f"removed {stale_weights}, the temp file of an interrupted write",
                        f"removed {stale}, the temp file of an interrupted write"]
    assert temp_files(out) == []


def test_a_job_writer_removes_the_stale_temp_files_of_its_own_target(tmp_path):
    from ttdl.core import io

    stale = tmp_path / ".eval.json.abcd1234.tmp"
    other = tmp_path / ".summary.json.abcd1234.tmp"
    for path in (stale, other):
        path.write_text("left by a killed write")
        os.utime(path, (io.PROCESS_START - 60, io.PROCESS_START - 60))
    io.write_json(tmp_path / "eval.json", {"miou": 0.5})
    assert not stale.exists()  # this target's leftover is gone
    assert other.exists()  # another target's temp file may belong to a job still writing it
    assert json.loads((tmp_path / "eval.json").read_text()) == {"miou": 0.5}


def test_equal_objects_give_equal_checkpoint_bytes(tmp_path):
    """Fingerprints hash init and cache files: a checkpoint's bytes must not depend on its temp name."""
    obj = {"w": torch.arange(6.0).reshape(2, 3), "epoch": 3}
    save_torch(tmp_path / "a.pt", obj)
    save_torch(tmp_path / "b.pt", obj)
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()


def test_rerunning_a_finished_run_leaves_its_states_alone(tiny_run, tmp_path):
    out = tmp_path / "out"
    Trainer(tiny_run(), out, log=lambda *_: None).fit()
    before = {name: (out / "state" / name).read_bytes() for name in ("last.pt", "last.prev.pt")}
    Trainer(tiny_run(), out, log=lambda *_: None).fit()
    assert {name: (out / "state" / name).read_bytes() for name in before} == before
