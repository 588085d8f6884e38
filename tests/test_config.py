"""Config validation: rejections name the key, defaults are filled, runs resolve."""
from __future__ import annotations

import copy

import pytest
import yaml

from conftest import REPO
from ttdl.core.config import ConfigError, load_config, resolve_run, validate_config
from ttdl.core.settings import RunSettings


def minimal(**extra) -> dict:
    config = {"runs": {"a": {"train": {"epochs": 3}}, "b": {"init": "a", "model": {"bn_momentum": 0.2}}},
              "summary": ["a", "b"]}
    config.update(copy.deepcopy(extra))
    return config


def rejected(config: dict) -> str:
    with pytest.raises(ConfigError) as info:
        validate_config(config, source="my.yaml")
    message = str(info.value)
    assert "my.yaml" in message
    return message


# ---- rejections ------------------------------------------------------------------

def test_unknown_top_level_key() -> None:
    message = rejected(minimal(trian={"epochs": 2}))
    assert "'trian'" in message and "<top level>" in message


def test_wrong_type_names_the_key() -> None:
    message = rejected(minimal(train={"lr": "fast"}))
    assert "train.lr" in message and "'fast'" in message and "number" in message


def test_unknown_key_in_a_shared_section() -> None:
    message = rejected(minimal(data={"rezise": 64}))
    assert "data" in message and "'rezise'" in message


def test_out_of_range_value() -> None:
    assert "train.batch_size" in rejected(minimal(train={"batch_size": 0}))
    assert "model.name" in rejected(minimal(model={"name": "unet"}))


def test_unknown_key_in_a_run_train_override() -> None:
    config = minimal()
    config["runs"]["b"]["train"] = {"epoch": 4}
    message = rejected(config)
    assert "runs.b.train" in message and "'epoch'" in message


def test_wrong_type_in_a_run_override() -> None:
    config = minimal()
    config["runs"]["a"]["train"]["lr"] = "fast"
    assert "runs.a.train.lr" in rejected(config)


def test_unknown_key_in_a_run() -> None:
    config = minimal()
    config["runs"]["a"]["epochs"] = 3
    message = rejected(config)
    assert "runs.a" in message and "'epochs'" in message


def test_init_that_names_no_run() -> None:
    config = minimal()
    config["runs"]["b"]["init"] = "nope"
    message = rejected(config)
    assert "runs.b.init" in message and "'nope'" in message


@pytest.mark.parametrize("inits", [{"a": "b", "b": "a"}, {"a": "a", "b": None}, {"a": "c", "b": "a", "c": "b"}])
def test_init_loop(inits) -> None:
    config = {"runs": {run: {"init": init} for run, init in inits.items()}}
    message = rejected(config)
    assert "init" in message and "loop" in message


def test_summary_naming_an_unknown_run() -> None:
    message = rejected(minimal(summary=["a", "zz"]))
    assert "summary" in message and "'zz'" in message


@pytest.mark.parametrize("runs", [{}, {"a b": {}}, {"/a": {}}, {"a": None}, {"../a": {}}, {"a/./b": {}},
                                  {"a/.b": {}}, {"a$(id)": {}}])
def test_bad_runs(runs) -> None:
    assert "runs" in rejected({"runs": runs})


def test_runs_are_required() -> None:
    assert "runs" in rejected({"train": {"epochs": 2}})


# ---- defaults and resolution ---------------------------------------------------------

def test_defaults_get_filled() -> None:
    config = validate_config(minimal())
    assert config["data"]["root"] == "resources/data/synthetic" and config["data"]["ignore_index"] == 255
    assert config["data"]["synthetic"] == {"num_train": 240, "num_val": 80, "image_size": 112, "seed": 0}
    assert config["model"]["name"] == "lraspp_mobilenet_v3_large" and config["model"]["bn_momentum"] == 0.1
    assert config["train"]["batch_size"] == 16 and config["train"]["lr"] == 0.001
    assert config["train"]["target_miou"] is None and config["train"]["checkpoint_every_steps"] == 0
    assert validate_config({"runs": {"x": {}}})["summary"] == []


def test_partial_nested_section_keeps_other_defaults() -> None:
    config = validate_config(minimal(data={"synthetic": {"num_train": 10}}))
    assert config["data"]["synthetic"]["num_train"] == 10 and config["data"]["synthetic"]["num_val"] == 80


def test_resolve_run_merges_overrides_over_shared_sections() -> None:
    config = validate_config(minimal(train={"lr": 0.01, "epochs": 7}))
    snapshot = copy.deepcopy(config)
    a, b = resolve_run(config, "a"), resolve_run(config, "b")
    assert a["run_id"] == "a" and a["init"] is None and b["init"] == "a"
    assert a["train"]["epochs"] == 3 and b["train"]["epochs"] == 7
    assert a["train"]["lr"] == b["train"]["lr"] == 0.01
    assert a["train"]["batch_size"] == 16  # defaults reach the run too
    assert b["model"]["bn_momentum"] == 0.2 and a["model"]["bn_momentum"] == 0.1
    a["train"]["lr"] = 123.0  # the resolved dict is a copy
    assert config == snapshot


