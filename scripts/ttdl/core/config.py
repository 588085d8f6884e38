"""Configuration: load, validate against the schema, fill defaults, resolve one run.

Torch-free on purpose: the Snakefile imports it to validate the config before
any job starts, and every script uses the same resolution so a run means the
same thing whether Snakemake or a person starts it.
"""
from __future__ import annotations

import copy
import functools
import json
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

# The schema ships inside the package; workflow/schemas/config.schema.yaml links to it.
SCHEMA_NAME = "workflow/schemas/config.schema.yaml"


class ConfigError(ValueError):
    """A config problem; the message names the file and the key."""


def _with_defaults(validator_cls):
    """A validator that also writes schema defaults into the instance."""
    validate_properties = validator_cls.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for key, sub in properties.items():
                if "default" in sub and key not in instance:
                    instance[key] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_cls, {"properties": set_defaults})


_Validator = _with_defaults(jsonschema.Draft7Validator)


# libyaml's loader when PyYAML was built with it: the same documents, parsed ~8x faster.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@functools.cache
def load_schema() -> dict:
    """The config schema, parsed once per process (planning `all` resolves every run)."""
    return yaml.load(resources.files("ttdl.core").joinpath("config.schema.yaml").read_text(), Loader=_YAML_LOADER)


def _key_path(error: jsonschema.ValidationError, prefix: str) -> str:
    parts = [prefix] if prefix else []
    parts += [str(p) for p in error.absolute_path]
    return ".".join(parts) or "<top level>"


def _validate(instance: dict, schema: dict, source: str, prefix: str = "") -> None:
    """Validate `instance` in place (filling defaults); a ConfigError lists the first problems."""
    errors = sorted(_Validator(schema).iter_errors(instance), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"  - {_key_path(e, prefix)}: {e.message}" for e in errors[:10]]
        raise ConfigError(f"invalid config ({source}):\n" + "\n".join(lines)
                          + f"\nSee {SCHEMA_NAME} for the allowed keys and types.")


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def validate_config(config: dict, source: str = "config") -> dict:
    """Validate in place (filling defaults), then check every run resolves; returns config."""
    schema = load_schema()
    _validate(config, schema, source)
    expand_seeds(config)
    runs = config["runs"]
    resolved = {}
    for run_id, run in runs.items():
        init = run.get("init")
        if init is not None and init not in runs:
            raise ConfigError(f"invalid config ({source}):\n  - runs.{run_id}.init: {init!r} is not a run id "
                              f"(known: {', '.join(runs)})")
        resolved[run_id] = resolve_run(config, run_id, source)
    for adaptation_id, adaptation in config["adaptations"].items():
        if adaptation["init"] not in runs:
            raise ConfigError(f"invalid config ({source}):\n  - adaptations.{adaptation_id}.init: "
                              f"{adaptation['init']!r} is not a run id")
    kinds = {a_id: a["kind"] for a_id, a in config["adaptations"].items()}
    for a_id, adaptation in config["adaptations"].items():
        if adaptation["encoder_from"] is not None and kinds.get(adaptation["encoder_from"]) != "encoder":
            raise ConfigError(f"invalid config ({source}):\n  - adaptations.{a_id}.encoder_from: "
                              f"{adaptation['encoder_from']!r} is not an adaptation of kind encoder")
    for run_id, settings in resolved.items():
        references = (("adapted_by", "encoder", "encoder"), ("concat_adapter_from", "objective", "concat"))
        for key, section, kind in references:
            ref = settings[section][key]
            if ref is not None and kinds.get(ref) != kind:
                raise ConfigError(f"invalid config ({source}):\n  - runs.{run_id}.{section}.{key}: "
                                  f"{ref!r} is not an adaptation of kind {kind} (known: {', '.join(kinds) or 'none'})")
    for run_id, run in runs.items():
        if run.get("baseline") is not None and run["baseline"] not in runs:
            raise ConfigError(f"invalid config ({source}):\n  - runs.{run_id}.baseline: {run['baseline']!r} "
                              "is not a run id")
    for run_id in config["summary"]:
        if run_id not in runs:
            raise ConfigError(f"invalid config ({source}):\n  - summary: {run_id!r} is not a run id")
    _check_acyclic(runs, source)
    return config


def seed_run_id(run_id: str, seed_index: int, seeds: list[int]) -> str:
    """The first seed keeps the plain id (results/{run}/...); others live under {run}/seed{n}."""
    return run_id if seed_index == 0 else f"{run_id}/seed{seeds[seed_index]}"


