"""GPU slot allocation (ttdl.core.gpu_slots, scripts/with_gpu_slot.py) with real processes and locks.

No GPU is needed: the allocator only hands out ids from TTDL_GPUS and locks files.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO
from ttdl.core import gpu_slots
from ttdl.core.gpu_slots import acquire, gpu_slot, visible_gpus

WRAPPER = REPO / "scripts" / "with_gpu_slot.py"

# The job: record when it ran and what it was given, holding its slot ~0.3 s.
JOB = """
import json, os, sys, time
start = time.monotonic(); time.sleep(0.3); end = time.monotonic()
rec = {"start": start, "end": end, "gpu": os.environ["CUDA_VISIBLE_DEVICES"],
       "slot": os.environ.get("TTDL_GPU_SLOT"), "url": os.environ.get("TTDL_DESCRIBER_BASE_URL")}
with open(sys.argv[1], "a") as fh:
    fh.write(json.dumps(rec) + "\\n")
"""


def wrapper_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("TTDL_GPUS", "CUDA_VISIBLE_DEVICES", "TTDL_DESCRIBER_URLS", "SLURM_JOB_ID")}
    env.update(extra)
    return env


def wrapped(lock_dir: Path, *cmd: str) -> list[str]:
    return [sys.executable, str(WRAPPER), "--lock-dir", str(lock_dir), "--", *cmd]


def test_concurrent_jobs_never_share_a_gpu(tmp_path) -> None:
    out = tmp_path / "records.jsonl"
    env = wrapper_env(TTDL_GPUS="0,1", TTDL_DESCRIBER_URLS="http://a:11434,http://b:11434")
    t0 = time.monotonic()
    procs = [subprocess.Popen(wrapped(tmp_path / "locks", sys.executable, "-c", JOB, str(out)), env=env)
             for _ in range(6)]
    assert [p.wait(timeout=30) for p in procs] == [0] * 6
    elapsed = time.monotonic() - t0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 6
    assert {r["gpu"] for r in records} == {"0", "1"}  # both slots used, nothing else handed out
    for gpu in ("0", "1"):
        runs = sorted((r["start"], r["end"]) for r in records if r["gpu"] == gpu)
        for (_, end), (start, _) in zip(runs, runs[1:]):
            assert start >= end, f"two jobs on GPU {gpu} at once: {runs}"
    # per-slot describer server and slot index travel with the device
    assert all((r["slot"], r["url"]) == ({"0": "0", "1": "1"}[r["gpu"]], {"0": "http://a:11434",
               "1": "http://b:11434"}[r["gpu"]]) for r in records)
    assert elapsed >= 3 * 0.3  # 6 jobs on 2 slots: at least three rounds


def test_a_sigkilled_holder_frees_its_slot(tmp_path) -> None:
    locks = tmp_path / "locks"
    holder = subprocess.Popen(
        wrapped(locks, sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(60)"),
        env=wrapper_env(TTDL_GPUS="3"), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(TimeoutError, match="stayed busy"):
            acquire(lock_dir=locks, timeout=0.2, env={"TTDL_GPUS": "3"})
        holder.send_signal(signal.SIGKILL)
        assert holder.wait(timeout=10) == -signal.SIGKILL
        with gpu_slot(lock_dir=locks, timeout=2, env={"TTDL_GPUS": "3"}) as slot:
            assert slot.gpu == "3" and slot.index == 0
            assert slot.env({})["CUDA_VISIBLE_DEVICES"] == "3"
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.stdout.close()


def test_a_released_slot_is_free_again_and_busy_slots_time_out(tmp_path) -> None:
    env = {"TTDL_GPUS": "0,1"}
    with gpu_slot(lock_dir=tmp_path, env=env) as first, gpu_slot(lock_dir=tmp_path, env=env) as second:
        assert (first.gpu, second.gpu) == ("0", "1")
        with pytest.raises(TimeoutError):
            acquire(lock_dir=tmp_path, timeout=0, env=env)
    with gpu_slot(lock_dir=tmp_path, timeout=0, env=env) as again:
        assert again.gpu == "0"


def test_slurm_jobs_lock_in_their_own_scope(tmp_path) -> None:
    """Two SLURM jobs on one node both see their GPU as '0': they must not wait for each other."""
    with gpu_slot(lock_dir=tmp_path, timeout=0, env={"CUDA_VISIBLE_DEVICES": "0", "SLURM_JOB_ID": "11"}):
        with gpu_slot(lock_dir=tmp_path, timeout=0, env={"CUDA_VISIBLE_DEVICES": "0", "SLURM_JOB_ID": "12"}):
            with pytest.raises(TimeoutError):
                acquire(lock_dir=tmp_path, timeout=0, env={"CUDA_VISIBLE_DEVICES": "0", "SLURM_JOB_ID": "11"})


def test_which_gpus(monkeypatch) -> None:
    assert visible_gpus({"TTDL_GPUS": "0, 2,5", "CUDA_VISIBLE_DEVICES": "1"}) == ["0", "2", "5"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}) == ["2", "3"]  # an outer restriction is kept
    assert visible_gpus({"TTDL_GPUS": "none"}) == [] and visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert visible_gpus({}) == ["0", "1"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert visible_gpus({}) == []


def test_no_gpu_means_cpu_without_locks(tmp_path, monkeypatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    for env in ({}, {"TTDL_GPUS": ""}, {"TTDL_GPUS": "none", "TTDL_DESCRIBER_URLS": "http://a:1"}):
        with gpu_slot(lock_dir=tmp_path / "locks", timeout=0, env=env) as slot:
            assert slot.gpu is None and slot.index is None and slot.fd is None
            child = slot.env({"CUDA_VISIBLE_DEVICES": "0", "TTDL_GPU_SLOT": "1"})
            assert child["CUDA_VISIBLE_DEVICES"] == "" and "TTDL_GPU_SLOT" not in child
            assert "TTDL_DESCRIBER_BASE_URL" not in child
    assert not (tmp_path / "locks").exists()


def test_wrapper_cli_on_cpu_passes_exit_code_and_hides_gpus(tmp_path) -> None:
    code = "import os, sys; print(repr(os.environ['CUDA_VISIBLE_DEVICES'])); sys.exit(3)"
    proc = subprocess.run(wrapped(tmp_path, sys.executable, "-c", code), env=wrapper_env(TTDL_GPUS="none"),
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 3 and proc.stdout.strip() == "''", proc.stderr
    proc = subprocess.run([sys.executable, str(WRAPPER), "--"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "give the command after --" in proc.stderr
    assert gpu_slots.DEFAULT_LOCK_DIR.startswith(".snakemake/")


def test_a_second_copy_of_a_job_waits_for_the_first_and_other_jobs_do_not(tmp_path) -> None:
    """An orphan left by a killed Snakemake and the rerun's copy of its job never run at once."""
    env = wrapper_env(TTDL_GPUS="none")

    def job(key: str, name: str) -> subprocess.Popen:
        cmd = [sys.executable, str(WRAPPER), "--job-lock", key, "--job-lock-dir", str(tmp_path / "jobs"),
               "--", sys.executable, "-c", JOB, str(tmp_path / name)]
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)

    first = job("logs/train/a.log", "first")
    lock, deadline = tmp_path / "jobs/logs/train/a.log.lock", time.monotonic() + 20
    # the holder's pid is written once the lock is taken (the file alone exists a moment earlier)
    while not (lock.exists() and lock.read_text().startswith("pid")) and time.monotonic() < deadline:
        time.sleep(0.01)
    second, other = job("logs/train/a.log", "second"), job("logs/train/b.log", "other")
    outputs = [p.communicate(timeout=30)[0] for p in (first, second, other)]
    assert [p.returncode for p in (first, second, other)] == [0, 0, 0]
    span = {name: json.loads((tmp_path / name).read_text()) for name in ("first", "second", "other")}
    assert span["second"]["start"] >= span["first"]["end"], "two copies of one job ran at once"
    assert "still runs this job (logs/train/a.log" in outputs[1] and f"pid {first.pid}" in outputs[1]
    assert span["other"]["start"] < span["first"]["end"], "a different job waited too"
    assert "waiting" not in outputs[0] + outputs[2]


def test_job_lock_keys_must_stay_inside_the_lock_folder(tmp_path) -> None:
    for key in ("/etc/x", "../x", "a/../../x", ""):
        with pytest.raises(ValueError, match="relative path"):
            gpu_slots.hold_job_lock(key, tmp_path)


def test_a_file_system_without_flock_runs_the_job_unguarded_with_a_warning(tmp_path, monkeypatch) -> None:
    import errno

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    said: list[str] = []
    monkeypatch.setattr(gpu_slots.fcntl, "flock", no_flock)
    assert gpu_slots.hold_job_lock("logs/a.log", tmp_path, say=lambda text, **_: said.append(text)) is None
    assert "does not support flock" in said[0]
