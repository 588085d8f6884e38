"""The results table: seeds aggregated, paired comparison with the same-start baseline."""
import json
import math

import pytest
from scipy import stats

from ttdl.report.summary import (
    experiment_row,
    paired_difference,
    text_help,
    text_help_markdown,
    text_role,
    write_tables,
    write_text_help_csv,
)


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


# ---- does text help? --------------------------------------------------------------

def test_paired_difference_matches_hand_computation_with_two_degrees_of_freedom():
    # differences (0.1, 0.1, 0): mean 1/15, sd 0.1/sqrt 3, standard error 0.1/3, t = 2 with 2 dof.
    # Student t with 2 dof: F(t) = 1/2 + t / (2 sqrt(t^2 + 2)), so the two-sided p = 1 - 2/sqrt 6 and the
    # 97.5 % quantile solves t / sqrt(t^2 + 2) = 0.95: t* = sqrt(2 * 0.95^2 / (1 - 0.95^2)) = 4.3027
    stat = paired_difference([0.5, 0.6, 0.7], [0.4, 0.5, 0.7])
    t_star = math.sqrt(2 * 0.95**2 / (1 - 0.95**2))
    assert t_star == pytest.approx(4.302653, rel=1e-6)
    assert stat["n"] == 3 and stat["delta_miou"] == pytest.approx(1 / 15)
    assert stat["t"] == pytest.approx(2.0)
    assert stat["p"] == pytest.approx(1 - 2 / math.sqrt(6), rel=1e-6)
    assert stat["ci_low"] == pytest.approx(1 / 15 - t_star * 0.1 / 3, rel=1e-6)
    assert stat["ci_high"] == pytest.approx(1 / 15 + t_star * 0.1 / 3, rel=1e-6)
    assert stat["note"] == ""


def test_paired_difference_with_one_degree_of_freedom_is_a_cauchy():
    # differences (0.3, 0.1): mean 0.2, sd 0.1 sqrt 2, se 0.1, t = 2 with 1 dof (Cauchy):
    # p = 1 - (2/pi) atan 2, the 97.5 % quantile tan(0.475 pi) = 12.706
    stat = paired_difference([0.8, 0.4], [0.5, 0.3])
    assert stat["delta_miou"] == pytest.approx(0.2) and stat["t"] == pytest.approx(2.0)
    assert stat["p"] == pytest.approx(1 - 2 / math.pi * math.atan(2.0), rel=1e-6)
    half = math.tan(0.475 * math.pi) * 0.1
    assert (stat["ci_low"], stat["ci_high"]) == (pytest.approx(0.2 - half), pytest.approx(0.2 + half))
    assert stat["ci_low"] < 0 < stat["ci_high"]  # two seeds are rarely enough


def test_paired_difference_without_a_test_says_why():
    one = paired_difference([0.5], [0.45])
    assert one["delta_miou"] == pytest.approx(0.05)
    assert one["p"] is None and one["ci_low"] is None and "1 seed" in one["note"] and "at least 2" in one["note"]
    flat = paired_difference([0.5, 0.6], [0.4, 0.5])
    assert flat["delta_miou"] == pytest.approx(0.1) and flat["p"] is None and "same difference" in flat["note"]
    with pytest.raises(ValueError, match="length"):
        paired_difference([0.1, 0.2], [0.1])


@pytest.mark.parametrize("objective, role", [
    ({"name": "none", "text": "describer"}, "ce"),
    ({"name": "grouped_siglip", "text": "describer", "shuffle_texts": False, "lambda": 0.2}, "matched"),
    ({"name": "grouped_siglip", "text": "describer", "shuffle_texts": True, "lambda": 0.2}, "shuffled"),
    ({"name": "grouped_siglip", "text": "class_name", "shuffle_texts": False, "lambda": 0.2}, "class_name"),
    ({"name": "grouped_siglip", "text": "onehot", "shuffle_texts": False, "lambda": 0.2}, "onehot"),
    ({"name": "grouped_siglip", "text": "describer", "shuffle_texts": False, "lambda": 0.0}, None),
    ({"name": "variable_siglip", "text": "synthetic", "shuffle_texts": False, "lambda": 0.5}, None),
    (None, None),
])
def test_text_role_comes_from_the_objective_settings(objective, role):
    assert text_role(objective) == role


def objective(**changes) -> dict:
    return {"name": "grouped_siglip", "text": "describer", "shuffle_texts": False, "lambda": 0.2} | changes


def arm(tmp_path, name, mious, obj, baseline="ce"):
    runs = [fake_run(tmp_path, f"{name}/s{i}", m) for i, m in enumerate(mious)]
    base = [str(tmp_path / f"ce/s{i}") for i in range(len(mious))]
    return {"experiment": name, "runs": runs, "baseline": baseline, "baseline_runs": base, "objective": obj}


@pytest.fixture
def privileged(tmp_path):
    """CE and four arms over 3 seeds, named so that no name gives a role away."""
    for i, m in enumerate([0.40, 0.50, 0.45]):
        fake_run(tmp_path, f"ce/s{i}", m)
    return [
        {"experiment": "ce", "runs": [str(tmp_path / f"ce/s{i}") for i in range(3)], "baseline": None,
         "baseline_runs": [], "objective": {"name": "none"}},
        arm(tmp_path, "a", [0.50, 0.60, 0.55], objective()),
        arm(tmp_path, "b", [0.40, 0.52, 0.44], objective(shuffle_texts=True)),
        arm(tmp_path, "c", [0.45, 0.50, 0.50], objective(text="class_name")),
        arm(tmp_path, "d", [0.42, 0.53, 0.45], objective(text="onehot")),
        arm(tmp_path, "other", [0.6, 0.6, 0.6], objective(name="xen_rescale", shuffle_texts=True)),
        arm(tmp_path, "zero", [0.4, 0.5, 0.45], objective(**{"lambda": 0.0})),
    ]


