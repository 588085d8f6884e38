#!/usr/bin/env python
"""Generate the embedded synthetic dataset (VOC layout) under data.root."""
import argparse

from tqdm import tqdm

from ttdl.core.cli import add_run_arguments, resolved_run, setup_logging
from ttdl.core.config import ConfigError
from ttdl.core.settings import DataSettings
from ttdl.datasets.synthetic import SyntheticSpec, generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_run_arguments(parser)
    args = parser.parse_args()
    try:
        data = DataSettings.from_partial(resolved_run(args)["data"], source="make_data")
    except ConfigError as exc:
        raise SystemExit(str(exc)) from None
    log = setup_logging()
    spec = SyntheticSpec.from_settings(data.synthetic)
    counts = generate(data.root, spec, progress=lambda it: tqdm(it, desc="synthetic data", mininterval=2))
    log.info("wrote %s to %s", counts, data.root)


if __name__ == "__main__":
    main()
