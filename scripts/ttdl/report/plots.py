"""Figures for the report, drawn from the files the workflow writes (metrics.csv, summary.csv).

Pure plotting: no torch, no model. Every function writes one PNG through the
Agg canvas (no display, no pyplot state) and raises PlotInputError, naming the
file and the column, when an input lacks what the figure needs.
"""
from __future__ import annotations

import csv
import html
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

from matplotlib.figure import Figure  # noqa: E402

from ttdl.core.io import atomic_path  # noqa: E402

DPI = 120
TEXT_COLUMNS = {"experiment", "run_id", "init", "baseline", "description"}  # ids like "3.1" stay text


class PlotInputError(ValueError):
    """An input file is missing, empty where it may not be, or lacks a needed column."""


# ---- reading ----------------------------------------------------------------------

def _number(text: str | None) -> float:
    """A CSV cell as a float; empty, '-', 'None' and non-numbers become NaN."""
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def read_table(path: str | Path) -> tuple[list[str], list[dict[str, str]]]:
    """(header, rows) of a CSV file; a missing or header-less file raises PlotInputError."""
    path = Path(path)
    if not path.is_file():
        raise PlotInputError(f"{path}: file not found")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        header = list(reader.fieldnames or [])
    if not header:
        raise PlotInputError(f"{path}: empty file (no header row)")
    return header, rows


def read_metrics(path: str | Path, required: tuple[str, ...], figure: str) -> dict[str, list[float]]:
    """Columns of a metrics.csv as float lists; `required` columns must exist."""
    header, rows = read_table(path)
    missing = [c for c in required if c not in header]
    if missing:
        raise PlotInputError(f"{path}: missing column {missing[0]!r} needed for the {figure} figure "
                             f"(columns: {', '.join(header)})")
    return {c: [_number(r.get(c)) for r in rows] for c in header}


def _colours(n: int) -> list:
    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _save(fig: Figure, out_png: str | Path) -> None:
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)


def _note(ax, text: str) -> None:
    """An empty panel that says why it is empty."""
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=10, color="0.35",
            transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _finite(xs: list[float], ys: list[float]) -> tuple[list[float], list[float]]:
    pairs = [(x, y) for x, y in zip(xs, ys) if math.isfinite(x) and math.isfinite(y)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _legend_below(fig: Figure, handles, labels, y_inch: float = 0.05) -> None:
    """One legend for all panels, centred under them, its bottom `y_inch` above the figure's edge."""
    if handles:
        fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, y_inch / fig.get_figheight()),
                   ncol=min(len(labels), 6), frameon=False, fontsize=9, title="experiment", title_fontsize=9)


def _bottom(fig: Figure, n_labels: int, extra_inch: float = 0.0) -> float:
    """Axes bottom (figure fraction) leaving room for x labels and a legend of `n_labels` entries."""
    rows = max(1, math.ceil(n_labels / 6))
    return (0.75 + 0.25 * rows + extra_inch) / fig.get_figheight()


# ---- figures ----------------------------------------------------------------------

