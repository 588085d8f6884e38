"""Faults of the config (issue 11): hostile names, numbers that train to garbage, command-line
overrides, and what the Docker build context may carry.

Each rejection is asserted with its exact message line: the key, the value and why.
"""
from __future__ import annotations

import copy
import math
import re

import pytest

from conftest import REPO
from ttdl.core.config import (
    ConfigError,
    check_id,
    load_schema,
    resolve_run,
    seed_runs,
    typed_overrides,
    validate_config,
)
from ttdl.core.settings import ObjectiveSettings

NAN, INF = float("nan"), float("inf")
ID_RULE = ("is not a valid id: use segments of letters, digits, '_', '-' and '.' separated by '/', "
           "none starting with '.'")


def base(**sections) -> dict:
    config = {"runs": {"a": {}, "b": {"init": "a"}}, "summary": ["a", "b"]}
    config.update(copy.deepcopy(sections))
    return config


def problems(config: dict) -> list[str]:
    """The problem lines of the ConfigError `config` raises ('key: why', without '  - ')."""
    with pytest.raises(ConfigError) as info:
        validate_config(config, source="my.yaml")
    text = str(info.value)
    assert text.startswith("invalid config (my.yaml):\n"), text
    return [line[4:] for line in text.splitlines() if line.startswith("  - ")]


# ---- names: one safe pattern for every id that becomes a path or a shell argument ------------

@pytest.mark.parametrize("name", [
    "z$(touch pwned)", "a;rm -rf x", "a b", "`id`", "../escape", "a/../../b", "..", ".", ".hidden",
    "a/.hidden", "a//b", "/abs", "a/", "", "a\nb", "x'y", "a*",
])
def test_unsafe_run_ids_are_rejected_with_the_key_named(name) -> None:
    assert problems({"runs": {name: {}}}) == [f"runs: {name!r} {ID_RULE}"]


def test_an_adaptation_named_like_a_command_is_rejected() -> None:
    config = base(adaptations={"z$(touch pwned)": {"init": "a"}})
    assert problems(config) == [f"adaptations: 'z$(touch pwned)' {ID_RULE}"]


@pytest.mark.parametrize("name", ["0", "3.1", "3.1/phase1", "ctrl/lambda0", "vle/1", "a-b_c.d", "-x", "a..b"])
def test_ordinary_ids_pass(name) -> None:
    config = validate_config({"runs": {name: {}}, "adaptations": {f"{name}/adapt": {"init": name}}})
    assert name in config["runs"]


def test_the_pattern_is_defined_once_in_the_schema() -> None:
    schema = load_schema()
    id_ref = {"$ref": "#/definitions/id"}
    assert schema["properties"]["runs"]["propertyNames"] == id_ref
    assert schema["properties"]["adaptations"]["propertyNames"] == id_ref
    text = (REPO / "scripts" / "ttdl" / "core" / "config.schema.yaml").read_text()
    assert text.count("pattern: \"^[A-Za-z0-9_-]") == 1


def test_per_seed_ids_match_the_pattern() -> None:
    config = validate_config(base(seeds=[0, 7, -3]))
    ids = seed_runs(config, "b")
    assert ids == ["b", "b/seed7", "b/seed-3"]
    assert all(check_id(run_id, "runs") == run_id for run_id in config["runs"])
    assert config["runs"]["b/seed7"]["init"] == "a/seed7"


def test_check_id_names_its_key() -> None:
    with pytest.raises(ConfigError) as info:
        check_id("a/../b", "seeds (run 'a', seed 1)", source="my.yaml")
    assert str(info.value) == f"invalid config (my.yaml):\n  - seeds (run 'a', seed 1): 'a/../b' {ID_RULE}"


# ---- numbers: finite everywhere, and in range ----------------------------------------------

