"""A planted API key appears nowhere after the real workflow ran every describer failure mode.

In a temporary copy of the repository, Snakemake runs a tiny config whose two
text runs use the `openai` describer against hostile servers (tests/hostile_server.py,
on 127.0.0.1), one server per run, with `api_key_env` naming a variable that
holds a planted, recognisable key. The servers echo the Authorization header in
5xx, 401 and 200 replies, answer garbage 200s, hang, drip and send oversized
bodies and gzip bombs. One run fails, as it should (an echoing 401 after an
echoing 5xx), so its traceback reaches its log and Snakemake's failed-log
output; the other completes through retries, so its cache, state, weights,
evaluation and the results table exist too. Then every
file of the copy (results/, logs/, benchmarks/, resources/, .snakemake/ with its
log folder and metadata: the whole tree, file names included, zip members of
torch files decompressed) and Snakemake's captured stdout and stderr are
searched for the key and for fragments of it.

The key has no `sk-` prefix on purpose: the redaction layer's pattern for
OpenAI-style keys would hide a leak of the registered value.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import zipfile
from pathlib import Path

import pytest
import yaml

from hostile_server import HostileServer
from snakemake_helpers import REPO, SNAKEMAKE, copy_repo

KEY_ENV = "TTDL_SWEEP_PLANTED_KEY"
KEY_HEX = secrets.token_hex(16)
KEY = f"ttdl-planted-{KEY_HEX}"
# a part of the key counts as a leak too (a scrubber that masks only a prefix, a cut snippet)
FRAGMENTS = (KEY, KEY_HEX[:16], KEY_HEX[16:])

# The run that completes, through retries: its describer meets every mode. Each bad mode that
# fails an attempt (an echoing 5xx, a plain 5xx, oversized or bombed bodies, hang, drips) is
# followed by an answer echoing the header; a garbage 200 is an answer of its own (unusable).
# With max_concurrency 1 the hits come in this order, so 8 of every 12 answers are usable.
HOSTILE = ["echo_5xx", "echo_200", "huge_unannounced", "echo_200", "drip", "echo_200", "empty_text",
           "hang", "echo_200", "html", "drip_headers", "echo_200", "broken_json", "gzip_bomb", "echo_200",
           "long_answer", "huge_announced", "echo_200", "error_5xx", "echo_200"]
ANSWERS = {"echo_200", "empty_text", "html", "broken_json", "long_answer"}  # the hits that end a request
# The run that fails: an echoing 5xx, then (the retry) an echoing 401, which ends the job.
FAILING = ["echo_5xx", "echo_401"]
RUNS = {"hostile": (HOSTILE, True), "echo_fail": (FAILING, False)}  # run id -> (modes, cycled)
TIMEOUT_S = 600  # a bound for a loaded machine; the sweep takes about 2.5 minutes on 2 busy cores


def sweep_config(urls: dict[str, str]) -> dict:
    tiny = yaml.safe_load((REPO / ".test" / "config.yaml").read_text())
    describer = {
        "backend": "openai", "model": "hostile-m", "api_key_env": KEY_ENV,
        "retries": 1, "backoff_s": 0.01, "timeout_s": 2, "request_deadline_s": 3, "max_concurrency": 1,
        "max_response_bytes": 64 * 1024, "send_images": False, "image_size": 16,
    }  # bounds generous enough that a busy machine never fails a good reply
    runs = {run: {"description": f"secret sweep: {run}", "objective": {"name": "variable_siglip", "lambda": 0.5},
                  "describer": {"base_url": urls[run] + "/v1"}} for run in RUNS}
    return {"data": tiny["data"], "train": {**tiny["train"], "epochs": 1}, "describer": describer,
            "runs": runs, "summary": ["hostile"]}


def leaks_in(data: bytes) -> list[str]:
    return [f for f in FRAGMENTS if f.encode() in data]


def sweep_tree(root: Path) -> tuple[list[str], int]:
    """(every leak found as 'path: fragment', files searched) under `root`, hidden folders included."""
    found, files = [], 0
    for folder, dirs, names in os.walk(root, followlinks=False):
        for name in dirs + names:
            found += [f"{Path(folder, name).relative_to(root)} (its name): {f}" for f in leaks_in(name.encode())]
        for name in names:
            path = Path(folder, name)
            if path.is_symlink() or not path.is_file():
                continue
            files += 1
            data = path.read_bytes()
            found += [f"{path.relative_to(root)}: {f}" for f in leaks_in(data)]
            if zipfile.is_zipfile(path):  # torch.save writes a zip archive: search its members decoded too
                with zipfile.ZipFile(path) as archive:
                    for member in archive.namelist():
                        found += [f"{path.relative_to(root)}!{member}: {f}" for f in leaks_in(archive.read(member))]
    return found, files


def failed_train_runs(output: str) -> set[str]:
    """Run ids of the train jobs Snakemake reports as failed ('Error in rule train:' blocks)."""
    runs = set()
    for block in output.split("Error in rule ")[1:]:
        if block.startswith("train:"):
            match = re.search(r"^\s+output: results/(\S+)/weights\.pth", block, flags=re.M)
            assert match, block[:800]
            runs.add(match.group(1))
    return runs


def run_snakemake(repo: Path, env: dict[str, str], *args: str) -> tuple[int, str, str]:
    """Snakemake in a process group of its own: on a timeout the whole group goes, jobs included."""
    proc = subprocess.Popen([str(SNAKEMAKE), *args], cwd=repo, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"the sweep ran past {TIMEOUT_S} s:\n{(stdout + stderr)[-3000:]}")
    return proc.returncode, stdout, stderr


@pytest.mark.slow
def test_a_planted_key_leaks_into_no_file_and_no_output(tmp_path) -> None:
    repo = copy_repo(tmp_path / "repo")
    servers = {run: HostileServer(*modes, cycle=cycled, lifetime_s=TIMEOUT_S + 60, mode_limit_s=5)
               for run, (modes, cycled) in RUNS.items()}
    try:
        (repo / "config" / "sweep.yaml").write_text(
            yaml.safe_dump(sweep_config({run: s.url for run, s in servers.items()}), sort_keys=False))
        returncode, stdout, stderr = run_snakemake(
            repo, {**os.environ, KEY_ENV: KEY}, "--cores", "2", "--configfile", "config/sweep.yaml",
            "--replace-workflow-config", "--keep-going", "--printshellcmds",
            "all", *(f"results/{run}/weights.pth" for run in RUNS))
    finally:
        for s in servers.values():
            s.close()
    output = stdout + stderr

    # the key was sent with every request (and echoed back by the echo modes) ...
    for run, s in servers.items():
        assert s.hits and s.auth == [f"Bearer {KEY}"] * len(s.hits) and s.refused == 0, (run, output[-3000:])

    # ... and appears nowhere: no file of the copy (names included), no output of Snakemake
    found, files = sweep_tree(repo)
    assert found == [], f"planted key leaked into {found}"
    for name, text in (("Snakemake stdout", stdout), ("Snakemake stderr", stderr)):
        assert leaks_in(text.encode()) == [], f"planted key leaked into {name}"
    assert files > 100, files  # the tree was searched, not an empty folder

    # the sweep did what it is for: every mode was served, each run ended as designed
    hostile, failing = servers["hostile"].hits, servers["echo_fail"].hits
    assert len(hostile) >= len(HOSTILE), output[-3000:]  # every mode at least once
    assert failing[:2] == FAILING and set(failing[2:]) <= {"echo_401"}  # (a queued request may start)
    assert returncode == 1, output[-3000:]
    assert failed_train_runs(output) == {"echo_fail"}, output[-3000:]
    fail_log = (repo / "logs" / "train" / "echo_fail.log").read_text()
    assert "retry 1/1 after HTTP 500: upstream failed. Request headers were {'Authorization': 'Bearer ***'}; " \
           "Authorization: Bearer ***; key=***; x-api-key: ***; api_key=***&x=1; bare ***" in fail_log
    error_401 = "after 2 attempt(s): HTTP 401: upstream failed. Request headers were {'Authorization': 'Bearer ***'}"
    assert error_401 in fail_log
    assert error_401 in output  # Snakemake showed the failed job's log (show-failed-logs)
    hostile_log = (repo / "logs" / "train" / "hostile.log").read_text()
    assert hostile_log.count("retry 1/1 after HTTP 500: upstream failed.") == hostile.count("echo_5xx")
    for name in ("weights.pth", "summary.json", "eval.json", "metrics.csv", "cache/cache.pt", "state/last.pt"):
        assert (repo / "results" / "hostile" / name).is_file(), name
    summary = json.loads((repo / "results" / "hostile" / "summary.json").read_text())
    answers = [h for h in hostile if h in ANSWERS]  # one per request, in order
    assert hostile[-1] in ANSWERS and summary["describer_calls"] == len(answers)
    usable = answers.count("echo_200")
    assert (summary["texts"], summary["malformed"]) == (usable, len(answers) - usable)
    assert (repo / "results" / "summary.md").is_file()
    assert list((repo / ".snakemake" / "log").glob("*.snakemake.log")), "Snakemake wrote no log"
    assert list((repo / ".snakemake" / "metadata").iterdir()), "Snakemake wrote no metadata"
