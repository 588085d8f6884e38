"""Helpers for tests that drive the real Snakemake CLI in temporary copies of the repository."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).parent / "snakemake"
COPIED = ("workflow", "scripts", "config", "profiles", ".test")
# The small config of .test/ (snakemake-workflows convention) in place of the shipped one:
# without --replace-workflow-config, Snakemake merges it over config/config.yaml.
TEST_CONFIG = ("--configfile", ".test/config.yaml", "--replace-workflow-config")


def copy_repo(dest: Path) -> Path:
    """The parts of the repository a workflow run needs, copied to `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


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
