"""The results table: one row per experiment, aggregated over seeds.

Each experiment lists its per-seed run folders; a same-start CE baseline (if
configured) is compared seed by seed with a paired t-test, so that "text helps"
is a claim about paired differences, not about two overlapping means.

The "Does text help?" section sets each text run beside its controls: CE only
(the baseline), matched describer text, shuffled text, the class name, a
one-hot code. Roles come from the runs' objective settings, not their names,
and every comparison is paired by seed (mean difference, 95 % t-interval,
paired t-test).
"""
from __future__ import annotations

import csv
import io as _io
import json
import math
import statistics
from pathlib import Path

from scipy import stats

from ttdl.core import io

COLUMNS = [
    ("experiment", "experiment"), ("seeds", "seeds"), ("val mIoU", "miou"), ("± std", "miou_std"),
    ("pixel acc", "pixel_acc"), ("baseline", "baseline"), ("Δ mIoU vs baseline", "delta_miou"),
    ("paired p", "delta_p"), ("describer calls", "describer_calls"), ("cache hit rate", "cache_hit_rate"),
    ("epochs", "epochs"), ("wall time (s)", "wall_time_s"), ("init", "init"), ("description", "description"),
]


def run_result(run_dir: Path) -> dict:
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    evaluation = json.loads((Path(run_dir) / "eval.json").read_text())
    return summary | {"miou": evaluation["miou"], "pixel_acc": evaluation["pixel_acc"]}


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def experiment_row(experiment: dict) -> dict:
    """experiment: {"experiment", "runs": [dirs], "baseline": id|None, "baseline_runs": [dirs]}."""
    results = [run_result(d) for d in experiment["runs"]]
    mious = [r["miou"] for r in results]
    first = results[0]
    row = {
        "experiment": experiment["experiment"], "seeds": len(results), "miou": statistics.fmean(mious),
        "miou_std": statistics.stdev(mious) if len(mious) > 1 else None,
        "pixel_acc": _mean([r["pixel_acc"] for r in results]), "epochs": _mean([r["epochs"] for r in results]),
        "wall_time_s": _mean([r["wall_time_s"] for r in results]),
        "describer_calls": _mean([r.get("describer_calls") for r in results]),
        "cache_hit_rate": _mean([r.get("cache_hit_rate") for r in results]),
        "init": first.get("init"), "description": first.get("description", ""),
        "baseline": experiment.get("baseline"), "delta_miou": None, "delta_p": None,
    }
    if experiment.get("baseline_runs"):
        base = [run_result(d)["miou"] for d in experiment["baseline_runs"]]
        n = min(len(mious), len(base))
        paired = paired_difference(mious[:n], base[:n])
        row["delta_miou"], row["delta_p"] = paired["delta_miou"], paired["p"]
    return row


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value.is_integer() and abs(value) >= 1:  # counts and epochs, averaged over seeds
            return str(int(value))
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def write_tables(rows: list[dict], csv_path: Path, md_path: Path, help_rows: list[dict] | None = None) -> None:
    """summary.csv and summary.md; with `help_rows` (text_help()), summary.md ends with "Does text help?"."""
    buf = _io.StringIO()
    writer = csv.writer(buf)
    writer.writerow([key for _, key in COLUMNS])
    for row in rows:
        writer.writerow([row.get(key) for _, key in COLUMNS])
    io.write_text(csv_path, buf.getvalue())
    lines = ["| " + " | ".join(title for title, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(row.get(key)) for _, key in COLUMNS) + " |" for row in rows]
    io.write_text(md_path, "# ttdl results\n\nValidation scores of each run's best checkpoint (re-evaluated by the "
                  "evaluate rule), mean over seeds with the sample standard deviation. Δ is the mean paired "
                  "difference to the same-start baseline; p is a paired t-test over seeds (needs ≥ 2 seeds).\n\n"
                  + "\n".join(lines) + "\n"
                  + ("" if help_rows is None else "\n" + text_help_markdown(help_rows)))