@pytest.mark.parametrize("section, key, value, why", [
    ("train", "lr", NAN, "nan is not a finite number"),
    ("train", "lr", INF, "inf is not a finite number"),
    ("train", "lr", 0, "0 is less than or equal to the minimum of 0"),
    ("train", "lr", -0.001, "-0.001 is less than or equal to the minimum of 0"),
    ("train", "grad_clip", NAN, "nan is not a finite number"),
    ("train", "grad_clip", -INF, "-inf is not a finite number"),
    ("train", "weight_decay", NAN, "nan is not a finite number"),
    ("train", "target_miou", INF, "inf is not a finite number"),
    ("train", "epochs", INF, "inf is not a finite number"),
    ("objective", "lambda", NAN, "nan is not a finite number"),
    ("objective", "lambda", INF, "inf is not a finite number"),
    ("objective", "lambda", -0.5, "-0.5 is less than the minimum of 0"),
    ("objective", "scale", 0, "0 is less than or equal to the minimum of 0"),
    ("objective", "scale", NAN, "nan is not a finite number"),
    ("objective", "bias", -INF, "-inf is not a finite number"),
    ("objective", "gamma", NAN, "nan is not a finite number"),
    ("describer", "timeout_s", NAN, "nan is not a finite number"),
    ("describer", "timeout_s", INF, "inf is not a finite number"),
    ("describer", "timeout_s", 0, "0 is less than or equal to the minimum of 0"),
    ("describer", "request_deadline_s", INF, "inf is not a finite number"),
    ("describer", "request_deadline_s", -1, "-1 is less than or equal to the minimum of 0"),
    ("describer", "backoff_s", NAN, "nan is not a finite number"),
    ("describer", "temperature", NAN, "nan is not a finite number"),
    ("cache", "percentile", INF, "inf is not a finite number"),
    ("cache", "empty_vs_empty", NAN, "nan is not a finite number"),
    ("model", "bn_momentum", NAN, "nan is not a finite number"),
])
def test_bad_numbers_name_the_key(section, key, value, why) -> None:
    assert problems(base(**{section: {key: value}})) == [f"{section}.{key}: {why}"]


def test_every_number_of_the_schema_is_checked_for_finiteness() -> None:
    """No key needs its own rule: NaN fails each `type: number` of the schema."""
    schema = load_schema()
    checked = 0
    for section in ("train", "objective", "describer", "encoder", "cache", "model", "data"):
        for key, spec in schema["definitions"][section]["properties"].items():
            types = spec.get("type", [])
            if "number" in ([types] if isinstance(types, str) else types):
                assert problems(base(**{section: {key: NAN}})) == [f"{section}.{key}: nan is not a finite number"]
                checked += 1
    assert checked >= 15


def test_numbers_inside_lists_and_runs_and_adaptations() -> None:
    assert problems(base(encoder={"image_mean": [0.5, NAN, 0.5]})) == [
        "encoder.image_mean.1: nan is not a finite number"]
    assert problems(base(encoder={"image_std": [0.2, 0, 0.2]})) == [
        "encoder.image_std.1: 0 is less than or equal to the minimum of 0"]
    assert problems(base(seeds=[0, INF])) == ["seeds.1: inf is not a finite number"]
    assert problems(base(adaptations={"vle/1": {"init": "a", "lr": NAN}})) == [
        "adaptations.vle/1.lr: nan is not a finite number"]
    config = base()
    config["runs"]["b"]["train"] = {"lr": NAN}
    assert problems(config) == ["runs.b.train.lr: nan is not a finite number"]


CONVEX = ("1.5 is greater than 1, the most mix 'convex' allows ((1 - lambda) * CE would turn negative: "
          "gradient ascent on CE); use mix 'additive' for a larger weight")


def test_lambda_above_one_with_the_convex_mix_names_the_run() -> None:
    config = base()
    config["runs"]["b"]["objective"] = {"name": "grouped_siglip", "lambda": 1.5}
    assert problems(config) == [f"runs.b.objective.lambda: {CONVEX}"]


def test_a_shared_lambda_is_judged_with_each_run_s_mix() -> None:
    config = base(objective={"name": "grouped_siglip", "lambda": 1.5, "mix": "additive"})
    assert resolve_run(validate_config(copy.deepcopy(config)), "a")["objective"]["lambda"] == 1.5  # additive: fine
    config["runs"]["b"]["objective"] = {"mix": "convex"}
    assert problems(config) == [f"runs.b.objective.lambda: {CONVEX}"]


