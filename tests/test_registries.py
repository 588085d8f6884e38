"""The schema and the code name the same things: its enums equal the code's registries, and each
settings dataclass has exactly its schema definition's keys (and no defaults of its own).

The schema is the only place a choice or a default is written; the code holds the
implementations, keyed by the same names. These tests make a new head, backend,
mode or key fail until both sides agree.
"""
from __future__ import annotations

import dataclasses

import pytest

from ttdl.core import degrade, losses, models, runtime
from ttdl.core.config import RUN_KEYS, SHARED_SECTIONS, load_schema, resolve_run, validate_config
from ttdl.core.settings import SECTIONS, AdaptationJob, AdaptationSettings, RunSettings, Section
from ttdl.jobs import encoder_adaptation
from ttdl.text import cache, heads, objectives
from ttdl.text.describers import BACKENDS, endpoints

SCHEMA = load_schema()
DEFINITIONS = SCHEMA["definitions"]
KEYWORD_FIELDS = {"lambda": "lambda_"}  # config keys that are Python keywords -> field names


def enum(path: str) -> set:
    """The enum of `section.key` (or `section.nested.key`) in the schema."""
    head, *rest = path.split(".")
    node = DEFINITIONS[head]
    for part in rest:
        node = node["properties"][part]
    return set(node["enum"])


# schema enum -> the names the code implements
REGISTRIES = {
    "objective.name": lambda: {"none"} | set(heads.HEADS),
    "describer.backend": lambda: set(BACKENDS),
    "describer.server": lambda: set(endpoints.SERVER_MODES),
    "cache.mode": lambda: set(cache._MODES),
    "objective.mix": lambda: set(losses.MIX_MODES),
    "objective.normalise": lambda: set(losses.NORMALISE_MODES),
    "model.name": lambda: set(models.REGISTRY),
    "train.amp": lambda: set(runtime.AMP_MODES),
    "train.device": lambda: set(runtime.DEVICES),
    "adaptation.kind": lambda: set(encoder_adaptation.ADAPTATIONS),
    "describer.schedule": lambda: set(objectives.SCHEDULES),
    "cache.policy": lambda: set(cache.POLICIES),
    "objective.negatives_reduction": lambda: set(losses.NEGATIVE_REDUCTIONS),
    "objective.grouping": lambda: set(losses.GROUPINGS),
    "objective.preset": lambda: {"well_posed"} | set(DEFINITIONS["objective"]["x-presets"]),
    "data.degrade_labels.kind": lambda: set(degrade.KINDS),
}

# enums that the code reads with a plain comparison, without a table of implementations
WITHOUT_REGISTRY = {
    "data.kind", "train.schedule", "objective.text", "objective.adapter", "objective.embedding_norm",
    "objective.image_side", "objective.lambda_mode",
}


def schema_enums(node=SCHEMA["definitions"], path: str = "") -> set[str]:
    """Every `section.key` path of the definitions whose value is an enum."""
    found = set()
    for key, sub in node.items():
        here = f"{path}.{key}" if path else key
        if not isinstance(sub, dict):
            continue
        if "enum" in sub:
            found.add(here)
        if "properties" in sub:
            found |= schema_enums(sub["properties"], here)
    return found


@pytest.mark.parametrize("path", sorted(REGISTRIES))
def test_schema_enum_equals_the_code_registry(path: str) -> None:
    assert enum(path) == REGISTRIES[path]()


def test_every_schema_enum_is_accounted_for() -> None:
    """A new enum in the schema needs a registry here (or a reason to be in WITHOUT_REGISTRY)."""
    assert schema_enums() == set(REGISTRIES) | WITHOUT_REGISTRY


# ---- settings dataclasses == schema definitions --------------------------------------

def all_sections(base: type = Section) -> list[type[Section]]:
    found = []
    for sub in base.__subclasses__():
        found += [sub, *all_sections(sub)]
    return found


def section_schema(name: str) -> dict:
    head, *rest = name.split(".")
    node = DEFINITIONS[head]
    for part in rest:
        node = node["properties"][part]
    return node


def field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


SECTION_CLASSES = all_sections()


def test_every_section_class_is_found() -> None:
    names = {cls.SCHEMA for cls in SECTION_CLASSES}
    assert set(SHARED_SECTIONS) | {"adaptation", "data.synthetic", "data.coco"} <= names
    assert set(SECTIONS) == set(SHARED_SECTIONS)
    assert all(SECTIONS[name].SCHEMA == name for name in SECTIONS)


@pytest.mark.parametrize("cls", SECTION_CLASSES, ids=lambda cls: cls.SCHEMA)
def test_section_fields_are_the_schema_properties(cls) -> None:
    properties = section_schema(cls.SCHEMA)["properties"]
    assert field_names(cls) == {KEYWORD_FIELDS.get(key, key) for key in properties}
    for key, nested in cls.NESTED.items():
        assert nested.SCHEMA == f"{cls.SCHEMA}.{key}" and properties[key]["type"] == "object"


@pytest.mark.parametrize("cls", SECTION_CLASSES, ids=lambda cls: cls.SCHEMA)
def test_defaults_live_only_in_the_schema(cls) -> None:
    for field in dataclasses.fields(cls):
        assert field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING, field.name
    schema = section_schema(cls.SCHEMA)
    required = set(schema.get("required", []))
    filled = {key: sub["default"] for key, sub in schema["properties"].items() if "default" in sub}
    # every optional key has a schema default, so a partial section is always complete
    assert set(schema["properties"]) - required <= set(filled)
    if not required:
        built = cls.from_partial({})
        for key, value in filled.items():
            got = getattr(built, KEYWORD_FIELDS.get(key, key))
            got = got.to_dict() if isinstance(got, Section) else got
            if isinstance(value, dict) and key in cls.NESTED:
                assert got == cls.NESTED[key].from_partial(value).to_dict()
            else:
                assert got == value, key


def test_run_settings_are_the_experiment_run_keys() -> None:
    run_schema = DEFINITIONS["experiment_run"]["properties"]
    assert field_names(RunSettings) == set(run_schema) | {"run_id"}
    assert set(RUN_KEYS) | set(SECTIONS) == field_names(RunSettings)
    for name in SECTIONS:  # a run's section override is validated by the section's own definition
        assert run_schema[name] == {"type": "object"} and name in DEFINITIONS
    assert {f.name for f in dataclasses.fields(RunSettings) if f.default is not dataclasses.MISSING} == set()
    resolved = resolve_run(validate_config({"runs": {"a": {}}}), "a")
    assert set(resolved) == set(RUN_KEYS) | set(SHARED_SECTIONS)


def test_adaptation_job_holds_the_adaptation_definition() -> None:
    assert field_names(AdaptationJob) == {"adaptation_id", "adaptation", "run"}
    assert AdaptationSettings.SCHEMA == "adaptation"
    assert SCHEMA["properties"]["adaptations"]["additionalProperties"] == {"$ref": "#/definitions/adaptation"}
