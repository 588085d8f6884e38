"""One GPU per job: a slot allocator over lock files.

`snakemake --resources gpu=N` only *counts* GPUs: it never says which one a job
may use, so N concurrent jobs would all start on cuda:0. Each GPU job is
therefore started through `scripts/with_gpu_slot.py` (the GPU rules wrap their
shell command in `gpu_job(...)`, workflow/rules/code.smk), which takes the first
free slot among the visible GPUs and exports `CUDA_VISIBLE_DEVICES` for it.

A slot is held by an exclusive `fcntl.flock` on `<lock dir>/<scope>/gpu<ID>.lock`.
The kernel drops the lock when the last descriptor of it closes, i.e. when the
holder (and any child that inherited the descriptor) exits for whatever reason,
SIGKILL included, so a crashed job never leaves a stale slot behind; lock files
are never deleted (deleting a locked file would let two holders coexist).

The `scope` folder keeps unrelated allocations apart on a shared file system:
it is the host name, plus the SLURM job id inside a SLURM allocation (two SLURM
jobs on one node both see their own GPU as "0").

Which GPUs: `TTDL_GPUS` ("0,1,2,3"; "" or "none" = CPU only), else a set
`CUDA_VISIBLE_DEVICES` (its entries are kept as given, so a restriction made
outside is respected), else `torch.cuda.device_count()`. With no GPU the job
runs on the CPU: no lock, and `CUDA_VISIBLE_DEVICES=""` so it cannot grab one.

Describer servers: with `TTDL_DESCRIBER_URLS="http://h:11434,http://h:11435"`
the job on slot i gets `TTDL_DESCRIBER_BASE_URL` = entry i mod n (one server
per GPU); `TTDL_GPU_SLOT` always carries the slot index.

One process per job: a job's command also holds a lock named after the job (its
log path, `--job-lock`), on the CPU too. Killing Snakemake alone (not its process
group) leaves its jobs running as orphans; the rerun's copy of such a job then
waits for the orphan to end and resumes from what it left, instead of training
the same run in two processes at once.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import random
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

DEFAULT_LOCK_DIR = ".snakemake/gpu_slots"
JOB_LOCK_DIR = ".snakemake/job_locks"
ENV_GPUS = "TTDL_GPUS"
ENV_LOCK_DIR = "TTDL_GPU_SLOT_DIR"
ENV_DESCRIBER_URLS = "TTDL_DESCRIBER_URLS"
ENV_DESCRIBER_URL = "TTDL_DESCRIBER_BASE_URL"
ENV_SLOT = "TTDL_GPU_SLOT"


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.replace(" ", ",").split(",") if part.strip()]


def visible_gpus(env: Mapping[str, str] | None = None) -> list[str]:
    """The GPU ids jobs may be given, as CUDA_VISIBLE_DEVICES entries (see module doc)."""
    env = os.environ if env is None else env
    for name in (ENV_GPUS, "CUDA_VISIBLE_DEVICES"):
        if name in env:
            value = env[name].strip()
            if value.lower() in ("", "none", "cpu", "-1"):
                return []
            return _split(value)
    try:  # only now: importing torch costs a second per job
        import torch
    except ImportError:
        return []
    return [str(i) for i in range(torch.cuda.device_count())]


def slot_scope(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    scope = socket.gethostname() or "localhost"
    if env.get("SLURM_JOB_ID"):
        scope += f"-slurm{env['SLURM_JOB_ID']}"
    return scope


@dataclass
class Slot:
    """A held GPU slot (or the CPU, when `gpu` is None)."""

    index: int | None
    gpu: str | None
    lock_path: Path | None = None
    fd: int | None = field(default=None, repr=False)
    describer_url: str | None = None

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """`base` (default os.environ) with this slot's device and describer exported."""
        env = dict(os.environ if base is None else base)
        env["CUDA_VISIBLE_DEVICES"] = self.gpu if self.gpu is not None else ""
        if self.index is None:
            env.pop(ENV_SLOT, None)
        else:
            env[ENV_SLOT] = str(self.index)
        if self.describer_url:
            env[ENV_DESCRIBER_URL] = self.describer_url
        return env

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = None


