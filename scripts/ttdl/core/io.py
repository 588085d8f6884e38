"""Atomic file writes and safe checkpoint loading.

Every artefact the workflow produces goes through these helpers so that a job
killed mid-write never leaves a truncated file that a rerun would trust. torch is
imported only where a checkpoint is written or read, so torch-free jobs (data
checks, conversions) can use the same helpers without paying for the import.

A write goes to a temp file `.<name>.<8 random chars>.tmp` beside its target and is
renamed over the target once complete. A job killed mid-write leaves that temp file
behind; `sweep_stale_temp` removes such leftovers when the job starts again.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import pickle
import re
import secrets
import shutil
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Iterator

# Temp files of atomic_path: tempfile.mkstemp(prefix=".<name>.", suffix=".tmp") draws 8 characters
# from [a-z0-9_]; _link_previous uses 8 hex digits. Nothing else matches this.
TEMP_PATTERN = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")
# when this process started (the import of this module comes first in every job): temp files
# older than this were left by an earlier, interrupted process, never by a write of this one
PROCESS_START = time.time()


class CheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be loaded; the message names it and says what to do.

    `path` is the file and `reason` what is wrong with it, for callers that say more.
    """

    def __init__(self, message: str, path: Path | None = None, reason: str = ""):
        super().__init__(message)
        self.path, self.reason = path, reason


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, keep_previous: str | os.PathLike | None = None,
                sweep_stale: bool = False) -> Iterator[Path]:
    """Yield a temp path beside `path`; rename it over `path` only if the block succeeds.

    The data is fsynced before the rename (a power cut cannot leave a renamed but
    empty file), and the file gets the umask's permissions rather than mkstemp's 0600,
    so results stay readable by the other users of a shared machine.

    With `keep_previous`, the file `path` held until now becomes `keep_previous` (a
    hard link, or a copy, renamed into place), so `path` never goes missing and both
    are complete files at every moment.

    With `sweep_stale`, temp files of earlier writes of this same target that a killed
    process left behind are removed first (the job writers pass it; bulk writers of
    data sets do not, since listing a folder of thousands of files per write adds up).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if sweep_stale:
        _sweep_target(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())
        if keep_previous is not None and path.exists():
            _link_previous(path, Path(keep_previous))
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _sweep_target(path: Path) -> None:
    for candidate in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        try:
            if is_temp_file(candidate) and candidate.stat().st_mtime < PROCESS_START:
                candidate.unlink()
        except FileNotFoundError:  # removed meanwhile
            continue


def _link_previous(path: Path, previous: Path) -> None:
    link = previous.with_name(f".{previous.name}.{secrets.token_hex(4)}.tmp")
    try:
        os.link(path, link)
    except OSError:  # no hard links on this file system: a copy, so `path` never goes missing
        shutil.copyfile(path, link)
    os.replace(link, previous)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def is_temp_file(path: str | os.PathLike) -> bool:
    """Whether `path` is named like a temp file of atomic_path."""
    return bool(TEMP_PATTERN.match(Path(path).name))


def sweep_stale_temp(directory: str | os.PathLike, older_than: float | None = None) -> list[Path]:
    """Delete temp files of interrupted atomic writes in `directory` (not its subfolders); return them.

    Not recursive on purpose: results/{run}/seed{n}/ of another job lives below results/{run}/.

    Only files named like atomic_path's temp files and last modified before
    `older_than` (default: this process's start) are touched, so a write in
    progress in this process is never removed.
    """
    directory = Path(directory)
    cutoff = PROCESS_START if older_than is None else older_than
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    for candidate in sorted(directory.glob(".*.tmp")):
        if not is_temp_file(candidate) or not candidate.is_file() or candidate.is_symlink():
            continue
        try:
            if candidate.stat().st_mtime < cutoff:
                candidate.unlink()
                removed.append(candidate)
        except FileNotFoundError:  # gone meanwhile
            continue
    return removed


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path, sweep_stale=True) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_torch(path: str | os.PathLike, obj: Any, keep_previous: str | os.PathLike | None = None) -> None:
    """torch.save through atomic_path; `keep_previous` keeps the file it replaces under that name."""
    import torch

    with atomic_path(path, keep_previous=keep_previous, sweep_stale=True) as tmp:
        with open(tmp, "wb") as handle:  # a file object: torch names the archive "archive", not after the temp
            torch.save(obj, handle)      # file, so equal objects give equal bytes (fingerprints hash them)


DEFAULT_REMEDY = ("delete it and rerun the workflow (`make all`, or `.venv/bin/snakemake --cores 1 <target>`); "
                  "the rule that writes this file runs again")


def load_torch(path: str | os.PathLike, map_location: Any = "cpu", remedy: str | None = None) -> Any:
    """Load a checkpoint without unpickling arbitrary objects (weights_only=True).

    A missing file raises FileNotFoundError; an empty, truncated or otherwise unreadable
    one raises CheckpointError naming the file, what is wrong with it and `remedy`
    (what to do about it; by default: delete it and rerun the workflow).
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:  # a complete file holding more than tensors: never unpickled here
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        reason = ("it holds Python objects besides tensors, which are not unpickled here (weights_only=True)"
                  + (f": {found.group(1)}" if found else ""))
        raise CheckpointError(f"cannot load checkpoint {path}: {reason}; only a file of tensors, lists and dicts "
                              f"can be used: re-save its tensors from the program that wrote it", path, reason) from exc
    except Exception as exc:  # empty, truncated or corrupt: say which file, what is wrong, what to do
        reason = _diagnose(path, exc)
        raise CheckpointError(f"cannot load checkpoint {path}: {reason}; {remedy or DEFAULT_REMEDY}",
                              path, reason) from exc


def _diagnose(path: Path, exc: Exception) -> str:
    """What is wrong with a checkpoint torch.load refused, in words (never an empty reason)."""
    size = path.stat().st_size
    if size == 0:
        return "the file is empty (0 bytes), so it was never written completely"
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive whose directory comes last
        return f"the file is truncated or not a PyTorch checkpoint ({size} bytes, not a complete zip archive)"
    reason = f"{type(exc).__name__}: {str(exc).splitlines()[0]}" if str(exc).strip() else type(exc).__name__
    return f"the file is corrupt ({size} bytes; {reason})"
