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
    run_adaptation,
    run_adaptation_job,
    run_concat_adaptation,
    train_concat_adapter,
)
from ttdl.jobs.train import Trainer
from ttdl.text.adaptation import METADATA_KEY, check_adaptation, retrieval_summary
from ttdl.text.adapters import ConcatAdapter
from ttdl.text.encoders import build_encoder
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
    save_torch(weights, {"model": trainer.model.state_dict(), "provenance": trainer.provenance})
    return AdaptationJob("vle/2", AdaptationSettings.from_partial(ADAPT), run), str(weights)


def test_vle2_writes_adapter_and_metrics(vle_run, tmp_path):
    job, weights = vle_run
    lines: list[str] = []
    metrics = run_concat_adaptation(job, weights, tmp_path / "vle2", log=lines.append)
    assert lines[0].startswith("collected") and sum(line.startswith("epoch") for line in lines) == ADAPT["epochs"]
    assert any(line.startswith("after: held-out top-1") for line in lines)
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
    # the file states what the adapter was trained on, and the scale/bias it learned
    assert (adapter.input_norm, adapter.output_norm) == ("l2", "l2")
    assert (adapter.logit_scale, adapter.logit_bias) == (on_disk["logit_scale"], on_disk["logit_bias"])
    assert on_disk["logit_bias"] != on_disk["logit_bias_before"]  # bias learns at its own rate
    assert adapter.meta["after"] == on_disk["after"]
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
    after, before = m["retrieval"]["mean_top1"], retrieval_summary(m["before"])["mean_top1"]
    assert after >= 0.9 and after > before + 0.1, m
    assert m["train_loss"][-1] < m["train_loss"][0]


def test_adaptation_kinds_dispatch_to_their_jobs(vle_run, tmp_path):
    job, weights = vle_run
    assert ADAPTATIONS["concat"] is run_concat_adaptation
    with pytest.raises(ValueError, match="kind concat only"):  # vle/1 adapts the configured encoder
        run_adaptation_job(job.replace(adaptation=job.adaptation.replace(kind="encoder")), weights,
                           tmp_path, encoder_path="some/encoder.pt")


def test_vle1_writes_encoder_with_held_out_metrics_that_check_adaptation_reads(vle_run, tmp_path):
    job, weights = vle_run
    job = job.replace(adaptation=job.adaptation.replace(kind="encoder"))
    lines: list[str] = []
    metrics = run_adaptation(job, weights, tmp_path / "vle1", log=lines.append)
    assert any(line.startswith("image tower random init: trained") for line in lines)
    assert any(line.startswith("after: held-out top-1 i2t") and "x chance" in line for line in lines)
    assert any("logit scale 2.303 ->" in line and "text mean cosine" in line for line in lines)
    on_disk = json.loads((tmp_path / "vle1" / "metrics.json").read_text())
    for key in ("logit_scale_before", "logit_bias_before", "logit_scale", "logit_bias", "retrieval"):
        assert on_disk[key] == metrics[key]
    blob = torch.load(tmp_path / "vle1" / "encoder.pt", weights_only=True)
    meta = blob[METADATA_KEY]
    assert meta["after"] == on_disk["after"] and meta["n_val"] == metrics["n_val"]
    assert meta["logit_bias"] == pytest.approx(float(blob["logit_bias"]))
    ok, reason = check_adaptation(tmp_path / "vle1" / "encoder.pt", 2.0)
    assert ok == (metrics["retrieval"]["over_chance"] >= 2.0) and f"n_val {metrics['n_val']}" in reason
    # the adapted encoder still loads as one (the metadata is an extra key)
    encoder = build_encoder(job.run.encoder, adapted_path=str(tmp_path / "vle1" / "encoder.pt"))
    assert float(encoder.logit_bias.detach()) == pytest.approx(metrics["logit_bias"])


def test_concat_adapter_fuse_is_what_it_was_trained_on():
    torch.manual_seed(0)
    adapter = ConcatAdapter(6)
    with torch.no_grad():
        adapter.linear.weight.add_(0.3 * torch.randn_like(adapter.linear.weight))
    a, b = 5 * torch.randn(4, 6), torch.randn(4, 6)  # a: an unnormalised feature such as mlp(GAP(B))
    unit = torch.nn.functional.normalize
    expected = unit(adapter(unit(a, dim=-1), unit(b, dim=-1)), dim=-1)
    assert torch.allclose(adapter.fuse(a, b), expected, atol=1e-6)
    assert torch.allclose(adapter.fuse(3 * a, b), adapter.fuse(a, b), atol=1e-6)  # scale of a no longer matters
    pa, pb = adapter.prepare(a, b)
    assert torch.allclose(pa.norm(dim=-1), torch.ones(4)) and torch.allclose(pb.norm(dim=-1), torch.ones(4))
    assert (adapter.logit_scale, adapter.logit_bias) == pytest.approx((2.302585, -10.0))  # untrained: SigLIP init
    with pytest.raises(ValueError, match="input_norm"):
        ConcatAdapter(6, input_norm="batch")


def test_concat_adapter_file_round_trips_its_contract_and_reads_format_1(tmp_path):
    adapter = ConcatAdapter(4, logit_scale=2.7, logit_bias=-8.5)
    adapter.save(tmp_path / "c.pt", encoder="minilm-vit")
    raw = torch.load(tmp_path / "c.pt", weights_only=True)
    assert raw["format"] == "ttdl-concat-adapter/2"
    assert (raw["input_norm"], raw["output_norm"], raw["logit_scale"], raw["logit_bias"]) == ("l2", "l2", 2.7, -8.5)
    loaded = ConcatAdapter.from_file(tmp_path / "c.pt")
    assert (loaded.input_norm, loaded.output_norm, loaded.logit_scale, loaded.logit_bias) == ("l2", "l2", 2.7, -8.5)
    # a file of the first format: vle/2 trained it on unit inputs and kept scale/bias in meta
    save_torch(tmp_path / "v1.pt", {"format": "ttdl-concat-adapter/1", "dim": 4, "state_dict": raw["state_dict"],
                                    "meta": {"logit_scale": 2.5, "logit_bias": -9.0}})
    old = ConcatAdapter.from_file(tmp_path / "v1.pt")
    assert (old.input_norm, old.output_norm, old.logit_scale, old.logit_bias) == ("l2", "l2", 2.5, -9.0)
