"""The results table: one row per experiment, aggregated over seeds.

Each experiment lists its per-seed run folders; a same-start CE baseline (if
configured) is compared seed by seed with a paired t-test, so that "text helps"
is a claim about paired differences, not about two overlapping means.
"""
from __future__ import annotations

import csv
import io as _io
import json
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
        deltas = [a - b for a, b in zip(mious, base)]
        row["delta_miou"] = statistics.fmean(deltas)
        if len(deltas) > 1 and statistics.stdev(deltas) > 0:
            row["delta_p"] = float(stats.ttest_rel(mious, base).pvalue)
    return row


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value.is_integer() and abs(value) >= 1:  # counts and epochs, averaged over seeds
            return str(int(value))
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def write_tables(rows: list[dict], csv_path: Path, md_path: Path) -> None:
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
                  + "\n".join(lines) + "\n")