def test_text_help_compares_each_arm_with_ce_and_with_shuffled(privileged):
    rows = text_help(privileged)
    pairs = [(r["first"], r["second"]) for r in rows]
    assert pairs == [("a", "ce"), ("b", "ce"), ("c", "ce"), ("d", "ce"),  # every arm against CE
                     ("a", "b"), ("c", "b"), ("d", "b"),  # against shuffled
                     ("a", "c"), ("a", "d"),  # matched against the text-free controls
                     ("other", "ce")]  # another objective's shuffled control is its own family; lambda 0 is out
    first = rows[0]
    assert (first["first_role"], first["second_role"], first["n"]) == ("matched", "ce", 3)
    assert first["delta_miou"] == pytest.approx(0.1) and first["p"] is None  # (0.1, 0.1, 0.1): no spread
    a_vs_b = rows[4]
    assert a_vs_b["delta_miou"] == pytest.approx((0.10 + 0.08 + 0.11) / 3)
    assert a_vs_b["p"] == pytest.approx(stats.ttest_rel([0.50, 0.60, 0.55], [0.40, 0.52, 0.44]).pvalue)
    assert a_vs_b["miou_first"] == pytest.approx(0.55) and a_vs_b["ci_low"] < a_vs_b["delta_miou"]


def test_text_help_section_in_the_markdown_and_csv(privileged, tmp_path):
    rows = text_help(privileged)
    table = [experiment_row(e) for e in privileged]
    write_tables(table, tmp_path / "s.csv", tmp_path / "s.md", rows)
    write_text_help_csv(rows, tmp_path / "help.csv")
    md = (tmp_path / "s.md").read_text()
    assert "## Does text help?" in md and "### Baseline `ce` (CE only)" in md
    line = next(x for x in md.splitlines() if x.startswith("| matched text (`a`) | shuffled text (`b`) |"))
    assert "| 3 | 0.5500 | 0.4533 | +0.0967 | [" in line
    assert "every seed gives the same difference" in md  # a - ce has no spread: n/a with the reason
    assert (tmp_path / "s.csv").read_text().count("\n") == 1 + len(privileged)  # the table is unchanged
    help_csv = (tmp_path / "help.csv").read_text().splitlines()
    assert help_csv[0].startswith("baseline,first,first_role,second") and len(help_csv) == 1 + len(rows)


def test_text_help_with_one_seed_prints_n_a_with_the_reason(tmp_path):
    fake_run(tmp_path, "ce/s0", 0.4)
    rows = text_help([arm(tmp_path, "a", [0.5], objective()), arm(tmp_path, "b", [0.45], objective(text="onehot"))])
    assert [r["n"] for r in rows] == [1, 1, 1] and all(r["p"] is None for r in rows)
    md = text_help_markdown(rows)
    assert md.count("n/a: 1 seed; an interval and a test need at least 2") == 3
    assert "| +0.1000 | n/a |" in md
    assert "nothing to compare" in text_help_markdown([])


@pytest.mark.parametrize("standalone", [True, False], ids=["alone", "over-config.yaml"])
def test_the_privileged_config_gives_each_arm_its_role(standalone):
    """config/privileged.yaml, read alone (scripts' --config) or merged over config.yaml (as Snakemake does)."""
    import yaml

    from conftest import REPO
    from ttdl.core.config import load_config, resolve_run

    path = REPO / "config" / "privileged.yaml"
    config = (load_config(path) if standalone
              else load_config(REPO / "config" / "config.yaml", yaml.safe_load(path.read_text())))
    assert config["seeds"] == [0, 1, 2]
    runs = {r: resolve_run(config, r) for r in config["summary"]}
    roles = {r: text_role(s["objective"]) for r, s in runs.items()}
    assert sorted(roles.values(), key=str) == sorted(["ce", "ce", "matched", "shuffled", "class_name", "onehot"])
    arms = [r for r, role in roles.items() if role not in ("ce", None)]
    ce = next(r for r in roles if roles[r] == "ce" and runs[r]["init"])
    assert {runs[r]["baseline"] for r in arms} == {ce} and {runs[r]["init"] for r in arms + [ce]} == {"priv/base"}
    assert all(runs[r]["prefill"] for r in arms)
    machinery = {json.dumps({k: v for k, v in runs[r]["objective"].items() if k not in ("text", "shuffle_texts")},
                            sort_keys=True) for r in arms}
    assert len(machinery) == 1  # the arms differ only in their text
    assert {runs[r]["train"]["epochs"] for r in arms + [ce]} == {runs[ce]["train"]["epochs"]}
    for settings in runs.values():  # every run trains on box labels, with the packaged encoder
        assert settings["data"]["degrade_labels"]["kind"] == "box" and settings["encoder"]["adapted_by"] is None
    assert config["data"]["degrade_labels"]["kind"] == "none"  # the shared data (and rule make_data) stay clean
