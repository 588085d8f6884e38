"""Helpers for tests that drive the real Snakemake CLI in temporary copies of the repository."""
from __future__ import annotations

import fcntl
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).parent / "snakemake"
COPIED = ("workflow", "scripts", "config", "profiles", ".test", "Makefile")
# The small config of .test/ (snakemake-workflows convention) in place of the shipped one:
# without --replace-workflow-config, Snakemake merges it over config/config.yaml.
TEST_CONFIG = ("--configfile", ".test/config.yaml", "--replace-workflow-config")


def copy_repo(dest: Path) -> Path:
    """The parts of the repository a workflow run needs, copied to `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(REPO / name, dest / name)
    return dest


VENV = Path(sys.executable).parent.parent
MAKE = shutil.which("make") or "make"


def make_command(*args: str) -> list[str]:
    """`make ARGS` in a copy of the repository, as a user runs it, with this interpreter's venv.

    The copy has no venv of its own: VENV names this one, and `-o` keeps make from checking
    (and so ever reinstalling) its stamp, whose prerequisites the copy lacks.
    """
    return [MAKE, "--no-print-directory", "-o", f"{VENV}/.installed", f"VENV={VENV}", *args]


def make(cwd: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(make_command(*args), cwd=cwd, capture_output=True, text=True, timeout=timeout)


def hold_workflow_lock(repo: Path):
    """The lock `make all` holds for its whole run (Makefile: LOCK), taken here as a running
    make would take it; close the returned file to release it."""
    (repo / ".snakemake").mkdir(exist_ok=True)
    handle = open(repo / ".snakemake" / "make.lock", "a")
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return handle


def job_stats(text: str) -> dict[str, int]:
    """The 'Job stats' table of a (dry) run: rule name -> job count, with 'total'."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "Job stats:")
    stats = {}
    for line in lines[start + 1:]:
        parts = line.split()
        if len(parts) != 2 or parts[0] in ("job",) or set(parts[0]) == {"-"}:
            if stats and not line.strip():
                break
            continue
        stats[parts[0]] = int(parts[1])
        if parts[0] == "total":
            break
    assert "total" in stats, text
    return stats
