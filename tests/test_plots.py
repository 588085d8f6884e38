"""Report figures: plots from tiny metrics/summary files, the qualitative panel, the report rules' captions."""
from __future__ import annotations

import csv
import re
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import REPO
from ttdl.report.plots import (
    PlotInputError,
    describer_activity,
    results_bars,
    summary_table_html,
    text_help_html,
    text_signals,
    training_curves,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_csv(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def assert_png(path: Path, min_w: int = 600, min_h: int = 300) -> tuple[int, int]:
    assert path.is_file(), f"{path} was not written"
    assert path.read_bytes()[:8] == PNG_MAGIC, f"{path} is not a PNG"
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        w, h = img.size
        extrema = img.convert("L").getextrema()
    assert w >= min_w and h >= min_h, f"{path} is only {w}x{h}"
    assert extrema[0] != extrema[1], f"{path} is a blank image"
    return w, h


def _draw(fn, source, out: Path) -> Path:
    """Call a plot function and return the PNG path it was asked to write."""
    fn(source, out)
    return out


def ce_rows(epochs: int, start: float = 1.5) -> list[dict]:
    return [{"epoch": e, "step": 10 * e, "train_ce": start / e, "train_loss": start / e, "lr": 0.001,
             "val_miou": 0.1 * e, "val_pixel_acc": 0.8, "wall_time_s": 5.0 * e} for e in range(1, epochs + 1)]


def text_rows(epochs: int, calls: int = 100) -> list[dict]:
    return [r | {"train_aux": 3.0 - 0.2 * r["epoch"], "describer_calls": calls // r["epoch"],
                 "cache_hit_rate": 0.3 + 0.1 * r["epoch"], "texts": 150}
            for r in ce_rows(epochs, start=0.4)]


@pytest.fixture
def runs(tmp_path) -> dict[str, Path]:
    """A CE run, a describer-text run, and a synthetic-text run (describer columns, zero calls)."""
    out = {"0": tmp_path / "results" / "0", "3.1": tmp_path / "results" / "3.1",
           "3.1/phase2": tmp_path / "results" / "3.1" / "phase2"}
    write_csv(out["0"] / "metrics.csv", ce_rows(6))
    write_csv(out["3.1"] / "metrics.csv", text_rows(3))
    write_csv(out["3.1/phase2"] / "metrics.csv", text_rows(3, calls=0))
    return out


def test_training_curves_writes_a_readable_png(runs, tmp_path):
    w, h = assert_png(_draw(training_curves, runs, tmp_path / "figs" / "curves.png"))
    assert w > h  # small multiples side by side


def test_training_curves_handles_runs_without_aux(runs, tmp_path):
    assert_png(_draw(training_curves, {"0": runs["0"]}, tmp_path / "ce_only.png"))


def test_training_curves_names_file_and_missing_column(runs, tmp_path):
    bad = write_csv(tmp_path / "bad" / "metrics.csv", [{k: v for k, v in r.items() if k != "val_miou"}
                                                        for r in ce_rows(2)])
    with pytest.raises(PlotInputError, match=r"val_miou") as info:
        training_curves(runs | {"bad": bad.parent}, tmp_path / "x.png")
    assert str(bad) in str(info.value)
    assert not (tmp_path / "x.png").exists()


def test_training_curves_missing_metrics_file(tmp_path):
    with pytest.raises(PlotInputError, match="not found"):
        training_curves({"ghost": tmp_path / "ghost"}, tmp_path / "x.png")
    with pytest.raises(PlotInputError, match="no runs"):
        training_curves({}, tmp_path / "x.png")


def test_describer_activity_with_and_without_text_runs(runs, tmp_path):
    assert_png(_draw(describer_activity, runs, tmp_path / "describer.png"))
    # no run has describer columns: a panel that says so, not a crash
    assert_png(_draw(describer_activity, {"0": runs["0"]}, tmp_path / "none.png"), min_w=400, min_h=200)


@pytest.mark.parametrize("columns", ["current", "seeds"])
def test_results_bars_both_table_formats(tmp_path, columns):
    if columns == "current":
        rows = [{"run_id": "0", "init": "", "miou": 0.69}, {"run_id": "3.1", "init": "3.1/phase2", "miou": 0.56}]
    else:
        rows = [{"experiment": "0", "seeds": 3, "miou": 0.69, "miou_std": 0.01},
                {"experiment": "3.1", "seeds": 1, "miou": 0.56, "miou_std": ""}]
    summary = write_csv(tmp_path / "summary.csv", rows)
    assert_png(_draw(results_bars, summary, tmp_path / "results.png"), min_w=600, min_h=150)


def test_results_bars_prefers_miou_mean(tmp_path):
    summary = write_csv(tmp_path / "summary.csv", [{"experiment": "0", "miou_mean": 0.5, "miou_std": 0.02}])
    assert_png(_draw(results_bars, summary, tmp_path / "results.png"), min_w=600, min_h=100)


def test_results_bars_missing_miou_column(tmp_path):
    summary = write_csv(tmp_path / "summary.csv", [{"experiment": "0", "pixel_acc": 0.9}])
    with pytest.raises(PlotInputError, match=r"summary.csv: missing column 'miou_mean' or 'miou'"):
        results_bars(summary, tmp_path / "results.png")


def test_summary_table_html_keeps_run_ids_as_text(tmp_path):
    summary = write_csv(tmp_path / "summary.csv", [
        {"experiment": "3.1", "seeds": 1, "miou": 0.56481, "miou_std": "", "epochs": 4.0, "description": "B||dT <x>"}])
    out = tmp_path / "table.html"
    summary_table_html(summary, out, {"miou": "val mIoU"})
    page = out.read_text()
    assert "<td>3.1</td>" in page and "<td>0.5648</td>" in page and "<td>4</td>" in page
    assert "<th>val mIoU</th>" in page and "&lt;x&gt;" in page


def test_figures_cli_labels_runs_relative_to_results(runs, tmp_path, monkeypatch):
    import figures

    assert figures.run_label(str(runs["3.1/phase2"]), str(tmp_path / "results")) == "3.1/phase2"
    summary = write_csv(tmp_path / "results" / "summary.csv", [{"experiment": "0", "miou": 0.6}])
    out = tmp_path / "results" / "figures"
    monkeypatch.setattr(sys, "argv", ["figures.py", "--runs", *map(str, runs.values()), "--results-root",
                                      str(tmp_path / "results"), "--summary", str(summary), "--out-dir", str(out)])
    figures.main()
    for name in ("curves", "describer", "results", "text_signals"):
        assert_png(out / f"{name}.png", min_w=400, min_h=100)


def signal_rows(epochs: int, staleness: bool) -> list[dict]:
    stale = (lambda e: {"staleness_iou": 1.0 - 0.1 * e}) if staleness else (lambda e: {})
    return [r | {"grad_ratio_aux_ce": 0.05 * r["epoch"]} | stale(r["epoch"]) for r in text_rows(epochs)]


def test_text_signals_plots_ratio_and_staleness_and_skips_runs_without_them(runs, tmp_path):
    write_csv(tmp_path / "results" / "m" / "metrics.csv", signal_rows(3, staleness=True))
    write_csv(tmp_path / "results" / "s" / "metrics.csv", signal_rows(4, staleness=False))
    both = runs | {"m": tmp_path / "results" / "m", "s": tmp_path / "results" / "s"}
    w, h = assert_png(_draw(text_signals, both, tmp_path / "signals.png"))
    assert w > h
    # CE-only and older text runs lack both columns: each panel says there is nothing to draw
    assert_png(_draw(text_signals, {"0": runs["0"], "3.1": runs["3.1"]}, tmp_path / "none.png"))
    with pytest.raises(PlotInputError, match="no runs"):
        text_signals({}, tmp_path / "empty.png")
    with pytest.raises(PlotInputError, match="file not found"):
        text_signals({"x": tmp_path / "nowhere"}, tmp_path / "x.png")


def test_text_signals_draws_only_runs_with_the_column(runs, tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    write_csv(tmp_path / "results" / "m" / "metrics.csv", signal_rows(3, staleness=True))
    write_csv(tmp_path / "results" / "s" / "metrics.csv", signal_rows(4, staleness=False))
    drawn: list[tuple[str, list]] = []
    plot = Axes.plot

    def spy(self, xs, ys, *args, **kwargs):
        drawn.append((kwargs.get("label"), list(ys)))
        return plot(self, xs, ys, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", spy)
    text_signals({"0": runs["0"], "m": tmp_path / "results" / "m", "s": tmp_path / "results" / "s"},
                 tmp_path / "signals.png")
    assert [label for label, _ in drawn] == ["m", "s", "m"]  # ratio: m and s; staleness: only m; CE run: none
    assert drawn[1][1] == pytest.approx([0.05, 0.10, 0.15, 0.20]) and drawn[2][1] == pytest.approx([0.9, 0.8, 0.7])


def test_summary_table_html_ends_with_the_text_help_table(tmp_path):
    summary = write_csv(tmp_path / "summary.csv", [{"experiment": "a", "miou": 0.5}])
    help_csv = write_csv(tmp_path / "text_help.csv", [
        {"baseline": "ce", "first": "a", "first_role": "matched", "second": "ce", "second_role": "ce", "n": 3,
         "miou_first": 0.55, "miou_second": 0.45, "delta_miou": 0.1, "ci_low": 0.02, "ci_high": 0.18, "p": 0.031,
         "note": ""},
        {"baseline": "ce", "first": "a", "first_role": "matched", "second": "<b>", "second_role": "shuffled",
         "n": 1, "miou_first": 0.55, "miou_second": 0.5, "delta_miou": 0.05, "ci_low": "", "ci_high": "", "p": "",
         "note": "n/a: 1 seed; an interval and a test need at least 2"}])
    out = tmp_path / "table.html"
    summary_table_html(summary, out, text_help_csv=help_csv)
    page = out.read_text()
    assert page.index("<td>a</td>") < page.index("<h2>Does text help?</h2>")
    assert "<td>matched text (a)</td><td>CE only (ce)</td><td>3</td>" in page
    assert "<td>+0.1000</td><td>[+0.0200, +0.1800]</td><td>0.0310</td>" in page
    assert "shuffled text (&lt;b&gt;)" in page and "<td>n/a</td><td>n/a: 1 seed" in page
    summary_table_html(summary, out)  # without the comparisons: the results table alone
    assert "Does text help?" not in out.read_text()
    empty = write_csv(tmp_path / "empty.csv", [{c: "" for c in ("baseline", "first", "second", "delta_miou",
                                                                 "ci_low", "ci_high", "p")}])
    empty.write_text(empty.read_text().splitlines()[0] + "\n")
    assert "n/a: no experiment" in text_help_html(empty)


def test_pick_samples_skips_background_only_images():
    import torch

    from ttdl.jobs.qualitative import pick_samples

    def sample(uid, value):
        mask = torch.zeros(4, 4, dtype=torch.long)
        mask[0, 0] = value
        return {"uid": uid, "mask": mask}

    dataset = [sample("bg", 0), sample("void", 255), sample("a", 2), sample("b", 1), sample("c", 3)]
    assert [s["uid"] for s in pick_samples(dataset, 2, 255)] == ["a", "b"]
    with pytest.raises(ValueError, match="non-background"):
        pick_samples(dataset[:2], 2, 255)


def test_qualitative_panel_on_tiny_data(tiny_config, tiny_data, tmp_path, one_thread):
    import torch

    from ttdl.core import provenance
    from ttdl.core.config import resolve_run
    from ttdl.core.data import read_class_names
    from ttdl.core.io import save_torch
    from ttdl.core.models import build_model
    from ttdl.core.settings import RunSettings
    from ttdl.jobs.qualitative import qualitative_panel

    config = tiny_config(runs={"0": {"description": "start"},
                               "ft": {"init": "0", "objective": {"name": "variable_siglip"}}})
    run = RunSettings.from_dict(resolve_run(config, "ft"))
    class_names = read_class_names(tiny_data, None)
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = build_model(run.model.name, len(class_names))
        paths.append(tmp_path / f"w{seed}.pth")
        save_torch(paths[-1], {"model": model.state_dict(),
                               "provenance": provenance.for_checkpoint(run.data, class_names)})
    out = tmp_path / "qual" / "ft.png"
    rows = qualitative_panel(run, str(paths[0]), str(paths[1]), out, k=2)
    assert_png(out, min_w=1000, min_h=500)
    val = (tiny_data / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    assert len(rows) == 2 and all(r.uid in val for r in rows)
    for row in rows:
        assert ((row.gt != 0) & (row.gt != 255)).any()
        assert row.image.shape == (*row.gt.shape, 3) and row.before.shape == row.gt.shape
        for entries in (row.text_before, row.text_after):
            assert entries and all(name in class_names and len(text) > 10 for name, text in entries)


def test_report_rules_point_at_existing_captions():
    rules = (REPO / "workflow" / "rules" / "report.smk").read_text()
    captions = re.findall(r'caption="([^"]+)"', rules)
    assert len(captions) >= 5
    for caption in captions:
        assert (REPO / "workflow" / "rules" / caption).resolve().is_file(), caption
    assert (REPO / "workflow" / "report" / "workflow.rst").is_file()