def training_curves(run_dirs: dict[str, Path], out_png: str | Path) -> None:
    """Small multiples per epoch: train CE, aux loss (runs that have one) and val mIoU; one line per run."""
    if not run_dirs:
        raise PlotInputError("training_curves: no runs given")
    metrics = {label: read_metrics(Path(d) / "metrics.csv", ("epoch", "train_ce", "val_miou"), "training-curves")
               for label, d in run_dirs.items()}
    colours = dict(zip(metrics, _colours(len(metrics))))
    fig = Figure(figsize=(14, 4.8))
    axes = fig.subplots(1, 3)
    panels = [("train_ce", "train CE (epoch mean)", "cross-entropy"),
              ("train_aux", "auxiliary text loss (epoch mean)", "aux loss"),
              ("val_miou", "validation mIoU", "mIoU")]
    handles: dict[str, object] = {}
    for ax, (column, title, ylabel) in zip(axes, panels):
        drawn = 0
        for label, cols in metrics.items():
            if column not in cols:
                continue
            xs, ys = _finite(cols["epoch"], cols[column])
            if not xs:
                continue
            (line,) = ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.5, color=colours[label], label=label)
            handles.setdefault(label, line)
            drawn += 1
        ax.set_title(title, fontsize=11)
        if not drawn:
            _note(ax, "no run has this column\n(CE-only runs have no aux loss)" if column == "train_aux"
                  else f"no values in column {column!r}")
            continue
        ax.set_xlabel("epoch (of this run)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[2].set_ylim(bottom=0)
    ordered = [label for label in metrics if label in handles]
    _legend_below(fig, [handles[k] for k in ordered], ordered)
    fig.suptitle("Training curves per experiment (finetunes count epochs from their own start)", fontsize=12)
    fig.subplots_adjust(left=0.05, right=0.99, top=0.86, bottom=_bottom(fig, len(ordered)), wspace=0.25)
    _save(fig, out_png)


def describer_activity(run_dirs: dict[str, Path], out_png: str | Path) -> None:
    """Describer calls and mask-text cache hit rate per epoch of the runs that call a describer."""
    if not run_dirs:
        raise PlotInputError("describer_activity: no runs given")
    colours = dict(zip(run_dirs, _colours(len(run_dirs))))
    shown, idle, without = {}, [], []
    for label, d in run_dirs.items():
        cols = read_metrics(Path(d) / "metrics.csv", ("epoch",), "describer-activity")
        if "describer_calls" not in cols and "cache_hit_rate" not in cols:
            without.append(label)
        elif not any(v > 0 for v in cols.get("describer_calls", [])):
            idle.append(label)
        else:
            shown[label] = cols
    fig = Figure(figsize=(12, 4.8))
    if not shown:
        ax = fig.subplots(1, 1)
        _note(ax, "No run called a describer: no metrics.csv has describer_calls > 0.\n"
                  f"Runs without describer columns: {', '.join(without) or 'none'}; "
                  f"with zero calls: {', '.join(idle) or 'none'}.")
        ax.set_title("Describer activity", fontsize=12)
        _save(fig, out_png)
        return
    axes = fig.subplots(1, 2)
    panels = [("describer_calls", "describer calls per epoch", "calls (cache misses)"),
              ("cache_hit_rate", "mask-text cache hit rate per epoch", "hit rate")]
    handles: dict[str, object] = {}
    for ax, (column, title, ylabel) in zip(axes, panels):
        for label, cols in shown.items():
            if column not in cols:
                continue
            xs, ys = _finite(cols["epoch"], cols[column])
            (line,) = ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.5, color=colours[label], label=label)
            handles.setdefault(label, line)
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("epoch (of this run)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylim(bottom=0)
    axes[1].set_ylim(0, 1.05)
    ordered = [label for label in shown if label in handles]
    notes = []
    if idle:
        notes.append(f"not shown, zero describer calls (synthetic text or no text): {', '.join(idle)}")
    if without:
        notes.append(f"not shown, CE only: {', '.join(without)}")
    for i, note in enumerate(notes):
        fig.text(0.01, (0.05 + 0.18 * i) / fig.get_figheight(), note, fontsize=8, color="0.35", ha="left",
                 va="bottom")
    note_inch = 0.18 * len(notes)
    _legend_below(fig, [handles[k] for k in ordered], ordered, y_inch=0.05 + note_inch)
    fig.suptitle("Describer activity of the text runs", fontsize=12)
    fig.subplots_adjust(left=0.07, right=0.98, top=0.86, bottom=_bottom(fig, len(ordered), note_inch), wspace=0.25)
    _save(fig, out_png)


SIGNAL_PANELS = [("grad_ratio_aux_ce", "aux / CE gradient-norm ratio per epoch", "‖∇aux‖ / ‖∇CE‖"),
                 ("staleness_iou", "text staleness: IoU of described vs trained-on masks (1 = fresh)", "staleness IoU")]


def text_signals(run_dirs: dict[str, Path], out_png: str | Path) -> None:
    """How strongly the text pulls (aux/CE gradient-norm ratio) and how fresh its masks are, per epoch.

    A ratio near 0 means the text barely moves the weights; a staleness IoU well
    below 1 means the texts describe masks the model no longer predicts. Runs
    without a column are left out of its panel (CE-only runs have neither;
    staleness is logged only by schedules that describe ahead or in the background).
    """
    if not run_dirs:
        raise PlotInputError("text_signals: no runs given")
    metrics = {label: read_metrics(Path(d) / "metrics.csv", ("epoch",), "text-signals")
               for label, d in run_dirs.items()}
    colours = dict(zip(metrics, _colours(len(metrics))))
    fig = Figure(figsize=(12, 4.8))
    axes = fig.subplots(1, 2)
    handles: dict[str, object] = {}
    for ax, (column, title, ylabel) in zip(axes, SIGNAL_PANELS):
        ax.set_title(title, fontsize=11)
        drawn = []
        for label, cols in metrics.items():
            xs, ys = _finite(cols["epoch"], cols.get(column, []))
            if not xs:
                continue
            (line,) = ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.5, color=colours[label], label=label)
            handles.setdefault(label, line)
            drawn.append(label)
        if not drawn:
            _note(ax, f"no run logs {column!r}" + ("\n(logged by text runs with the gradient probe)"
                                                   if column == "grad_ratio_aux_ce" else
                                                   "\n(logged by the lookahead and background schedules)"))
            continue
        ax.set_xlabel("epoch (of this run)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylim(bottom=0)
        if column == "staleness_iou":
            ax.set_ylim(0, 1.05)
        skipped = [label for label in metrics if label not in drawn]
        if skipped:
            ax.text(0.01, 0.01, "without this column: " + ", ".join(skipped), transform=ax.transAxes, fontsize=7,
                    color="0.35", ha="left", va="bottom", wrap=True)
    ordered = [label for label in metrics if label in handles]
    _legend_below(fig, [handles[k] for k in ordered], ordered)
    fig.suptitle("Text signal over training: gradient share and staleness", fontsize=12)
    fig.subplots_adjust(left=0.07, right=0.98, top=0.86, bottom=_bottom(fig, len(ordered)), wspace=0.25)
    _save(fig, out_png)


def _first_present(header: list[str], names: tuple[str, ...]) -> str | None:
    return next((n for n in names if n in header), None)


def results_bars(summary_csv: str | Path, out_png: str | Path) -> None:
    """Val mIoU per experiment (mean over seeds where the table has one) with ±std error bars if available."""
    header, rows = read_table(summary_csv)
    label_col = _first_present(header, ("experiment", "run_id"))
    value_col = _first_present(header, ("miou_mean", "miou"))
    for needed, found in (("experiment' or 'run_id", label_col), ("miou_mean' or 'miou", value_col)):
        if found is None:
            raise PlotInputError(f"{summary_csv}: missing column '{needed}' needed for the results figure "
                                 f"(columns: {', '.join(header)})")
    if not rows:
        raise PlotInputError(f"{summary_csv}: no rows")
    labels = [r[label_col] for r in rows]
    values = [_number(r[value_col]) for r in rows]
    stds = [_number(r.get("miou_std")) for r in rows] if "miou_std" in header else [math.nan] * len(rows)
    seeds = [r.get("seeds") or "" for r in rows]
    has_err = any(math.isfinite(s) for s in stds)
    n = len(rows)
    fig = Figure(figsize=(9, 1.2 + 0.45 * n))
    ax = fig.subplots(1, 1)
    ys = list(range(n))[::-1]  # first row at the top
    bars = [v if math.isfinite(v) else 0.0 for v in values]
    ax.barh(ys, bars, color=_colours(n), height=0.6)
    if has_err:
        with_err = [i for i, s in enumerate(stds) if math.isfinite(s)]
        ax.errorbar([bars[i] for i in with_err], [ys[i] for i in with_err], xerr=[stds[i] for i in with_err],
                    fmt="none", ecolor="0.2", capsize=4, elinewidth=1.2)
    top = max([b + (s if math.isfinite(s) else 0.0) for b, s in zip(bars, stds)] + [0.05])
    for y, v, s, k in zip(ys, values, stds, seeds):
        text = "n/a" if not math.isfinite(v) else f"{v:.3f}" + (f" ± {s:.3f}" if math.isfinite(s) else "")
        if k and k != "1":
            text += f"  (n={k})"
        ax.text((v if math.isfinite(v) else 0) + (s if math.isfinite(s) else 0) + top * 0.01, y, " " + text,
                va="center", fontsize=9)
    ax.set_yticks(ys, labels)
    ax.set_xlim(0, min(1.0, top * 1.35) if top <= 1 else top * 1.35)
    ax.set_xlabel("validation mIoU" + (" (mean ± sample std over seeds)" if has_err else ""))
    ax.set_ylabel("experiment")
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    ax.set_title("Validation mIoU per experiment" + ("" if has_err else " (single seed, no error bars)"),
                 fontsize=12)
    fig.subplots_adjust(left=0.16, right=0.97, top=1 - 0.55 / fig.get_figheight(),
                        bottom=0.65 / fig.get_figheight())
    _save(fig, out_png)


def summary_table_html(summary_csv: str | Path, out_html: str | Path, titles: dict[str, str] | None = None,
                       text_help_csv: str | Path | None = None) -> None:
    """The results table as a standalone HTML page (the report renders HTML items inline); with
    `text_help_csv` (summarize's comparisons) the page ends with the "Does text help?" table."""
    header, rows = read_table(summary_csv)
    titles = titles or {}
    extra = "" if text_help_csv is None else text_help_html(text_help_csv)

    def cell(column: str, value: str) -> str:
        number = _number(value)
        if value in ("", "None"):
            return "-"
        if column in TEXT_COLUMNS or not math.isfinite(number):
            return html.escape(value)
        if number == int(number) and abs(number) < 1e9:
            return str(int(number))
        return f"{number:.4f}" if abs(number) < 10 else f"{number:.1f}"

    head = "".join(f"<th>{html.escape(titles.get(c, c))}</th>" for c in header)
    body = "\n".join("<tr>" + "".join(f"<td>{cell(c, r.get(c) or '')}</td>" for c in header) + "</tr>" for r in rows)
    page = ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>ttdl results</title><style>"
            "body{font-family:sans-serif;font-size:14px;margin:1em}"
            "table{border-collapse:collapse}th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}"
            "th{background:#f0f0f0}tr:nth-child(even){background:#fafafa}</style></head><body>\n"
            f"<p>Source: {html.escape(str(summary_csv))}. Validation scores of each run's best checkpoint, "
            "re-evaluated by the evaluate rule.</p>\n"
            f"<table>\n<tr>{head}</tr>\n{body}\n</table>\n{extra}</body></html>\n")
    with atomic_path(out_html) as tmp:
        tmp.write_text(page, encoding="utf-8")


