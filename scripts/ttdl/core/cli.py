"""Argument handling shared by the scripts: where the run's settings come from."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from ttdl.core import redact
from ttdl.core.config import ConfigError, load_config, resolve_run
from ttdl.core.settings import RunSettings


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--run-json", help="resolved run settings as JSON (what the workflow passes)")
    group.add_argument("--config", help="a config YAML; with --run, resolve one run from it")
    parser.add_argument("--run", help="run id, with --config")


def resolved_run(args: argparse.Namespace) -> dict:
    """The run's resolved settings as a plain dict (the form the workflow passes as --run-json)."""
    if args.run_json:
        return json.loads(args.run_json)
    if not args.run:
        raise SystemExit("--run is required with --config")
    try:
        return resolve_run(load_config(args.config), args.run, args.config)
    except ConfigError as exc:
        raise SystemExit(str(exc)) from None


def run_settings(args: argparse.Namespace) -> RunSettings:
    """The run's settings, typed: what a job takes."""
    try:
        return RunSettings.from_dict(resolved_run(args))
    except ConfigError as exc:
        raise SystemExit(str(exc)) from None


def setup_logging(log_file: str | None = None) -> logging.Logger:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
                        handlers=handlers, force=True)
    redact.install()  # every log line and uncaught traceback of a job is scrubbed of secrets
    return logging.getLogger("ttdl")
