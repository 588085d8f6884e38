"""The Snakemake workflow through the real CLI, in temporary copies of the repository."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from snakemake_helpers import SNAKEMAKE, job_stats
from snakemake_helpers import copy_repo as copy_repo_files


TINY_CONFIG = {
    "data": {"root": "resources/data/synthetic", "resize": 48, "crop": 48,
             "synthetic": {"num_train": 16, "num_val": 8, "image_size": 48, "seed": 0}},
    "train": {"batch_size": 8, "eval_batch_size": 8, "epochs": 2, "warmup_steps": 0, "threads": 1,
              "progress": False, "device": "cpu"},
    "runs": {"0": {"description": "tiny base"},
             "ft": {"description": "tiny chained", "init": "0", "train": {"epochs": 1}}},
    "summary": ["0", "ft"],
}


def copy_repo(dest: Path, config: dict | None = None) -> Path:
    copy_repo_files(dest)
    if config is not None:
        (dest / "config" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return dest


def snakemake(cwd: Path, *args: str, env_extra: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TTDL_DEBUG_KILL_AT_STEP"}
    env.update(env_extra or {})
    return subprocess.run([str(SNAKEMAKE), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def output_of(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


def train_jobs(text: str) -> set[str]:
    """Run ids of the train jobs a dry run lists ('rule train:' blocks and their wildcards)."""
    runs = set()
    for block in re.split(r"\n(?=\S)", text):
        if block.lstrip().startswith("rule train:"):
            match = re.search(r"wildcards: run=(\S+)", block)
            assert match, block
            runs.add(match.group(1))
    return runs


@pytest.fixture(scope="module")
def default_copy(tmp_path_factory) -> Path:
    """A copy of the repository with its shipped config (for dry runs only)."""
    return copy_repo(tmp_path_factory.mktemp("wf_default") / "repo")


@pytest.fixture(scope="module")
def shipped_config() -> dict:
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


# ---- dry runs ----------------------------------------------------------------------

def test_dry_run_of_one_weights_file_lists_only_data_and_train(default_copy) -> None:
    proc = snakemake(default_copy, "-n", "results/0/weights.pth")
    assert proc.returncode == 0, output_of(proc)
    assert job_stats(output_of(proc)) == {"make_data": 1, "train": 1, "total": 2}
    assert train_jobs(output_of(proc)) == {"0"}
    assert not (default_copy / "results").exists() and not (default_copy / "resources").exists()


def test_dry_run_of_all_trains_every_run_and_summarizes(default_copy, shipped_config) -> None:
    proc = snakemake(default_copy, "-n", "all")
    assert proc.returncode == 0, output_of(proc)
    text = output_of(proc)
    stats = job_stats(text)
    runs = set(shipped_config["runs"])
    assert stats["train"] == len(runs) and train_jobs(text) == runs
    assert stats["summarize"] == 1 and stats["make_data"] == 1
    assert stats["evaluate"] == len(shipped_config["summary"])


def test_dry_run_of_the_31_chain_target(default_copy) -> None:
    proc = snakemake(default_copy, "-n", "-p", "results/3.1/phase1/weights.pth")
    assert proc.returncode == 0, output_of(proc)
    text = output_of(proc)
    assert job_stats(text)["train"] == 1
    assert train_jobs(text) == {"3.1/phase1"}
    assert "--out results/3.1/phase1" in text


def test_dry_run_of_the_whole_31_chain(default_copy, shipped_config) -> None:
    """results/3.1/weights.pth pulls in every run of its init chain (3.1 <- 3.1/phase2 <- 3.1/phase1)."""
    chain, run = [], "3.1"
    while run is not None:
        chain.append(run)
        run = shipped_config["runs"][run].get("init")
    assert len(chain) >= 2 and chain[-1] == "3.1/phase1"
    proc = snakemake(default_copy, "-n", "results/3.1/weights.pth")
    assert proc.returncode == 0, output_of(proc)
    assert set(chain) <= train_jobs(output_of(proc))


@pytest.mark.parametrize("where", ["file", "command line"])
def test_wrong_key_fails_before_any_job(tmp_path, where) -> None:
    if where == "file":
        config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
        config["train"]["learning_rate"] = 0.1
        repo = copy_repo(tmp_path / "repo", config)
        proc = snakemake(repo, "results/0/weights.pth")
        key = "learning_rate"
    else:
        repo = copy_repo(tmp_path / "repo")
        proc = snakemake(repo, "results/0/weights.pth", "--config", "trian={epochs: 1}")
        key = "trian"
    text = output_of(proc)
    assert proc.returncode != 0
    assert key in text and "invalid config" in text, text
    assert "Job stats" not in text and "rule make_data" not in text
    for made in ("resources", "results", "logs"):
        assert not (repo / made).exists(), made


def test_lint_reports_only_missing_conda_or_container(default_copy) -> None:
    proc = snakemake(default_copy, "--lint")
    text = output_of(proc)
    assert "Traceback" not in text and "Error" not in text, text
    lints = re.findall(r"^\s+\* (.+?):\s*$", text, flags=re.M)
    assert lints or "good condition" in text, text  # the linter really ran
    others = [lint for lint in lints if "conda environment or container" not in lint]
    assert others == [], text


# ---- real runs ---------------------------------------------------------------------

def test_tiny_workflow_produces_the_summary(tmp_path) -> None:
    repo = copy_repo(tmp_path / "repo", TINY_CONFIG)
    proc = snakemake(repo, "all")
    assert proc.returncode == 0, output_of(proc)
    md = (repo / "results" / "summary.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| experiment")]
    assert [row.split("|")[1].strip() for row in rows] == TINY_CONFIG["summary"]
    assert (repo / "results" / "summary.csv").read_text().count("\n") == 1 + len(TINY_CONFIG["summary"])
    for run in TINY_CONFIG["runs"]:
        for name in ("weights.pth", "metrics.csv", "summary.json", "eval.json"):
            assert (repo / "results" / run / name).is_file(), (run, name)
    ft_summary = yaml.safe_load((repo / "results" / "ft" / "summary.json").read_text())
    assert ft_summary["init"] == "0" and ft_summary["epochs"] == 1
    assert (repo / "resources" / "data" / "synthetic" / "classes.txt").is_file()
    # everything is up to date now: a second call plans nothing
    again = snakemake(repo, "-n", "all")
    assert again.returncode == 0 and "Nothing to be done" in output_of(again), output_of(again)


def test_sigkill_of_a_train_job_resumes_on_rerun(tmp_path) -> None:
    config = yaml.safe_load(yaml.safe_dump(TINY_CONFIG))
    config["train"]["checkpoint_every_steps"] = 1
    repo = copy_repo(tmp_path / "repo", config)
    target = "results/0/weights.pth"
    killed = snakemake(repo, target, env_extra={"TTDL_DEBUG_KILL_AT_STEP": "3"})
    assert killed.returncode != 0, output_of(killed)
    assert not (repo / target).exists()
    assert (repo / "results" / "0" / "state" / "last.pt").is_file()
    rerun = snakemake(repo, target)
    assert rerun.returncode == 0, output_of(rerun)
    log = (repo / "logs" / "train" / "0.log").read_text()
    assert "resumed 0 from" in log and "step 3" in log, log
    assert (repo / target).is_file()
