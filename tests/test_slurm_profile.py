"""The SLURM profile (profiles/slurm) through a real Snakemake dry run, in a copy of the repository.

No cluster here, and none is needed: a dry run loads the executor plugin
(pinned in envs/requirements.txt) and the profile's resources but calls no
SLURM tool (checked with snakemake-executor-plugin-slurm 2.8.0, no sbatch on PATH).
"""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from snakemake_helpers import REPO, SNAKEMAKE, copy_repo

GPU_RULES = ("train", "adapt_encoder", "adapt_concat", "prefill_cache", "evaluate")


@pytest.fixture(scope="module")
def slurm_repo(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    import snakemake_executor_plugin_slurm  # noqa: F401  (pinned in envs/requirements.txt)
    root = tmp_path_factory.mktemp("slurm")
    repo = copy_repo(root / "repo")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PATH"] = os.pathsep.join([str(SNAKEMAKE.parent), env.get("PATH", "")])
    return repo, env


def dry_run(repo: Path, env: dict[str, str], *args: str) -> str:
    proc = subprocess.run([str(SNAKEMAKE), "-n", *args], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=120)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text
    return text


def planned_resources(text: str) -> dict[str, list[dict[str, str]]]:
    """rule name -> the `resources:` of each of its planned jobs, as printed by the dry run."""
    plan: dict[str, list[dict[str, str]]] = {}
    for block in re.split(r"\n(?=(?:local)?rule \S+:)", text):
        head = re.match(r"(?:local)?rule (\S+):", block.lstrip())
        found = re.search(r"^\s+resources: (.+)$", block, re.MULTILINE)
        if head and found:
            pairs = (item.split("=", 1) for item in found.group(1).split(", "))
            plan.setdefault(head.group(1), []).append({k.strip(): v.strip() for k, v in pairs})
    return plan


def test_profile_declares_one_gpu_for_gpu_rules_only() -> None:
    profile = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    assert profile["executor"] == "slurm"
    assert {rule for rule, res in profile["set-resources"].items() if res.get("gpu") == 1} == set(GPU_RULES)
    assert "gpu" not in profile["default-resources"]


def test_dry_run_plans_train_on_one_gpu_and_data_on_cpu(slurm_repo) -> None:
    repo, env = slurm_repo
    text = dry_run(repo, env, "--workflow-profile", "profiles/slurm", "results/0/weights.pth")
    plan = planned_resources(text)
    assert set(plan) == {"make_data", "train"}, text
    (train,) = plan["train"]
    assert train["gpu"] == "1" and train["runtime"] == "720" and train["cpus_per_task"] == "8"
    (data,) = plan["make_data"]
    assert "gpu" not in data and data["runtime"] == "60"
    assert not (repo / "results").exists()  # a dry run writes nothing


def test_profile_flag_gives_the_same_plan(slurm_repo) -> None:
    """`--profile profiles/slurm` (the usual spelling) must keep the GPU request too.

    With --profile, Snakemake still layers profiles/default on top, and a key set
    there replaces ours wholesale (set-resources included); hence the README
    recommends --workflow-profile, and this test catches a default profile that
    starts setting resources.
    """
    repo, env = slurm_repo
    text = dry_run(repo, env, "--profile", "profiles/slurm", "results/0/weights.pth")
    (train,) = planned_resources(text)["train"]
    assert train["gpu"] == "1"