def seed_runs(config: dict, run_id: str) -> list[str]:
    """All ids of one experiment across the configured seeds."""
    seeds = config["seeds"]
    return [seed_run_id(run_id, i, seeds) for i in range(len(seeds))]


def expand_seeds(config: dict) -> None:
    """Add one run per extra seed, chained to the same seed of its init run (idempotent)."""
    seeds = config["seeds"]
    runs = config["runs"]
    for run_id, run in list(runs.items()):
        if run.get("seed_of") is not None:
            continue
        run.setdefault("train", {})["seed"] = seeds[0]
        for index in range(1, len(seeds)):
            copy_ = copy.deepcopy(run)
            copy_["seed_of"] = run_id
            copy_["train"]["seed"] = seeds[index]
            if run.get("init") is not None:
                copy_["init"] = seed_run_id(run["init"], index, seeds)
            if run.get("baseline") is not None:
                copy_["baseline"] = seed_run_id(run["baseline"], index, seeds)
            runs.setdefault(seed_run_id(run_id, index, seeds), copy_)


def _check_acyclic(runs: dict, source: str) -> None:
    for start in runs:
        seen, run_id = set(), start
        while run_id is not None:
            if run_id in seen:
                raise ConfigError(f"invalid config ({source}):\n  - runs.{start}.init: the init chain loops back "
                                  f"to {run_id!r}")
            seen.add(run_id)
            run_id = runs[run_id].get("init")


def load_config(path: str | Path, overrides: dict | None = None) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    config = deep_merge(config, overrides or {})
    return validate_config(config, str(path))


SHARED_SECTIONS = ("data", "model", "train", "describer", "encoder", "cache", "objective")
# What a resolved run holds besides its sections.
RUN_KEYS = ("run_id", "init", "prefill", "description", "baseline", "seed_of")


def resolve_run(config: dict, run_id: str, source: str = "config") -> dict:
    """The settings of one run: shared sections with the run's overrides merged in."""
    if run_id not in config["runs"]:
        raise ConfigError(f"unknown run {run_id!r} ({source}); known: {', '.join(config['runs'])}")
    run = config["runs"][run_id]
    resolved = {"run_id": run_id, "init": run.get("init"), "prefill": run.get("prefill", False),
                "description": run.get("description", ""), "baseline": run.get("baseline"),
                "seed_of": run.get("seed_of")}
    for section in SHARED_SECTIONS:
        if section not in config:
            continue
        merged = deep_merge(config[section], run.get(section, {}))
        resolved[section] = _filled_section(section, merged, source, f"runs.{run_id}.{section}")
    return resolved


# Validated sections by content: runs mostly share their sections, and planning the
# workflow resolves every run, so each distinct section is validated once per process.
_FILLED: dict[tuple[str, str], dict] = {}


def _filled_section(name: str, values: dict, source: str, prefix: str) -> dict:
    """`values` (a fresh dict, filled in place) validated against definition `name`, defaults filled.

    repr() is the memo key: unlike JSON it keeps list/tuple, int/float/bool and
    key order apart, so a hit is the very same input. Failures are not memoised
    (their message names the run).
    """
    key = (name, repr(values))
    filled = _FILLED.get(key)
    if filled is None:
        _validate(values, _section_schema(name), source, prefix=prefix)
        filled = _FILLED[key] = copy.deepcopy(values)
        return values
    return copy.deepcopy(filled)


def _section_schema(name: str) -> dict:
    """The schema of a section: a definition (`train`) or a nested property (`data.synthetic`)."""
    head, *rest = name.split(".")
    schema = load_schema()["definitions"][head]
    for part in rest:
        schema = schema["properties"][part]
    return schema


def fill_section_defaults(name: str, values: dict, source: str = "settings") -> dict:
    """A copy of one section (`train`, `data.synthetic`, ...) validated with its schema defaults filled."""
    return _filled_section(name, copy.deepcopy(values), source, name)


def resolve_adaptation(config: dict, adaptation_id: str) -> dict:
    """An adaptation job's settings: its init run's settings plus the adaptation block."""
    adaptation = config["adaptations"][adaptation_id]
    return resolve_run(config, adaptation["init"]) | {"adaptation": adaptation, "adaptation_id": adaptation_id}


def to_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))