# ---- does text help? ------------------------------------------------------------------

# The arms of the comparison, in table order; "ce" is the group's baseline run.
ROLES = ("matched", "shuffled", "class_name", "onehot")
ROLE_TITLES = {"ce": "CE only", "matched": "matched text", "shuffled": "shuffled text",
               "class_name": "class name", "onehot": "one-hot code"}
# The keys that make an arm what it is; the rest of the objective is the machinery arms must share.
TEXT_KEYS = ("text", "shuffle_texts")
HELP_COLUMNS = ["baseline", "first", "first_role", "second", "second_role", "n", "miou_first", "miou_second",
                "delta_miou", "ci_low", "ci_high", "p", "note"]
CONFIDENCE = 0.95


def text_role(objective: dict | None) -> str | None:
    """What part a run plays, read from its objective settings (names can mislead; settings cannot).

    None for runs outside the comparison: synthetic template text, or an aux weight
    of 0 (the pipeline-neutrality control, which trains as CE does).
    """
    if not objective:
        return None
    if objective.get("name", "none") == "none":
        return "ce"
    if objective.get("lambda", 1.0) == 0:
        return None
    if objective.get("shuffle_texts"):
        return "shuffled"
    return {"describer": "matched", "class_name": "class_name", "onehot": "onehot"}.get(objective.get("text"))


def paired_difference(first: list[float], second: list[float], confidence: float = CONFIDENCE) -> dict:
    """Mean of first[i] - second[i] over seeds, its t-interval and the two-sided paired t-test.

    Seeds pair the runs (seed s of a finetune starts from seed s of the shared
    init), so the spread between seeds cancels out of the difference. With
    fewer than 2 pairs, or differences that are all equal, interval and p are
    None and `note` says why.
    """
    if len(first) != len(second):
        raise ValueError(f"paired samples differ in length: {len(first)} and {len(second)}")
    diffs = [a - b for a, b in zip(first, second)]
    n = len(diffs)
    out = {"n": n, "delta_miou": statistics.fmean(diffs) if diffs else None, "ci_low": None, "ci_high": None,
           "t": None, "p": None, "note": ""}
    if n < 2:
        out["note"] = f"n/a: {n} seed{'s' if n != 1 else ''}; an interval and a test need at least 2"
        return out
    sd = statistics.stdev(diffs)
    if not math.isfinite(sd) or sd <= 1e-12 * max(1.0, *map(abs, diffs)):  # equal up to float rounding
        out["note"] = "n/a: every seed gives the same difference (no spread to test)"
        return out
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    test = stats.ttest_rel(first, second)
    out |= {"ci_low": out["delta_miou"] - half, "ci_high": out["delta_miou"] + half,
            "t": float(test.statistic), "p": float(test.pvalue)}
    return out


def _machinery(objective: dict) -> str:
    return json.dumps({k: v for k, v in objective.items() if k not in TEXT_KEYS}, sort_keys=True)


