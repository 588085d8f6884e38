#!/usr/bin/env python
"""Collect the runs' results into results/summary.csv and results/summary.md (with its "Does text help?" section)."""
import argparse
import json
from pathlib import Path

from ttdl.report.summary import experiment_row, text_help, write_tables, write_text_help_csv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--experiments-json", required=True,
                        help='[{"experiment": id, "runs": [dirs], "baseline": id, "baseline_runs": [dirs], '
                             '"objective": {resolved objective settings}}, ...]')
    parser.add_argument("--csv", required=True)
    parser.add_argument("--md", required=True)
    parser.add_argument("--text-help-csv", help="also write the 'Does text help?' comparisons here")
    args = parser.parse_args()
    experiments = json.loads(args.experiments_json)
    rows = [experiment_row(e) for e in experiments]
    help_rows = text_help(experiments)
    write_tables(rows, Path(args.csv), Path(args.md), help_rows)
    if args.text_help_csv:
        write_text_help_csv(help_rows, Path(args.text_help_csv))


if __name__ == "__main__":
    main()