HELP_ROLE_TITLES = {"ce": "CE only", "matched": "matched text", "shuffled": "shuffled text",
                    "class_name": "class name", "onehot": "one-hot code"}


def text_help_html(text_help_csv: str | Path) -> str:
    """The "Does text help?" comparisons (summarize's text_help.csv) as an HTML section."""
    header, rows = read_table(text_help_csv)
    missing = [c for c in ("baseline", "first", "second", "delta_miou", "ci_low", "ci_high", "p") if c not in header]
    if missing:
        raise PlotInputError(f"{text_help_csv}: missing column {missing[0]!r} needed for the text-help table "
                             f"(columns: {', '.join(header)})")
    out = ["<h2>Does text help?</h2>\n<p>Each text run against its same-start CE run and the controls sharing its "
           "objective apart from the text, paired by seed: Δ = mean (first − second) val mIoU, 95 % t-interval, "
           "two-sided paired t-test.</p>"]
    if not rows:
        return out[0] + "\n<p>n/a: no experiment of the summary has a baseline and a text role.</p>\n"

    def arm(row: dict, side: str) -> str:
        role = row.get(f"{side}_role", "")
        return f"{html.escape(HELP_ROLE_TITLES.get(role, role))} ({html.escape(row[side])})"

    def num(value: str, signed: bool = False) -> str:
        number = _number(value)
        return "n/a" if not math.isfinite(number) else (f"{number:+.4f}" if signed else f"{number:.4f}")

    out.append("<table>\n<tr><th>baseline</th><th>first</th><th>second</th><th>seeds</th><th>mIoU first</th>"
               "<th>mIoU second</th><th>Δ mIoU</th><th>95 % CI</th><th>paired p</th></tr>")
    for r in rows:
        ci = ("n/a" if not math.isfinite(_number(r["ci_low"]))
              else f"[{num(r['ci_low'], True)}, {num(r['ci_high'], True)}]")
        p = num(r["p"]) if math.isfinite(_number(r["p"])) else (r.get("note") or "n/a")
        out.append(f"<tr><td>{html.escape(r['baseline'])}</td><td>{arm(r, 'first')}</td><td>{arm(r, 'second')}</td>"
                   f"<td>{html.escape(r.get('n', ''))}</td><td>{num(r.get('miou_first', ''))}</td>"
                   f"<td>{num(r.get('miou_second', ''))}</td><td>{num(r['delta_miou'], True)}</td><td>{ci}</td>"
                   f"<td>{html.escape(p)}</td></tr>")
    return "\n".join(out) + "\n</table>\n"
