"""The results table: one row per run, from each run's summary.json and eval.json."""
from __future__ import annotations

import csv
import io as _io
import json
from pathlib import Path

from . import io

COLUMNS = [
    ("experiment", "run_id"), ("init", "init"), ("val mIoU", "miou"), ("pixel acc", "pixel_acc"),
    ("best epoch", "best_epoch"), ("epochs", "epochs"), ("describer calls", "describer_calls"),
    ("cache hit rate", "cache_hit_rate"), ("wall time (s)", "wall_time_s"), ("description", "description"),
]


def collect_row(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    evaluation = json.loads((run_dir / "eval.json").read_text())
    return summary | {"miou": evaluation["miou"], "pixel_acc": evaluation["pixel_acc"]}


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if value < 10 else f"{value:.1f}"
    return str(value)


def write_tables(rows: list[dict], csv_path: Path, md_path: Path) -> None:
    buf = _io.StringIO()
    writer = csv.writer(buf)
    writer.writerow([key for _, key in COLUMNS])
    for row in rows:
        writer.writerow([row.get(key) for _, key in COLUMNS])
    io.write_text(csv_path, buf.getvalue())
    lines = ["| " + " | ".join(title for title, _ in COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(row.get(key)) for _, key in COLUMNS) + " |" for row in rows]
    io.write_text(md_path, "# ttdl results\n\nValidation scores of each run's weights.pth "
                  "(re-evaluated by the evaluate rule).\n\n" + "\n".join(lines) + "\n")