def _try_lock(path: Path) -> int | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def acquire(
    *,
    lock_dir: str | os.PathLike | None = None,
    timeout: float | None = None,
    poll_s: float = 0.1,
    env: Mapping[str, str] | None = None,
) -> Slot:
    """Take the first free GPU slot, waiting up to `timeout` seconds (None = forever).

    Raises TimeoutError when every slot stays busy. Snakemake's `gpu` resource
    keeps the number of GPU jobs <= the number of GPUs, so the wait is normally
    zero; it only matters when something else (another Snakemake, a manual run
    through the wrapper) shares the GPUs.
    """
    env = os.environ if env is None else env
    gpus = visible_gpus(env)
    urls = _split(env.get(ENV_DESCRIBER_URLS, ""))
    if not gpus:
        return Slot(None, None)  # CPU: the describer config's own endpoints apply
    root = Path(lock_dir or env.get(ENV_LOCK_DIR) or DEFAULT_LOCK_DIR) / slot_scope(env)
    root.mkdir(parents=True, exist_ok=True)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        for index, gpu in enumerate(gpus):
            path = root / f"gpu{gpu}.lock"
            fd = _try_lock(path)
            if fd is None:
                continue
            _mark_holder(fd)
            return Slot(index, gpu, path, fd, urls[index % len(urls)] if urls else None)
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(f"all {len(gpus)} GPU slots in {root} stayed busy for {timeout} s "
                               f"(GPUs {','.join(gpus)}; set {ENV_GPUS} or run fewer GPU jobs)")
        time.sleep(poll_s * (0.5 + random.random()))  # jitter: waiters do not poll in lockstep


@contextlib.contextmanager
def gpu_slot(**kwargs) -> Iterator[Slot]:
    """`with gpu_slot() as slot:` hold a slot (see `acquire`) for the block."""
    slot = acquire(**kwargs)
    try:
        yield slot
    finally:
        slot.release()


def _mark_holder(fd: int) -> None:
    os.ftruncate(fd, 0)  # who holds it, for people (and waiters) looking at the file
    os.write(fd, f"pid {os.getpid()}\n".encode())


def hold_job_lock(key: str, lock_dir: str | os.PathLike | None = None, say=print) -> int | None:
    """The descriptor of job `key`'s lock, waiting (and saying so) while another process holds it.

    `key` is a relative path naming the job (the workflow passes its log path). On a file
    system without flock (some cluster mounts) the job runs unguarded, with a warning:
    the lock protects against a rare mishap and must not stop every job.
    """
    parts = Path(key).parts
    if not parts or Path(key).is_absolute() or ".." in parts:
        raise ValueError(f"job lock key {key!r} must be a relative path without '..'")
    path = Path(lock_dir or JOB_LOCK_DIR) / f"{key}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = _try_lock(path)
    except OSError as exc:
        if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        say(f"with_gpu_slot: warning: {path.parent} does not support flock ({exc.strerror}); running this job "
            f"without its lock (a killed Snakemake's orphan of it would not be waited for)", flush=True)
        return None
    if fd is None:
        holder = path.read_text(errors="replace").strip() or "another process"
        say(f"with_gpu_slot: {holder} still runs this job ({key}; left running by a killed Snakemake?): "
            f"waiting for it to end, then this one resumes from what it left", flush=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        fcntl.flock(fd, fcntl.LOCK_EX)  # blocks until the holder exits, however it exits
    _mark_holder(fd)
    return fd


def exec_with_slot(cmd: list[str], *, job_key: str | None = None, job_lock_dir: str | os.PathLike | None = None,
                   **kwargs) -> None:
    """Take the job's lock (when `job_key` is given) and a slot, then replace this process by `cmd`
    with the slot's environment.

    exec keeps the locked descriptors (made inheritable) in the command itself,
    so the locks live exactly as long as the command and whatever it forks, and
    Snakemake's signals reach the real job, not a wrapper.
    """
    if not cmd:
        raise ValueError("no command given")
    held = [] if job_key is None else [fd for fd in [hold_job_lock(job_key, job_lock_dir)] if fd is not None]
    slot = acquire(**kwargs)
    if slot.fd is not None:
        held.append(slot.fd)
    for fd in held:
        os.set_inheritable(fd, True)
    os.execvpe(cmd[0], cmd, slot.env())
