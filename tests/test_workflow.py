"""The Snakemake workflow through the real CLI, in temporary copies of the repository."""
from __future__ import annotations

import copy
import json
import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from snakemake_helpers import SNAKEMAKE, TEST_CONFIG, hold_workflow_lock, job_stats, make, make_command
from snakemake_helpers import copy_repo as copy_repo_files

TINY_CONFIG = yaml.safe_load((REPO / ".test" / "config.yaml").read_text())


def copy_repo(dest: Path, config: dict | None = None) -> Path:
    copy_repo_files(dest)
    if config is not None:
        (dest / "config" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return dest


def snakemake(cwd: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(SNAKEMAKE), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def killed_once(cwd: Path, sign: Path, command: list[str], timeout: float = 300,
                during=None) -> tuple[int, str]:
    """Run `command` (`make all`, Snakemake) in a process group of its own and SIGKILL the whole
    group (make, Snakemake and its jobs, as a lost node or a hard stop would) as soon as the
    file `sign` exists; `during()` is called just before the kill, while the run is alive.

    Returns the command's exit status (-SIGKILL when it was killed) and its output.
    """
    log = cwd / "killed_run.log"
    with log.open("w") as out:
        proc = subprocess.Popen(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and not sign.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        if proc.poll() is None and during is not None:
            during()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        returncode = proc.wait(timeout=30)
        while group_alive(proc.pid) and time.monotonic() < deadline + 30:  # the jobs go with it
            time.sleep(0.02)
        assert not group_alive(proc.pid), "a process of the killed run survived"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return returncode, log.read_text()


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
    # on a GPU slot, holding the job's lock
    assert "python scripts/with_gpu_slot.py --job-lock logs/train/3.1/phase1.log -- python scripts/train.py" in text


def planned_inputs(text: str, rule: str) -> set[str]:
    """The `input:` files of the first planned job of `rule` in a dry run's output."""
    block = re.search(rf"^(?:local)?rule {rule}:\n((?:[ \t]+.*\n)+)", text, flags=re.M)
    assert block, text
    line = re.search(r"^\s+input: (.+)$", block.group(1), flags=re.M)
    assert line, block.group(0)
    return set(line.group(1).split(", "))


def test_jobs_depend_on_the_package_modules_their_scripts_run(default_copy) -> None:
    """Shell rules have no code-change trigger: the ttdl modules a script imports are its inputs."""
    proc = snakemake(default_copy, "-n", "--forceall", "results/summary.md")
    assert proc.returncode == 0, output_of(proc)
    text = output_of(proc)
    train = planned_inputs(text, "train")
    assert {"scripts/train.py", "scripts/ttdl/__init__.py", "scripts/ttdl/jobs/__init__.py",
            "scripts/ttdl/jobs/train.py", "scripts/ttdl/core/models.py"} <= train, train
    assert not any(path.startswith("scripts/ttdl/report/") for path in train), train  # no retrain for a plot
    summarize = planned_inputs(text, "summarize")
    assert "scripts/ttdl/report/summary.py" in summarize
    assert not any(path.startswith(("scripts/ttdl/jobs/", "scripts/ttdl/text/")) for path in summarize)


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


def test_lint_is_clean(default_copy) -> None:
    proc = snakemake(default_copy, "--lint")
    text = output_of(proc)
    assert proc.returncode == 0 and "good condition" in text, text  # exit 1 on any lint


# ---- real runs ---------------------------------------------------------------------

@pytest.mark.slow
def test_tiny_workflow_produces_the_summary(tmp_path) -> None:
    repo = copy_repo(tmp_path / "repo")
    proc = snakemake(repo, *TEST_CONFIG, "all")
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
    again = snakemake(repo, *TEST_CONFIG, "-n", "all")
    assert again.returncode == 0 and "Nothing to be done" in output_of(again), output_of(again)
    # changed package code reruns the jobs that run it, and only those (Snakemake compares the
    # checksums of small inputs, so a touch alone would not count: the content must change)
    edit(repo / "scripts" / "ttdl" / "report" / "summary.py")
    report_only = snakemake(repo, *TEST_CONFIG, "-n", "all")
    assert report_only.returncode == 0, output_of(report_only)
    assert job_stats(output_of(report_only)) == {"all": 1, "summarize": 1, "total": 2}
    edit(repo / "scripts" / "ttdl" / "jobs" / "train.py")
    retrain = job_stats(output_of(snakemake(repo, *TEST_CONFIG, "-n", "all")))
    assert retrain["train"] == len(TINY_CONFIG["runs"]) and retrain["evaluate"] == len(TINY_CONFIG["summary"])


def edit(path: Path) -> None:
    """Change a source file's content (a trailing comment), with a later modification time."""
    path.write_text(path.read_text() + "\n# edited by a test\n")
    later = time.time() + 10
    os.utime(path, (later, later))


BUSY = ("make: another run of the workflow is still running in this checkout (it holds .snakemake/make.lock: "
        "make all, report, bench or download-voc); wait for it to end, or stop it, then run again")


def one_run_config() -> dict:
    """The tiny config with its first run only: `make all` = data, one training, evaluate, summary."""
    config = copy.deepcopy(TINY_CONFIG)
    config["runs"] = {"0": config["runs"]["0"]}
    config["summary"] = ["0"]
    return config


@pytest.mark.slow
def test_sigkill_of_make_all_then_make_all_again_finishes(tmp_path) -> None:
    """`kill -9` of the whole `make all` tree mid-training leaves Snakemake's lock behind; while
    it ran, a second `make all` was refused; `make all` again, with no manual step, clears the
    stale lock, resumes the killed training and finishes."""
    repo = copy_repo(tmp_path / "repo", one_run_config())
    (repo / "often.yaml").write_text("train: {checkpoint_every_steps: 1}\n")  # state/last.pt after step 1
    args = ("all", "CONFIG=often.yaml")
    state = repo / "results" / "0" / "state" / "last.pt"
    refused = []

    def second_make_all() -> None:
        refused.append(make(repo, *args, timeout=60))

    returncode, text = killed_once(repo, state, make_command(*args), during=second_make_all)
    assert returncode == -signal.SIGKILL, text  # killed, not finished
    assert state.is_file() and not (repo / "results" / "0" / "weights.pth").exists(), text
    assert refused and refused[0].returncode != 0 and BUSY in refused[0].stderr, refused
    assert "Building DAG" not in refused[0].stdout + refused[0].stderr  # refused before Snakemake started
    assert list((repo / ".snakemake" / "locks").iterdir()), "the killed Snakemake left no lock to clear"
    rerun = make(repo, *args)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "make: clearing Snakemake locks left by a killed run" in rerun.stdout
    log = (repo / "logs" / "train" / "0.log").read_text()
    resumed = re.search(r"resumed 0 from \S+: epoch \d+, step (\d+)", log)
    assert resumed and int(resumed.group(1)) >= 1, log
    assert (repo / "results" / "summary.md").is_file()
    locks = repo / ".snakemake" / "locks"
    assert not locks.exists() or not list(locks.iterdir())  # the finished run left no lock


def test_a_second_make_all_in_one_checkout_is_refused(tmp_path) -> None:
    """While a run holds the checkout's lock, `make all` stops at once with a clear message and
    touches nothing (Snakemake's own locks of the running workflow are left alone)."""
    repo = copy_repo(tmp_path / "repo", one_run_config())
    with hold_workflow_lock(repo):
        busy = make(repo, "all", timeout=60)
    assert busy.returncode != 0
    assert busy.stderr.splitlines()[0] == BUSY, busy.stderr
    for made in ("resources", "results", "logs"):
        assert not (repo / made).exists(), made
    assert not (repo / ".snakemake" / "locks").exists()


# ---- names and values through the real CLI ----------------------------------------------

def test_an_adaptation_named_like_a_command_is_refused_and_runs_nothing(tmp_path) -> None:
    config = copy.deepcopy(TINY_CONFIG)
    config["adaptations"] = {"z$(touch pwned)": {"init": "0"}}
    repo = copy_repo(tmp_path / "repo", config)
    proc = snakemake(repo, "results/z$(touch pwned)/encoder.pt")
    text = output_of(proc)
    assert proc.returncode != 0
    assert ("  - adaptations: 'z$(touch pwned)' is not a valid id: use segments of letters, digits, "
            "'_', '-' and '.' separated by '/', none starting with '.'") in text, text
    assert not [p for p in tmp_path.rglob("*pwned*") if p.name == "pwned"]
    for made in ("resources", "results", "logs"):
        assert not (repo / made).exists(), made


def test_a_run_id_that_leaves_the_results_tree_is_refused(tmp_path) -> None:
    config = copy.deepcopy(TINY_CONFIG)
    config["runs"]["../../escape"] = {}
    repo = copy_repo(tmp_path / "repo", config)
    proc = snakemake(repo, "all")
    text = output_of(proc)
    assert proc.returncode != 0
    assert "  - runs: '../../escape' is not a valid id" in text, text
    assert not (tmp_path / "escape").exists() and not (repo / "results").exists()


def train_run_json(text: str, run: str) -> dict:
    """The --run-json a dry run (-p) would hand the train job of `run`."""
    for line in text.splitlines():
        if "scripts/train.py" in line and f"--out results/{run} " in line:
            words = shlex.split(line.split("Shell command:", 1)[-1])
            return json.loads(words[words.index("--run-json") + 1])
    raise AssertionError(f"no train command for {run}:\n{text}")


def test_the_readme_override_example_works(default_copy) -> None:
    """`--config 'train={"epochs": 2}'` (the README's example): Snakemake hands nested values
    over as strings; the workflow types them by the schema."""
    readme = snakemake(default_copy, "-n", "results/0/weights.pth", "--config", 'train={"epochs": 2}')
    assert readme.returncode == 0, output_of(readme)
    # (every shipped run sets its own epochs, which win: check the typing on keys that reach run 0)
    proc = snakemake(default_copy, "-n", "-p", "results/0/weights.pth", "--config",
                     'train={"epochs": 2, "lr": "0.01", "grad_clip": null, "hflip": false}',
                     'runs={"0": {"train": {"epochs": 3}}}')
    text = output_of(proc)
    assert proc.returncode == 0, text
    train = train_run_json(text, "0")["train"]
    assert train["epochs"] == 3 and train["lr"] == 0.01 and train["grad_clip"] is None and train["hflip"] is False


@pytest.mark.parametrize("override, line", [
    ('train={"lr": "nan"}', "  - train.lr: nan is not a finite number"),
    ('train={"epochs": "two"}', "  - train.epochs: 'two' is not of type 'integer'"),
    ('runs={"2": {"objective": {"lambda": "1.5"}}}',
     "  - runs.2.objective.lambda: 1.5 is greater than 1, the most mix 'convex' allows"),
])
def test_bad_overrides_are_named(default_copy, override, line) -> None:
    proc = snakemake(default_copy, "-n", "results/0/weights.pth", "--config", override)
    text = output_of(proc)
    assert proc.returncode != 0 and line in text, text
    assert "Job stats" not in text


SHELL_FIELD = re.compile(r"\{([A-Za-z_][\w.]*)(?::([^{}]*))?\}")


def shell_templates() -> list[tuple[str, str]]:
    """(file, text of a rule's `shell:` block) for every rule of the workflow."""
    blocks = []
    for path in [REPO / "workflow" / "Snakefile", *sorted((REPO / "workflow" / "rules").glob("*.smk"))]:
        for match in re.finditer(r"^([ \t]*)shell:\n((?:\1[ \t]+.*\n|[ \t]*\n)+)", path.read_text(), flags=re.M):
            blocks.append((path.name, match.group(2)))
    return blocks


def test_every_field_of_every_shell_command_is_quoted() -> None:
    """A wildcard, a path or a config value reaches the shell only through `:q`."""
    blocks = shell_templates()
    assert len(blocks) >= 12, blocks
    fields = [(name, m.group(0)) for name, block in blocks for m in SHELL_FIELD.finditer(block)]
    assert len(fields) >= 40
    unquoted = [(name, field) for name, field in fields if not field.endswith(":q}")]
    assert not unquoted, unquoted
