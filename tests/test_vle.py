"""vle/2 (GT_PR||dT): triples from a checkpoint -> a ConcatAdapter that the 4.x heads load."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from ttdl.core.io import save_torch
from ttdl.core.settings import AdaptationJob, AdaptationSettings, ObjectiveSettings
from ttdl.jobs.encoder_adaptation import (
    ADAPTATIONS,
    collect_overlay_triples,
    collect_pairs,
    run_adaptation_job,
    run_concat_adaptation,
    train_concat_adapter,
)
from ttdl.jobs.train import Trainer
from ttdl.text.adapters import ConcatAdapter
from ttdl.text.heads import HEADS, HeadContext

pytestmark = pytest.mark.usefixtures("one_thread")

ADAPT = {"init": "v", "kind": "concat", "max_pairs": 24, "epochs": 2, "batch_size": 8, "lr": 1e-3,
         "val_fraction": 0.25, "seed": 0}


@pytest.fixture
def vle_run(tiny_run, tmp_path):
    """A tiny vle/2 adaptation job and a randomly initialised checkpoint of its init run."""
    run = tiny_run("v", describer={"image_size": 48})
    trainer = Trainer(run, tmp_path / "init", log=lambda *_: None)
    weights = tmp_path / "w.pth"
    save_torch(weights, {"model": trainer.model.state_dict()})
    return AdaptationJob("vle/2", AdaptationSettings.from_partial(ADAPT), run), str(weights)


def test_vle2_writes_adapter_and_metrics(vle_run, tmp_path):
    job, weights = vle_run
    lines: list[str] = []
    metrics = run_concat_adaptation(job, weights, tmp_path / "vle2", log=lines.append)
    assert lines[0].startswith("collected") and len(lines) == 1 + ADAPT["epochs"]
    assert metrics["pairs"] <= ADAPT["max_pairs"] and metrics["n_val"] + metrics["n_train"] == metrics["pairs"]
    on_disk = json.loads((tmp_path / "vle2" / "metrics.json").read_text())
    assert on_disk["after"] == metrics["after"]
    for key in ("before", "after", "gt_only", "pr_only"):
        assert {"i2t_top1", "t2i_top1", "chance", "chance_expected"} <= set(on_disk[key])
        assert on_disk[key]["chance"] == pytest.approx(1 / metrics["n_val"])
    assert len(on_disk["train_loss"]) == ADAPT["epochs"]
    adapter = ConcatAdapter.from_file(tmp_path / "vle2" / "concat_adapter.pt")
    assert adapter.dim == 384 and adapter.meta["encoder"] == "minilm-vit"
    assert not torch.equal(adapter.linear.weight, ConcatAdapter(384).linear.weight)  # it was trained
    # the 4.x heads accept what vle/2 wrote
    context = HeadContext(text_dim=384, bottleneck_dim=960, encoder=SimpleNamespace(embed_dim=384),
                          class_names=["background", "thing"], negatives_seed=0,
                          concat_adapter_path=str(tmp_path / "vle2" / "concat_adapter.pt"))
    head = HEADS["pr_fusion"](ObjectiveSettings.from_partial({"name": "pr_fusion"}), context)
    assert torch.equal(head.concat[0].linear.weight, adapter.linear.weight)


def test_triples_and_pairs_share_one_collection(vle_run):
    job, weights = vle_run
    run = job.run
    gt, pr, texts = collect_overlay_triples(run, weights, 6)
    diff, texts_v1 = collect_pairs(run, weights, 6)
    assert texts == texts_v1 and len(texts) == 6
    assert gt.shape == pr.shape == diff.shape == (6, 3, 48, 48)
    assert not torch.equal(gt, pr)  # an untrained model's masks differ from the GT
    assert torch.equal(diff[0], collect_pairs(run, weights, 1)[0][0])  # deterministic, same order


def test_concat_adapter_learns_which_overlay_matters():
    """Texts determined by the PR half only: training must beat the untrained mean-of-both adapter."""
    g = torch.Generator().manual_seed(0)
    n, dim, k = 96, 16, 6
    txt_vocab = torch.nn.functional.normalize(torch.randn(k, dim, generator=g), dim=-1)
    labels = torch.arange(n) % k
    pr = torch.nn.functional.normalize(txt_vocab[labels] + 0.3 * torch.randn(n, dim, generator=g), dim=-1)
    gt = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=-1)  # pure distraction
    texts = [f"text {int(c)}" for c in labels]
    _, m = train_concat_adapter(gt, pr, txt_vocab[labels], texts, epochs=30, batch_size=12, lr=1e-2,
                                val_fraction=0.25, seed=0, init_scale=2.3, init_bias=-10.0)
    assert m["after"]["i2t_top1"] >= 0.9 and m["after"]["i2t_top1"] > m["before"]["i2t_top1"] + 0.1, m
    assert m["train_loss"][-1] < m["train_loss"][0]


def test_adaptation_kinds_dispatch_to_their_jobs(vle_run, tmp_path):
    job, weights = vle_run
    assert ADAPTATIONS["concat"] is run_concat_adaptation
    with pytest.raises(ValueError, match="kind concat only"):  # vle/1 adapts the configured encoder
        run_adaptation_job(job.replace(adaptation=job.adaptation.replace(kind="encoder")), weights,
                           tmp_path, encoder_path="some/encoder.pt")