def text_help(experiments: list[dict]) -> list[dict]:
    """The comparisons of the "Does text help?" section, one dict per pair of arms (HELP_COLUMNS).

    experiments: as for experiment_row, each with its resolved "objective". Arms
    are grouped by their same-start CE baseline, then by the objective apart
    from the text (so a shuffled control is compared with the run it controls).
    Within a family: every arm against CE; every other arm against shuffled;
    matched against class name and one-hot.
    """
    mious: dict[str, float] = {}

    def scores(dirs: list[str]) -> list[float]:
        for d in dirs:
            if d not in mious:
                mious[d] = run_result(Path(d))["miou"]
        return [mious[d] for d in dirs]

    families: dict[tuple[str, str], dict[str, dict]] = {}
    ce_runs: dict[str, list[str]] = {}
    for experiment in experiments:
        role, baseline = text_role(experiment.get("objective")), experiment.get("baseline")
        if role not in ROLES or not baseline or not experiment.get("baseline_runs"):
            continue
        ce_runs[baseline] = experiment["baseline_runs"]
        family = families.setdefault((baseline, _machinery(experiment["objective"])), {})
        family.setdefault(role, experiment)  # the first listed experiment of a role in its family
    rows = []
    for (baseline, _), arms in families.items():
        ce = {"experiment": baseline, "runs": ce_runs[baseline]}
        present = [r for r in ROLES if r in arms]
        pairs = [(r, ce, "ce") for r in present]
        if "shuffled" in arms:
            pairs += [(r, arms["shuffled"], "shuffled") for r in present if r != "shuffled"]
        if "matched" in arms:
            pairs += [("matched", arms[r], r) for r in ("class_name", "onehot") if r in arms]
        for first_role, second, second_role in pairs:
            first = arms[first_role]
            n = min(len(first["runs"]), len(second["runs"]))
            a, b = scores(first["runs"][:n]), scores(second["runs"][:n])
            stat = paired_difference(a, b)
            if len(first["runs"]) != len(second["runs"]):
                stat["note"] = (stat["note"] + "; " if stat["note"] else "") + (
                    f"only the first {n} seeds pair up ({len(first['runs'])} vs {len(second['runs'])})")
            rows.append({"baseline": baseline, "first": first["experiment"], "first_role": first_role,
                         "second": second["experiment"], "second_role": second_role,
                         "miou_first": statistics.fmean(a) if a else None,
                         "miou_second": statistics.fmean(b) if b else None}
                        | {k: stat[k] for k in ("n", "delta_miou", "ci_low", "ci_high", "p", "note")})
    return rows


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.4f}"


def text_help_markdown(rows: list[dict]) -> str:
    """The "Does text help?" section of summary.md."""
    head = ("## Does text help?\n\nEach text run against its same-start CE run (`baseline`) and against the "
            "controls that share its objective apart from the text, paired by seed. Δ = mean over seeds of "
            "(first − second) val mIoU; 95 % CI = t-interval of that mean; p = two-sided paired t-test "
            "(scipy.stats.ttest_rel). Roles come from each run's objective settings: CE only (objective none), "
            "matched text (describer), shuffled text (shuffle_texts), class name (text class_name), one-hot code "
            "(text onehot).")
    if not rows:
        return head + ("\n\nn/a: no experiment of the summary has a `baseline` and one of these roles, so there is "
                       "nothing to compare.\n")
    parts = [head]
    for baseline in dict.fromkeys(r["baseline"] for r in rows):
        group = [r for r in rows if r["baseline"] == baseline]
        parts.append(f"\n### Baseline `{baseline}` (CE only)\n\n"
                     "| first | second | seeds | mIoU first | mIoU second | Δ mIoU | 95 % CI | paired p |\n"
                     "|---|---|---|---|---|---|---|---|")
        for r in group:
            ci = "n/a" if r["ci_low"] is None else f"[{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]"
            p = f"{r['p']:.4f}" if r["p"] is not None else r["note"] or "n/a"
            if r["p"] is not None and r["note"]:
                p += f" ({r['note']})"
            parts.append(f"| {ROLE_TITLES[r['first_role']]} (`{r['first']}`) | {ROLE_TITLES[r['second_role']]} "
                         f"(`{r['second']}`) | {r['n']} | {_fmt(r['miou_first'])} | {_fmt(r['miou_second'])} | "
                         f"{_signed(r['delta_miou'])} | {ci} | {p} |")
    return "\n".join(parts) + "\n"


def write_text_help_csv(rows: list[dict], csv_path: Path) -> None:
    buf = _io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(HELP_COLUMNS)
    for row in rows:
        writer.writerow(["" if row.get(key) is None else row.get(key) for key in HELP_COLUMNS])
    io.write_text(csv_path, buf.getvalue())
