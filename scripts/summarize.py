#!/usr/bin/env python
"""Collect the runs' results into results/summary.csv and results/summary.md."""
import argparse
import json
from pathlib import Path

from ttdl.report.summary import experiment_row, write_tables


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--experiments-json", required=True,
                        help='[{"experiment": id, "runs": [dirs], "baseline": id, "baseline_runs": [dirs]}, ...]')
    parser.add_argument("--csv", required=True)
    parser.add_argument("--md", required=True)
    args = parser.parse_args()
    rows = [experiment_row(e) for e in json.loads(args.experiments_json)]
    write_tables(rows, Path(args.csv), Path(args.md))


if __name__ == "__main__":
    main()
