"""Configuration: load, validate against the schema, fill defaults, resolve one run.

Torch-free on purpose: the Snakefile imports it to validate the config before
any job starts, and every script uses the same resolution so a run means the
same thing whether Snakemake or a person starts it.
"""
from __future__ import annotations

import copy
import functools
import json
import math
import re
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

# The schema ships inside the package; workflow/schemas/config.schema.yaml links to it.
SCHEMA_NAME = "workflow/schemas/config.schema.yaml"


class ConfigError(ValueError):
    """A config problem; the message names the file and the key."""


def _non_finite(value: Any) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def _project_validator(validator_cls):
    """The schema's validator with this project's two additions, so that no key needs its own:

    * `properties` also writes schema defaults into the instance;
    * numbers are finite: NaN and +-inf fail every `type: number` (and `integer`) with
      "... is not a finite number", and bounds never see them (NaN compares False with
      any `minimum`/`maximum`, which is how it slipped through).
    """
    validate_properties = validator_cls.VALIDATORS["properties"]
    validate_type = validator_cls.VALIDATORS["type"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for key, sub in properties.items():
                if "default" in sub and key not in instance:
                    instance[key] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    def finite_type(validator, types, instance, schema):
        if _non_finite(instance) and {"number", "integer"} & set([types] if isinstance(types, str) else types):
            yield jsonschema.ValidationError(f"{instance!r} is not a finite number")
        else:
            yield from validate_type(validator, types, instance, schema)

    is_number = validator_cls.TYPE_CHECKER.is_type
    checker = validator_cls.TYPE_CHECKER.redefine(
        "number", lambda checker, value: is_number(value, "number") and not _non_finite(value))
    return jsonschema.validators.extend(validator_cls, {"properties": set_defaults, "type": finite_type},
                                        type_checker=checker)


_Validator = _project_validator(jsonschema.Draft7Validator)


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


def _message(error: jsonschema.ValidationError) -> str:
    """jsonschema's message, or the failing schema's own `x-message` after the value (ids)."""
    own = error.schema.get("x-message") if isinstance(error.schema, dict) else None
    return f"{error.instance!r} {own}" if own and error.validator != "type" else error.message


def _invalid(source: str, lines: list[str]) -> ConfigError:
    return ConfigError(f"invalid config ({source}):\n" + "\n".join(f"  - {line}" for line in lines))


def _validate(instance: dict, schema: dict, source: str, prefix: str = "") -> None:
    """Validate `instance` in place (filling defaults); a ConfigError lists the first problems."""
    errors = sorted(_Validator(schema).iter_errors(instance), key=lambda e: list(e.absolute_path))
    if errors:
        error = _invalid(source, [f"{_key_path(e, prefix)}: {_message(e)}" for e in errors[:10]])
        raise ConfigError(f"{error}\nSee {SCHEMA_NAME} for the allowed keys and types.")


# ---- ids -------------------------------------------------------------------------------

@functools.cache
def _id_pattern() -> re.Pattern:
    return re.compile(load_schema()["definitions"]["id"]["pattern"])


def check_id(value: str, key: str, source: str = "config") -> str:
    """`value` if it is a safe id (schema definition `id`: it becomes a path and a shell
    argument); else a ConfigError that names `key`."""
    if not isinstance(value, str) or not _id_pattern().fullmatch(value):
        raise _invalid(source, [f"{key}: {value!r} {load_schema()['definitions']['id']['x-message']}"])
    return value


# ---- command-line overrides -----------------------------------------------------------

_YAML_NULLS = ("~", "null", "Null", "NULL")


def _schema_at(schema: dict, root: dict) -> dict:
    while "$ref" in schema:  # local references only ("#/definitions/name")
        schema = root["definitions"][schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def _typed(value: Any, schema: dict, root: dict) -> Any:
    """`value` with each string typed as the schema expects at its place (see typed_overrides)."""
    schema = _schema_at(schema, root)
    if isinstance(value, Mapping):
        extra = schema.get("additionalProperties")
        properties = schema.get("properties", {})
        return {key: _typed(item, properties.get(key, extra if isinstance(extra, dict) else {}), root)
                for key, item in value.items()}
    if isinstance(value, list):
        items = schema.get("items")
        return [_typed(item, items, root) if isinstance(items, dict) else item for item in value]
    if not isinstance(value, str):
        return value
    types = schema.get("type", [])
    types = [types] if isinstance(types, str) else types
    if "null" in types and value in _YAML_NULLS:  # `null` means None, also where a string may stand
        return None
    if "string" in types or not types:  # a string is meant (or an enum: its names are strings)
        return value
    if "boolean" in types:
        parsed = yaml.safe_load(value)  # YAML 1.1, as in a config file: true/false, yes/no, on/off
        if isinstance(parsed, bool):
            return parsed
    for kind, parse in (("integer", int), ("number", int), ("number", float)):
        if kind in types:
            try:
                return parse(value)
            except ValueError:
                pass
    return value  # the validator names the key and the type it wanted


def typed_overrides(overrides: Mapping) -> dict:
    """Overrides from Snakemake's `--config KEY=VALUE`, typed by the schema.

    Snakemake parses a top-level VALUE as int, float or bool, but a nested one
    (`train={"epochs": 2}`) with YAML's BaseLoader, which keeps every scalar a string.
    Each string is read here as the schema expects at its place: `null` (`~`) is None
    where null is allowed; else an integer, number (NaN/inf then fail as non-finite)
    or boolean where one is expected and no string is allowed. Otherwise it stays a
    string (an unparsable value is then named by the validator with its type). Run
    overrides (`runs={"a": {"train": ...}}`) are typed by their section's definition.
    """
    root = load_schema()
    typed = _typed(dict(overrides), root, root)
    for run in (typed.get("runs") or {}).values():
        if isinstance(run, dict):
            for section in SHARED_SECTIONS:
                if isinstance(run.get(section), dict):
                    run[section] = _typed(run[section], root["definitions"][section], root)
    return typed


def apply_command_line(config: dict, overrides: Mapping) -> dict:
    """Merge `typed_overrides(overrides)` over `config` in place (Snakemake has already merged
    them untyped; the typed values replace those); returns config."""
    def merge(into: dict, values: dict) -> None:
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                merge(into[key], value)
            else:
                into[key] = copy.deepcopy(value)

    merge(config, typed_overrides(overrides))
    return config


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
    _apply_run_presets(config)
    _validate(config, schema, source)
    expand_seeds(config)
    runs = config["runs"]
    for run_id, run in runs.items():
        if run.get("seed_of") is not None:  # the per-seed ids are paths too
            check_id(run_id, f"seeds (run {run['seed_of']!r}, seed {run['train']['seed']!r})", source)
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


def _convex_lambda(objective: dict) -> tuple[str, str] | None:
    """(1 - lambda) * CE + lambda * aux: lambda > 1 gives CE a negative weight (CE-only runs
    ignore lambda)."""
    if objective["name"] != "none" and objective["mix"] == "convex" and objective["lambda"] > 1:
        return "lambda", (f"{objective['lambda']!r} is greater than 1, the most mix 'convex' allows "
                          "((1 - lambda) * CE would turn negative: gradient ascent on CE); "
                          "use mix 'additive' for a larger weight")
    return None


# Rules across keys of one section, checked after the schema on every resolved section
# (so a shared value and a run's override are judged together): rule(section) -> (key, why).
SECTION_RULES = {"objective": (_convex_lambda,)}


# Validated sections by content: runs mostly share their sections, and planning the
# workflow resolves every run, so each distinct section is validated once per process.
_FILLED: dict[tuple[str, str], dict] = {}


def _filled_section(name: str, values: dict, source: str, prefix: str) -> dict:
    """`values` (a fresh dict, filled in place) validated against definition `name`, defaults filled.

    repr() is the memo key: unlike JSON it keeps list/tuple, int/float/bool and
    key order apart, so a hit is the very same input. Failures are not memoised
    (their message names the run).
    """
    _apply_preset(name, values)
    key = (name, repr(values))
    filled = _FILLED.get(key)
    if filled is None:
        _validate(values, _section_schema(name), source, prefix=prefix)
        for rule in SECTION_RULES.get(name, ()):
            problem = rule(values)
            if problem is not None:
                raise _invalid(source, [f"{prefix}.{problem[0]}: {problem[1]}"])
        filled = _FILLED[key] = copy.deepcopy(values)
        return values
    return copy.deepcopy(filled)


def _apply_run_presets(config: dict) -> None:
    """Write each run's preset (its own `preset`, else the shared one) into its objective overrides.

    Runs before the schema fills defaults: only here can a key the config sets
    (in the shared section or the run) be told from a schema default, and a
    preset fills only the keys nobody set.
    """
    shared = config.get("objective") or {}
    presets = _section_schema("objective").get("x-presets", {})
    for run in (config.get("runs") or {}).values():
        if not isinstance(run, dict) or not isinstance(run.get("objective", {}), dict):
            continue  # the schema reports it
        own = run.get("objective") or {}
        preset = presets.get(own.get("preset", shared.get("preset") if isinstance(shared, dict) else None))
        if preset:
            run["objective"] = own | {key: copy.deepcopy(value) for key, value in preset.items()
                                      if key not in own and key not in shared}


def _apply_preset(name: str, values: dict) -> None:
    """Fill the keys of a named preset (the schema's x-presets) that `values` does not set itself.

    A preset is a set of defaults, not an override: `preset: original` with `scale: 2`
    keeps scale 2. Unknown presets are left to the schema's enum to report.
    """
    presets = _section_schema(name).get("x-presets", {})
    for key, value in presets.get(values.get("preset"), {}).items():
        values.setdefault(key, copy.deepcopy(value))


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
