#!/usr/bin/env python
"""Generate the embedded synthetic dataset (VOC layout) under data.root."""
import argparse

from tqdm import tqdm

from ttdl.cli import add_run_arguments, resolved_run, setup_logging
from ttdl.synthetic import SyntheticSpec, generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_run_arguments(parser)
    args = parser.parse_args()
    data = resolved_run(args)["data"]
    log = setup_logging()
    spec = SyntheticSpec(**data["synthetic"])
    counts = generate(data["root"], spec, progress=lambda it: tqdm(it, desc="synthetic data", mininterval=2))
    log.info("wrote %s to %s", counts, data["root"])


if __name__ == "__main__":
    main()