def test_resolve_unknown_run() -> None:
    with pytest.raises(ConfigError, match="'zz'.*known: a, b"):
        resolve_run(validate_config(minimal()), "zz")


# ---- files ---------------------------------------------------------------------

def test_load_config_missing_file_names_it(tmp_path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError, match="absent.yaml"):
        load_config(path)


def test_load_config_invalid_yaml_names_it(tmp_path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("runs:\n  a: {train: [1, 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_load_config_schema_error_names_the_file_and_key(tmp_path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump({"runs": {"a": {}}, "train": {"lrr": 0.1}}))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and "'lrr'" in str(info.value)


def test_load_config_with_overrides(tmp_path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(minimal()))
    config = load_config(path, overrides={"train": {"epochs": 5}})
    assert config["train"]["epochs"] == 5 and config["train"]["batch_size"] == 16
    assert resolve_run(config, "b")["train"]["epochs"] == 5


def test_the_shipped_config_is_valid() -> None:
    config = load_config(REPO / "config" / "config.yaml")
    assert config["runs"] and set(config["summary"]) <= set(config["runs"])
    for run_id in config["runs"]:
        resolve_run(config, run_id)


# ---- resolution is memoised, never shared ----------------------------------------------

def test_resolved_sections_are_fresh_copies() -> None:
    config = validate_config(minimal())
    first = resolve_run(config, "a")
    first["train"]["lr"] = 123.0
    first["data"]["synthetic"]["num_train"] = -1
    again = resolve_run(config, "a")
    assert again["train"]["lr"] == 0.001 and again["data"]["synthetic"]["num_train"] == 240
    assert again["train"] is not resolve_run(config, "a")["train"]


def test_a_bad_override_is_reported_even_after_good_runs_resolved() -> None:
    config = validate_config(minimal())
    resolve_run(config, "a")
    config["runs"]["c"] = {"train": {"epochs": 0}}
    with pytest.raises(ConfigError, match=r"runs\.c\.train\.epochs"):
        resolve_run(config, "c")


def test_each_distinct_section_is_validated_once(monkeypatch) -> None:
    """Planning resolves every run many times; validation must not scale with that."""
    import ttdl.core.config as config_module

    overlay = yaml.safe_load((REPO / "config" / "full.yaml").read_text())
    config = load_config(REPO / "config" / "config.yaml", overlay)
    config_module._FILLED.clear()
    calls: list[str] = []
    real = config_module._validate
    monkeypatch.setattr(config_module, "_validate", lambda *a, **k: (calls.append(k.get("prefix")), real(*a, **k)))
    for _ in range(3):
        resolved = [resolve_run(config, run_id) for run_id in config["runs"]]
    distinct = {(name, repr(run[name])) for run in resolved for name in run if isinstance(run[name], dict)}
    assert 0 < len(calls) <= len(distinct) < 7 * len(config["runs"])


@pytest.mark.parametrize("name", ["config.yaml", "full.yaml", "voc.yaml", "coco.yaml"])
def test_memoised_resolution_equals_a_fresh_one(name) -> None:
    import ttdl.core.config as config_module

    path = REPO / "config" / name
    overlay = None if name == "config.yaml" else yaml.safe_load(path.read_text())
    config = load_config(REPO / "config" / "config.yaml", overlay)
    memoised = {run_id: resolve_run(config, run_id) for run_id in config["runs"]}
    for run_id, settings in memoised.items():
        config_module._FILLED.clear()
        assert resolve_run(config, run_id) == settings
        assert RunSettings.from_dict(settings).to_dict() == settings


def test_run_settings_need_a_resolved_run() -> None:
    settings = resolve_run(validate_config(minimal()), "b")
    typed = RunSettings.from_dict(settings)
    assert typed.init == "a" and typed.model.bn_momentum == 0.2 and typed.train.epochs == 10
    with pytest.raises(ConfigError, match="prefill"):
        RunSettings.from_dict({k: v for k, v in settings.items() if k != "prefill"})
    ce_only = {k: v for k, v in settings.items() if k not in ("describer", "encoder", "cache")}
    assert RunSettings.from_dict(ce_only) == typed  # sections the workflow drops come back as the defaults


def test_the_original_preset_fills_only_what_the_config_does_not_set() -> None:
    config = validate_config(minimal(
        objective={"name": "grouped_siglip", "negatives_reduction": "mean"},  # shared, explicit
        runs={"a": {}, "b": {"objective": {"preset": "original", "scale": 2.0}}}))
    a, b = resolve_run(config, "a")["objective"], resolve_run(config, "b")["objective"]
    assert (a["preset"], a["scale"], a["image_side"], a["lambda_mode"]) == ("well_posed", 10.0, "masked", "grad_ratio")
    assert (b["scale"], b["bias"], b["image_side"], b["lambda_mode"], b["learn_scale_bias"]) == (
        2.0, 0.0, "gap", "fixed", False)  # the run's own scale wins over the preset's 1.0
    assert b["negatives_reduction"] == "mean"  # set in the shared section: the preset leaves it


def test_a_shared_preset_reaches_every_run() -> None:
    config = validate_config(minimal(objective={"name": "grouped_siglip", "preset": "original"},
                                     runs={"a": {}, "b": {}}))
    assert resolve_run(config, "a")["objective"]["grouping"] == "original"
