#!/usr/bin/env python
"""Kill soak: `make all` killed with SIGKILL at random moments ends with the same results.

A developer tool (CI does not run it; it takes minutes). In two scratch copies of
the repository, each with a small config as its config/config.yaml:

1. `ref`: `make all` once, uninterrupted.
2. `soak`: `make all` from scratch, and at N random moments (seeded) SIGKILL to its
   whole process group: make, Snakemake and every job it runs, as a lost node
   or `kill -9` would. After each kill the same `make all` runs again, with no
   manual step in between, until it completes. A rerun that fails is a FAIL.
   Each kill comes between --min-s and --min-s + max_fraction * (the
   uninterrupted wall time) * (the share of its jobs not finished yet) after a
   (re)start, so later kills still land before the shrinking rest completes.

Then every result file of the two copies is compared (results/ and the generated
data under resources/): weights, state files (model, optimiser, RNG, cache) and
caches tensor by tensor, bitwise, and their other values exactly; metrics.csv,
summary.json, eval.json and summary.{csv,md} ignoring wall-clock fields (wall
time, eval time, describer latency and wait); any other file byte for byte.
TensorBoard event files (wall-clock stamps) are left out. No temp file of an
interrupted write (`.*.tmp`, ttdl.core.io.atomic_path) may be left anywhere in
the copy. The report names the kills (when, which jobs were running), the train
jobs that resumed from a saved state, and each file's comparison. Exit status 0
only when everything matches.

    .venv/bin/python scripts/soak_kills.py --kills 3 --seed 0
    .venv/bin/python scripts/soak_kills.py --kills 5 --seed 7 --config .test/config.yaml --keep
    .venv/bin/python scripts/soak_kills.py --repo /path/to/other/checkout --workdir /tmp/soak

The default config is .test/config.yaml with 8 epochs, a state checkpoint
every step, and a text run (rules describer, a cache prefilled from run 0), so
kills land in data generation, CE and text training, prefills, evaluation, the
summary and Snakemake's own bookkeeping. Logs: <workdir>/ref.log and
<workdir>/soak.attempt<N>.log.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
# what `make all` needs in a copy (the venv is shared: VENV= points at this checkout's)
COPIED = ("workflow", "scripts", "config", "profiles", ".test", "envs", "Makefile", "pyproject.toml")
TEMP_FILE = re.compile(r"^\..+\.tmp$")  # ttdl.core.io.atomic_path: .<name>.<random>.tmp
# wall-clock fields: they differ between any two runs, killed or not
TIME_KEY = re.compile(r"wall_time|_time_s$|latency|wait_s|elapsed|timestamp|duration", re.IGNORECASE)
TIME_COLUMN = re.compile(r"wall time|wall_time|latency|wait", re.IGNORECASE)
JOB_SCRIPT = re.compile(r"(?:^|/)scripts/(?!with_gpu_slot\.py)(\w+)\.py$")
FINISHED = re.compile(r"^Finished jobid: \d+ \(Rule: (?!all\))", re.M)  # jobs whose outputs are complete
RESUMED = re.compile(r"resumed (\S+) from (\S+): (.+)")


# ---- the config -----------------------------------------------------------------------------
def soak_config(source: Path, path: Path | None) -> dict:
    if path is not None:
        return yaml.safe_load(path.read_text())
    config = yaml.safe_load((source / ".test" / "config.yaml").read_text())
    config["train"]["epochs"] = 8  # 0 and txt: training, not only start-up, long enough for kills to land in
    config["train"]["checkpoint_every_steps"] = 1  # kills mid-epoch resume from a mid-epoch state
    config["runs"]["txt"] = {
        "description": "tiny text run: rules describer, cache prefilled from 0",
        "init": "0", "prefill": True, "objective": {"name": "variable_siglip", "lambda": 0.5},
    }
    config["summary"] = [*config["summary"], "txt"]
    return config


def make_copy(source: Path, dest: Path, config: dict) -> Path:
    dest.mkdir(parents=True)
    for name in COPIED:
        src = source / name
        if src.is_dir():  # copy2 keeps mtimes, so make sees the venv stamp as up to date
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, dest / name)
    (dest / "config" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return dest


# ---- running and killing --------------------------------------------------------------------
def make_command(venv: Path, cores: int) -> list[str]:
    """`make all` as a user runs it, on the shared venv (never reinstalled: -o marks its stamp old)."""
    stamp = venv / ".installed"
    return ["make", "-o", str(stamp), "all", f"VENV={venv}", "CONFIG=config/config.yaml", f"CORES={cores}"]


def group_processes(pgid: int) -> list[tuple[int, list[str]]]:
    """(pid, argv) of every live process in process group `pgid`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[2]) != pgid or fields[0] == "Z":
                continue
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            found.append((int(entry), [a.decode(errors="replace") for a in argv if a]))
        except (OSError, ValueError, IndexError):
            continue
    return found