def test_ce_only_runs_ignore_lambda() -> None:
    config = validate_config(base(objective={"lambda": 1.5}))  # objective.name none: lambda is not used
    assert resolve_run(config, "b")["objective"]["lambda"] == 1.5


def test_lambda_one_with_the_convex_mix_is_allowed() -> None:
    config = validate_config(base(objective={"name": "grouped_siglip", "lambda": 1.0}))
    assert resolve_run(config, "a")["objective"]["lambda"] == 1.0


def test_the_convex_rule_holds_for_settings_built_by_hand_too() -> None:
    with pytest.raises(ConfigError, match=re.escape(f"objective.lambda: {CONVEX}")):
        ObjectiveSettings.from_partial({"name": "variable_siglip", "lambda": 1.5})
    assert ObjectiveSettings.from_partial({"name": "variable_siglip", "lambda": 1.5, "mix": "additive"}).lambda_ == 1.5


# ---- command-line overrides: Snakemake hands nested values over as strings ----------------

def test_overrides_are_typed_by_the_schema() -> None:
    """What `--config 'train={"epochs": 2, ...}' ...` gives the Snakefile (YAML BaseLoader: strings)."""
    typed = typed_overrides({
        "train": {"epochs": "2", "lr": "1e-3", "grad_clip": "null", "amp": "off", "hflip": "false",
                  "target_miou": "0.5"},
        "seeds": ["0", "1"],
        "describer": {"model": "123", "base_url": "~", "backend": "openai"},
        "runs": {"a": {"train": {"epochs": "3"}, "objective": {"lambda": "0.2"}}},
        "adaptations": {"vle/1": {"init": "a", "epochs": "4"}},
    })
    assert typed == {
        "train": {"epochs": 2, "lr": 0.001, "grad_clip": None, "amp": "off", "hflip": False, "target_miou": 0.5},
        "seeds": [0, 1],
        "describer": {"model": "123", "base_url": None, "backend": "openai"},
        "runs": {"a": {"train": {"epochs": 3}, "objective": {"lambda": 0.2}}},
        "adaptations": {"vle/1": {"init": "a", "epochs": 4}},
    }
    assert type(typed["train"]["epochs"]) is int and type(typed["train"]["lr"]) is float


def test_typed_overrides_still_fail_with_the_key_named() -> None:
    typed = typed_overrides({"train": {"epochs": "two", "lr": "nan"}})
    assert typed["train"]["epochs"] == "two" and math.isnan(typed["train"]["lr"])
    assert problems(base(**typed)) == ["train.epochs: 'two' is not of type 'integer'",
                                       "train.lr: nan is not a finite number"]


# ---- the Docker build context carries no secrets -------------------------------------------

def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule for the patterns used here (no `!`): `**` spans folders."""
    for pattern in patterns:
        regex = re.escape(pattern).replace(r"\*\*/", "(?:.*/)?").replace(r"\*", "[^/]*")
        if re.fullmatch(regex, path) or any(re.fullmatch(regex, path[: i]) for i, c in enumerate(path) if c == "/"):
            return True
    return False


def test_the_docker_context_excludes_secret_files() -> None:
    lines = (REPO / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert {".env", "**/.env", "**/*.pem", "**/*.key"} <= set(patterns)
    assert not any(p.startswith("!") for p in patterns)
    for secret in (".env", "config/.env", "a/b/.env", ".env.local", "docker/ollama.env", "secrets.env",
                   "server.pem", "certs/tls.key", "deploy/client.p12", ".netrc", "home/.git-credentials",
                   "id_rsa", "keys/id_ed25519.pub"):
        assert dockerignored(secret, patterns), secret
    for kept in ("Makefile", "pyproject.toml", "envs/requirements.txt", "scripts/ttdl/core/config.py",
                 "config/config.yaml", "docker/Dockerfile", "workflow/Snakefile", "config/prompts/keyed.yaml"):
        assert not dockerignored(kept, patterns), kept
