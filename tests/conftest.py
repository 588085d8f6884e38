"""Shared fixtures: a tiny synthetic dataset and tiny resolved runs on it.

Everything here is sized for a 2-core CPU: 24 train / 8 val images at 48 px,
batch size 8 (3 steps per epoch), one torch thread, no progress bars.
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from ttdl.core.config import deep_merge, resolve_run, validate_config
from ttdl.core.settings import RunSettings
from ttdl.datasets.synthetic import SyntheticSpec, generate

REPO = Path(__file__).resolve().parents[1]

TINY_SPEC = SyntheticSpec(num_train=24, num_val=8, image_size=48, seed=0)

# train settings of every tiny run (each test overrides what it needs)
TINY_TRAIN = {
    "device": "cpu", "batch_size": 8, "eval_batch_size": 8, "epochs": 1, "lr": 0.001,
    "warmup_steps": 0, "threads": 1, "progress": False, "num_workers": 0,
}


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """Root of a generated VOC-layout synthetic set (treat as read-only)."""
    root = tmp_path_factory.mktemp("tiny_data") / "synthetic"
    counts = generate(root, TINY_SPEC)
    assert counts == {"train": TINY_SPEC.num_train, "val": TINY_SPEC.num_val}
    return root


def make_tiny_config(data_root: str | Path, runs: dict | None = None, **sections) -> dict:
    """A validated config (defaults filled) on the tiny data; `sections` deep-merge over it."""
    config = {
        "data": {"kind": "synthetic", "root": str(data_root), "resize": TINY_SPEC.image_size,
                 "crop": TINY_SPEC.image_size,
                 "synthetic": {"num_train": TINY_SPEC.num_train, "num_val": TINY_SPEC.num_val,
                               "image_size": TINY_SPEC.image_size, "seed": TINY_SPEC.seed}},
        "train": dict(TINY_TRAIN),
        "runs": copy.deepcopy(runs) if runs is not None else {"0": {"description": "tiny"}},
    }
    config = deep_merge(config, sections)
    return validate_config(config, source="tests/conftest.py tiny config")


def make_tiny_run(data_root: str | Path, run_id: str = "0", *, train: dict | None = None,
                  model: dict | None = None, data: dict | None = None, **run_fields) -> dict:
    """The resolved settings of one tiny run as a dict, the form scripts take as --run-json.

    `train`/`model`/`data` and any other section given by name are the run's overrides.
    """
    run: dict = dict(run_fields)
    for name, section in (("train", train), ("model", model), ("data", data)):
        if section:
            run[name] = section
    config = make_tiny_config(data_root, runs={run_id: run})
    return resolve_run(config, run_id)


def make_tiny_settings(data_root: str | Path, run_id: str = "0", **kwargs) -> RunSettings:
    """The typed settings of one tiny run (arguments as make_tiny_run)."""
    return RunSettings.from_dict(make_tiny_run(data_root, run_id, **kwargs))


@pytest.fixture
def tiny_run(tiny_data):
    """Factory: tiny_run(run_id="0", train={...}, objective={...}) -> RunSettings of a run on `tiny_data`."""
    def factory(run_id: str = "0", **kwargs) -> RunSettings:
        return make_tiny_settings(tiny_data, run_id, **kwargs)
    return factory


@pytest.fixture
def tiny_config(tiny_data):
    """Factory: tiny_config(runs={...}, train={...}) -> validated config on `tiny_data`."""
    def factory(runs: dict | None = None, **sections) -> dict:
        return make_tiny_config(tiny_data, runs, **sections)
    return factory


@pytest.fixture(scope="module")
def one_thread():
    """A shared 2-core box: OpenMP spin-waits make multi-threaded steps far slower under load."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
