#!/usr/bin/env python
"""Collect the runs' results into results/summary.csv and results/summary.md."""
import argparse
from pathlib import Path

from ttdl.summary import collect_row, write_tables


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", nargs="+", required=True, help="run folders, e.g. results/0")
    parser.add_argument("--csv", required=True)
    parser.add_argument("--md", required=True)
    args = parser.parse_args()
    write_tables([collect_row(Path(d)) for d in args.runs], Path(args.csv), Path(args.md))


if __name__ == "__main__":
    main()
