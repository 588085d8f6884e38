"""The results table: seeds aggregated, paired comparison with the same-start baseline."""
import json
import math

import pytest

from ttdl.report.summary import experiment_row, write_tables


def fake_run(root, name, miou, **extra):
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "eval.json").write_text(json.dumps({"miou": miou, "pixel_acc": 0.9}))
    summary = {"epochs": 4, "wall_time_s": 10.0, "init": "good_ckp", "description": name} | extra
    (folder / "summary.json").write_text(json.dumps(summary))
    return str(folder)


def test_mean_std_and_paired_test_match_hand_computation(tmp_path):
    runs = [fake_run(tmp_path, f"x{i}", m, describer_calls=10 * (i + 1), cache_hit_rate=0.5)
            for i, m in enumerate([0.5, 0.6, 0.7])]
    base = [fake_run(tmp_path, f"b{i}", m) for i, m in enumerate([0.4, 0.5, 0.7])]
    row = experiment_row({"experiment": "x", "runs": runs, "baseline": "b", "baseline_runs": base})
    assert row["seeds"] == 3
    assert row["miou"] == pytest.approx(0.6)
    assert row["miou_std"] == pytest.approx(0.1)
    assert row["delta_miou"] == pytest.approx(0.2 / 3)
    # deltas (0.1, 0.1, 0): t = mean / (sd / sqrt 3) = 2 with 2 dof; two-sided p = 1 - 2/sqrt(6)
    assert row["delta_p"] == pytest.approx(1 - 2 / math.sqrt(6), rel=1e-6)
    assert row["describer_calls"] == pytest.approx(20)


def test_single_seed_has_no_std_and_no_p(tmp_path):
    row = experiment_row({"experiment": "x", "runs": [fake_run(tmp_path, "x", 0.5)], "baseline": "b",
                          "baseline_runs": [fake_run(tmp_path, "b", 0.45)]})
    assert row["miou_std"] is None and row["delta_p"] is None
    assert row["delta_miou"] == pytest.approx(0.05)


def test_tables_have_one_row_per_experiment(tmp_path):
    rows = [experiment_row({"experiment": e, "runs": [fake_run(tmp_path, e, 0.5)]}) for e in ("0", "3.3")]
    write_tables(rows, tmp_path / "s.csv", tmp_path / "s.md")
    md = (tmp_path / "s.md").read_text().splitlines()
    assert sum(line.startswith("| 0 |") or line.startswith("| 3.3 |") for line in md) == 2
    assert (tmp_path / "s.csv").read_text().count("\n") == 3