def running_jobs(pgid: int) -> list[str]:
    """The jobs running in the group, e.g. 'train results/ft', from their command lines."""
    jobs = []
    for _, argv in group_processes(pgid):
        if not argv or "python" not in Path(argv[0]).name:
            continue
        script = next((m.group(1) for a in argv[1:3] if (m := JOB_SCRIPT.search(a))), None)
        if script is None:
            continue
        target = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--out", "--md", "--root")), "")
        jobs.append(f"{script} {target}".strip())
    return sorted(set(jobs))


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def run_make(repo: Path, cmd: list[str], log: Path, kill_after: float | None, timeout: float) -> dict:
    """Run `cmd` in a new session; SIGKILL the whole group after `kill_after` s if still running."""
    start = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=repo, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    limit = start + (kill_after if kill_after is not None else timeout)
    while proc.poll() is None and time.monotonic() < limit:
        time.sleep(0.05)
    result: dict[str, Any] = {"killed": False}
    if proc.poll() is None:
        result["jobs"] = running_jobs(proc.pid)
        os.killpg(proc.pid, signal.SIGKILL)
        result["killed"] = kill_after is not None
        result["timed_out"] = kill_after is None
    proc.wait()
    deadline = time.monotonic() + 30
    while group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if group_alive(proc.pid):
        raise RuntimeError(f"process group {proc.pid} survived SIGKILL")
    text = log.read_text(errors="replace")
    result.update(returncode=proc.returncode, seconds=time.monotonic() - start,
                  finished=len(FINISHED.findall(text)), planned="Select jobs to execute" in text)
    return result


# ---- comparing ------------------------------------------------------------------------------
def load_torch(path: Path) -> Any:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def compare_values(a: Any, b: Any, where: str, out: list[str], ignored: set[str]) -> None:
    """Append every difference between `a` and `b` to `out`; tensors bitwise, wall-clock keys skipped."""
    import torch

    if len(out) > 20:
        return
    if torch.is_tensor(a) or torch.is_tensor(b):
        if not (torch.is_tensor(a) and torch.is_tensor(b)):
            out.append(f"{where}: tensor vs {type(b if torch.is_tensor(a) else a).__name__}")
        elif a.dtype != b.dtype or a.shape != b.shape:
            out.append(f"{where}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}")
        else:
            x, y = a.detach().cpu().contiguous().reshape(-1), b.detach().cpu().contiguous().reshape(-1)
            if x.element_size() > 0 and not torch.equal(x.view(torch.uint8), y.view(torch.uint8)):
                changed = int((x.view(torch.uint8) != y.view(torch.uint8)).sum())
                out.append(f"{where}: tensor {a.dtype}{tuple(a.shape)} differs ({changed} bytes)")
        return
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if isinstance(key, str) and TIME_KEY.search(key):
                ignored.add(str(key))
                continue
            if key not in a or key not in b:
                out.append(f"{where}/{key}: only in {'soak' if key not in a else 'ref'}")
            else:
                compare_values(a[key], b[key], f"{where}/{key}", out, ignored)
        return
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and type(a) is type(b):
        if len(a) != len(b):
            out.append(f"{where}: length {len(a)} vs {len(b)}")
        for i, (x, y) in enumerate(zip(a, b)):
            compare_values(x, y, f"{where}[{i}]", out, ignored)
        return
    if type(a) is not type(b) or (a != b and not (a != a and b != b)):  # NaN equals NaN here
        out.append(f"{where}: {a!r:.80} vs {b!r:.80}")


