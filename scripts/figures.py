#!/usr/bin/env python
"""Report figures from finished runs: curves.png, describer.png, results.png, text_signals.png (and the tables
as HTML)."""
import argparse
import os
from pathlib import Path

from ttdl.report.plots import describer_activity, results_bars, summary_table_html, text_signals, training_curves


def run_label(run_dir: str, results_root: str) -> str:
    """The run id: the folder relative to the results root (results/3.1/phase1 -> 3.1/phase1)."""
    rel = os.path.relpath(run_dir, results_root)
    return run_dir if rel.startswith("..") else Path(rel).as_posix()


def table_titles() -> dict[str, str]:
    """Readable column titles of the results table (key -> title), if ttdl.report.summary can be imported."""
    try:
        from ttdl.report.summary import COLUMNS
    except ImportError:
        return {}
    return {key: title for title, key in COLUMNS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", nargs="+", help="run folders, e.g. results/0 results/3.1")
    parser.add_argument("--results-root", default="results", help="labels are run folders relative to this")
    parser.add_argument("--summary", help="results/summary.csv (for results.png and --table-html)")
    parser.add_argument("--out-dir", help="writes curves.png, describer.png, results.png and text_signals.png here")
    parser.add_argument("--table-html", help="also (or only) render --summary as this HTML table")
    parser.add_argument("--text-help", help="results/text_help.csv: --table-html ends with the 'Does text help?' table")
    args = parser.parse_args()
    if args.out_dir and not (args.runs and args.summary):
        parser.error("--out-dir needs --runs and --summary")
    if args.table_html and not args.summary:
        parser.error("--table-html needs --summary")
    if not (args.out_dir or args.table_html):
        parser.error("nothing to do: give --out-dir and/or --table-html")
    if args.out_dir:
        out = Path(args.out_dir)
        runs = {run_label(d, args.results_root): Path(d) for d in args.runs}
        training_curves(runs, out / "curves.png")
        describer_activity(runs, out / "describer.png")
        results_bars(args.summary, out / "results.png")
        text_signals(runs, out / "text_signals.png")
        print(f"wrote {out}/curves.png, describer.png, results.png, text_signals.png for {len(runs)} runs")
    if args.table_html:
        summary_table_html(args.summary, args.table_html, table_titles(), text_help_csv=args.text_help)
        print(f"wrote {args.table_html}")


if __name__ == "__main__":
    main()