def table_rows(text: str, kind: str) -> tuple[list[list[str]], list[str]]:
    """(rows without wall-clock columns, the columns dropped) of a CSV or Markdown table text."""
    if kind == "csv":
        rows = list(csv.reader(io.StringIO(text)))
    else:
        rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
                if line.startswith("|")]
    if not rows:
        return [], []
    drop = {i for i, name in enumerate(rows[0]) if TIME_COLUMN.search(name)}
    return [[c for i, c in enumerate(r) if i not in drop] for r in rows], [rows[0][i] for i in sorted(drop)]


def compare_file(ref: Path, soak: Path) -> tuple[bool, str]:
    """(equal, how it was compared / what differs) for one result file present in both copies."""
    name = ref.name
    if ref.read_bytes() == soak.read_bytes():
        return True, "identical bytes"
    ignored: set[str] = set()
    diffs: list[str] = []
    if name.endswith((".pt", ".pth")):
        compare_values(load_torch(ref), load_torch(soak), "", diffs, ignored)
        how = "tensors bitwise, other values exactly"
        if not diffs and archive_prefixes(ref) != archive_prefixes(soak):
            how += f" (bytes differ: zip record folder {archive_prefixes(ref)} vs {archive_prefixes(soak)})"
    elif name.endswith(".json"):
        compare_values(json.loads(ref.read_text()), json.loads(soak.read_text()), "", diffs, ignored)
        how = "values exactly"
    elif name.endswith((".csv", ".md")):
        kind = "csv" if name.endswith(".csv") else "md"
        (a, dropped), (b, _) = table_rows(ref.read_text(), kind), table_rows(soak.read_text(), kind)
        ignored.update(dropped)
        how = "table cells exactly"
        if a != b:
            diffs += [f"row {i}: {x} vs {y}" for i, (x, y) in enumerate(zip(a, b)) if x != y][:10]
            if len(a) != len(b):
                diffs.append(f"{len(a)} vs {len(b)} rows")
        rest_a = [line for line in ref.read_text().splitlines() if not line.startswith("|")]
        rest_b = [line for line in soak.read_text().splitlines() if not line.startswith("|")]
        if kind == "md" and rest_a != rest_b:
            diffs.append("text outside the table differs")
    else:
        return False, "bytes differ"
    if ignored:
        how += f", ignoring {', '.join(sorted(ignored))}"
    return (not diffs), (how if not diffs else f"{how}: " + "; ".join(diffs))


def archive_prefixes(path: Path) -> list[str]:
    """The record folders of a torch zip file (torch.save names it after the file it writes)."""
    with zipfile.ZipFile(path) as archive:
        return sorted({name.split("/")[0] for name in archive.namelist()})


def resumes(root: Path) -> list[str]:
    """'run: epoch e, step s' for every train job whose final log says it resumed from a saved state."""
    found = []
    for log in sorted((root / "logs" / "train").rglob("*.log")):
        found += [f"{m.group(1)}: {m.group(3)}" for m in RESUMED.finditer(log.read_text(errors="replace"))]
    return found


def result_files(root: Path) -> dict[str, Path]:
    files = {}
    for top in ("results", "resources"):
        for path in sorted((root / top).rglob("*")):
            rel = path.relative_to(root)
            if path.is_file() and "tb" not in rel.parts and not TEMP_FILE.match(path.name):
                files[str(rel)] = path
    return files


def temp_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*.tmp") if TEMP_FILE.match(p.name))


# ---- the soak -------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=3, help="SIGKILLs of the whole run (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--config", type=Path, help="config to soak (default: .test/config.yaml + a text run)")
    parser.add_argument("--repo", type=Path, default=REPO, help="checkout to soak (default: this one)")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--min-s", type=float, default=3.0, help="earliest kill, seconds after a (re)start")
    parser.add_argument("--max-fraction", type=float, default=0.7,
                        help="latest kill: this fraction of the uninterrupted run's wall time, scaled by "
                             "the share of its jobs still to run")
    parser.add_argument("--timeout", type=float, default=3600, help="limit of one uninterrupted make all")
    parser.add_argument("--workdir", type=Path, help="where the two copies go (default: a new temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the copies (kept anyway on FAIL)")
    args = parser.parse_args()

    venv = Path(sys.executable).parent.parent
    if not (venv / "bin" / "snakemake").exists():
        parser.error(f"run this with the project's venv python (no snakemake in {venv / 'bin'})")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ttdl-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    source = args.repo.resolve()
    config = soak_config(source, args.config)
    rng = random.Random(args.seed)
    cmd = make_command(venv, args.cores)
    ref, soak = make_copy(source, work / "ref", config), make_copy(source, work / "soak", config)
    print(f"soak of {source}: {args.kills} kill(s), seed {args.seed}, runs {list(config['runs'])}, in {work}")
    print(f"command (in each copy): {' '.join(cmd)}", flush=True)
    started = time.monotonic()

    first = run_make(ref, cmd, work / "ref.log", None, args.timeout)
    if first["returncode"] != 0:
        print(f"FAIL: the uninterrupted run failed (exit {first['returncode']}); see {work / 'ref.log'}")
        return 1
    t_ref, total_jobs = first["seconds"], first["finished"]
    print(f"uninterrupted run: {t_ref:.1f} s, {total_jobs} jobs", flush=True)

    kills: list[tuple[float, str]] = []
    attempts, done_jobs, problems = 0, 0, []
    while True:
        attempts += 1
        kill_after = None
        if len(kills) < args.kills:
            share = max(0.0, total_jobs - done_jobs) / max(1, total_jobs)  # of the work still to do
            kill_after = round(rng.uniform(args.min_s, args.min_s + args.max_fraction * t_ref * share), 2)
        log = work / f"soak.attempt{attempts}.log"
        r = run_make(soak, cmd, log, kill_after, args.timeout)
        done_jobs += r["finished"]
        if r["killed"]:
            jobs = ", ".join(r["jobs"]) or "no job: Snakemake itself (planning or bookkeeping)"
            kills.append((kill_after, jobs))
            phase = "after planning" if r["planned"] else "while Snakemake was still planning"
            print(f"  kill {len(kills)}: attempt {attempts}, SIGKILL at {kill_after:.2f} s, {phase}, "
                  f"{r['finished']} job(s) finished in this attempt; running: {jobs}", flush=True)
            continue
        if r.get("timed_out"):
            problems.append(f"attempt {attempts} ran past --timeout {args.timeout} s: see {log}")
        elif r["returncode"] != 0:
            problems.append(f"attempt {attempts} (a rerun without manual steps) failed with exit "
                            f"{r['returncode']}: see {log}")
        else:
            early = f"; it finished before kill {len(kills) + 1} at {kill_after:.2f} s" if kill_after else ""
            print(f"  attempt {attempts}: completed in {r['seconds']:.1f} s, {r['finished']} job(s){early}")
        break
    resumed = resumes(soak)
    print(f"train jobs that resumed from a saved state: {'; '.join(resumed) or 'none'}")

    print("\nresults, soak vs uninterrupted:")
    a, b = result_files(ref), result_files(soak)
    for rel in sorted(set(a) | set(b)):
        if rel not in b or rel not in a:
            where = "uninterrupted" if rel in a else "soak"
            problems.append(f"{rel}: only in the {where} run")
            print(f"  DIFF  {rel}: only in the {where} run")
            continue
        equal, how = compare_file(a[rel], b[rel])
        if not rel.startswith("resources/") or not equal:
            print(f"  {'same' if equal else 'DIFF'}  {rel}: {how}")
        if not equal:
            problems.append(f"{rel}: {how}")
    data = [rel for rel in a if rel.startswith("resources/")]
    print(f"  (generated data: {len(data)} files under resources/, compared byte for byte)")
    left = temp_files(soak)
    print(f"temp files left in the soak copy: {left or 'none'}")
    problems += [f"temp file left: {t}" for t in left]
    lock_dir = soak / ".snakemake" / "locks"
    locks = sorted(p.name for p in lock_dir.glob("*")) if lock_dir.exists() else []
    print(f"Snakemake locks left: {locks or 'none'}")

    total = time.monotonic() - started
    print(f"\nkills done: {len(kills)} of {args.kills}; attempts: {attempts}; wall time {total:.0f} s")
    for i, (at, jobs) in enumerate(kills, 1):
        print(f"  kill {i} at {at:.2f} s: {jobs}")
    if len(kills) < args.kills:
        print("note: fewer kills than asked (a rerun completed first); raise --max-fraction or the run's size")
    if problems:
        print("FAIL:\n  " + "\n  ".join(problems) + f"\n(copies and logs kept in {work})")
        return 1
    print(f"PASS: results identical to the uninterrupted run after {len(kills)} SIGKILL(s), no temp files left")
    if not args.keep and args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"(copies and logs kept in {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
