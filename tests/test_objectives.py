"""The text branch inside the training loop: describer -> cache -> encoder -> aux loss."""
from __future__ import annotations

import math
import socket

import pytest
import torch

from ttdl.core.io import load_torch, save_torch
from ttdl.core.provenance import ProvenanceError
from ttdl.jobs.prefill import prefill_cache
from ttdl.jobs.train import Trainer
from ttdl.text.describers import DescriberError
from ttdl.text.objectives import UnusableAnswersError
from ttdl.text.text_sources import Counters
from ttdl.text.textbatch import split_key

TEXT = {"describer": {"image_size": 48}}


def first_batch(trainer: Trainer) -> dict:
    return next(iter(trainer.epoch_loader(0)))


def text_trainer(tiny_run, tmp_path, objective: dict, lr: float = 1e-3, **sections) -> Trainer:
    run = tiny_run("t", objective=objective, train={"lr": lr}, **(TEXT | sections))
    return Trainer(run, tmp_path / "out", log=lambda *_: None)


def test_grouped_siglip_step_describes_then_reuses(tiny_run, tmp_path):
    # a vanishing lr keeps the predicted masks identical between the two steps
    trainer = text_trainer(tiny_run, tmp_path, {"name": "grouped_siglip", "lambda": 0.2, "lambda_mode": "fixed",
                                                "head_warmup_steps": 0}, lr=1e-12)
    batch = first_batch(trainer)
    first = trainer.train_step(batch)
    pairs = first["text/texts"]
    assert pairs > 0 and first["text/describer_calls"] == pairs  # unseen keys are all described
    assert math.isfinite(first["aux"]) and first["aux"] > 0
    assert first["loss"] == pytest.approx(0.8 * first["ce"] + 0.2 * first["aux"], rel=1e-5)
    second = trainer.train_step(batch)
    assert second["text/describer_calls"] == 0  # unchanged masks are never re-described
    assert second["text/texts"] == pairs  # ... and their cached text is reused
    assert second["text/cache_hit_rate"] == 1.0


def test_original_cache_mode_redescribes_unchanged_masks(tiny_run, tmp_path):
    trainer = text_trainer(tiny_run, tmp_path, {"name": "grouped_siglip"}, lr=1e-12, cache={"mode": "original"})
    batch = first_batch(trainer)
    first = trainer.train_step(batch)
    second = trainer.train_step(batch)
    # the original's tie flaw: all IoUs are 1, the 0.4-quantile is 1, everything is described again
    assert second["text/describer_calls"] == first["text/describer_calls"] > 0


def test_unreachable_describer_server_stops_training(tiny_run, tmp_path):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    describer = {"image_size": 48, "backend": "openai", "base_url": f"http://127.0.0.1:{port}/v1",
                 "model": "none", "retries": 1, "backoff_s": 0.0, "timeout_s": 2}
    run = tiny_run("t", objective={"name": "grouped_siglip"}, describer=describer)
    trainer = Trainer(run, tmp_path / "out", log=lambda *_: None)
    with pytest.raises(DescriberError, match=f"127.0.0.1:{port}"):
        trainer.train_step(first_batch(trainer))


def test_malformed_answers_are_counted_and_skipped(tiny_run, tmp_path):
    trainer = text_trainer(tiny_run, tmp_path, {"name": "grouped_siglip"})
    describer = trainer.objective.describer
    real = describer.describe
    describer.describe = lambda requests: [None if i % 2 else text for i, text in enumerate(real(requests))]
    logs = trainer.train_step(first_batch(trainer))
    calls = logs["text/describer_calls"]
    assert logs["text/malformed"] == calls // 2
    assert logs["text/texts"] == calls - calls // 2


def test_xen_rescale_value_equals_ce(tiny_run, tmp_path):
    trainer = text_trainer(tiny_run, tmp_path, {"name": "xen_rescale", "lambda": 1.0})
    logs = trainer.train_step(first_batch(trainer))
    assert logs["text/texts"] > 0
    assert logs["aux"] == pytest.approx(logs["ce"], rel=1e-4)  # only the gradient is re-weighted
    assert logs["loss"] == pytest.approx(logs["aux"], rel=1e-6)


def test_synthetic_text_needs_no_describer(tiny_run, tmp_path):
    trainer = text_trainer(tiny_run, tmp_path, {"name": "variable_siglip", "text": "synthetic"})
    logs = trainer.train_step(first_batch(trainer))
    assert logs["text/describer_calls"] == 0 and logs["text/texts"] > 0
    assert trainer.objective.cache is None


def test_text_run_saves_cache_and_aux_head(tiny_run, tmp_path):
    trainer = text_trainer(tiny_run, tmp_path, {"name": "variable_siglip"})
    summary = trainer.fit()
    assert summary["describer_calls"] > 0 and 0.0 <= summary["cache_hit_rate"] <= 1.0
    weights = load_torch(tmp_path / "out" / "weights.pth")
    assert weights["aux_head"]["mlp.weight"].shape == (960, trainer.objective.encoder[0].embed_dim)
    cache = load_torch(tmp_path / "out" / "cache" / "cache.pt")
    assert len(cache["keys"]) > 0


def test_prefill_records_every_significant_pair_without_text(tiny_run, tmp_path):
    run = tiny_run("t", objective={"name": "grouped_siglip"}, **TEXT)
    trainer = Trainer(run, tmp_path / "out", log=lambda *_: None)
    save_torch(tmp_path / "w.pth", {"model": trainer.model.state_dict(), "provenance": trainer.provenance})
    info = prefill_cache(run, str(tmp_path / "w.pth"), tmp_path / "prefill.pt")
    state = load_torch(tmp_path / "prefill.pt")
    assert info["keys"] == len(state["keys"]) >= len(trainer.train_set)  # at least one class per image
    assert state["texts"] == {}  # no describer calls
    uids = {split_key(key)[0] for key in state["keys"]}
    assert uids == set(trainer.train_set.uids)
    # a finetune that starts from this cache knows every key already
    warm = Trainer(run, tmp_path / "warm", cache_path=str(tmp_path / "prefill.pt"), log=lambda *_: None)
    assert len(warm.objective.cache) == info["keys"]
    assert all(key in warm.objective.cache for key in state["keys"])


def test_shuffled_control_moves_every_text_to_another_pair():
    from ttdl.text.objectives import TextItems, shuffle_texts

    items = TextItems([0, 1, 2, 3], ["a", "b", "c", "d"], [True] * 4)
    moved = shuffle_texts(items, torch.Generator().manual_seed(0))
    assert sorted(moved.texts) == ["a", "b", "c", "d"]
    assert all(new != old for new, old in zip(moved.texts, items.texts))
    assert moved.positions == items.positions


def test_class_name_control_and_lambda0_is_ce(tiny_run, tmp_path):
    trainer = text_trainer(tiny_run, tmp_path, {"name": "grouped_siglip", "text": "class_name", "lambda": 0.0,
                                                "lambda_mode": "fixed", "head_warmup_steps": 0})
    logs = trainer.train_step(first_batch(trainer))
    assert logs["text/texts"] > 0
    assert logs["loss"] == pytest.approx(logs["ce"], rel=1e-6)  # lambda 0: the aux term carries no weight


@pytest.mark.parametrize("control", [{"text": "class_name"}, {"text": "onehot"}, {"shuffle_texts": True}])
def test_controls_put_text_on_the_matched_runs_positions(tiny_run, tmp_path, control):
    """Same start, same batch: a control's texts sit on exactly the pairs the matched run's texts do."""
    def step_items(objective):
        trainer = text_trainer(tiny_run, tmp_path / str(len(objective)), {"name": "grouped_siglip", **objective})
        batch = first_batch(trainer)
        with torch.no_grad():
            logits, _ = trainer.model(batch["image"])
        obj = trainer.objective
        tb = obj._text_batch(batch, batch["image"], batch["mask"], logits.argmax(1))
        return tb, obj.source(tb, Counters())

    tb, matched = step_items({})
    _, other = step_items(control)
    assert matched.positions and other.positions == matched.positions
    if "text" in control:
        assert all(a != b for a, b in zip(other.texts, matched.texts))
    if control.get("text") == "onehot":
        assert all(code.startswith("kind=") for code in other.texts)


def test_onehot_control_trains_on_code_vectors(tiny_run, tmp_path):
    trainer = text_trainer(tiny_run, tmp_path, {"name": "grouped_siglip", "text": "onehot", "head_warmup_steps": 0})
    from ttdl.text.diagnosis_code import code_dim

    assert trainer.objective.head.mlp.in_features == code_dim(trainer.num_classes)
    logs = trainer.train_step(first_batch(trainer))
    assert logs["text/texts"] > 0 and math.isfinite(logs["aux"]) and logs["aux"] > 0


def test_grad_ratio_lambda_and_gradient_logs(tiny_run, tmp_path):
    """After the head warm-up, every k steps: lambda re-set to the target ratio and the measures logged."""
    trainer = text_trainer(tiny_run, tmp_path, {"name": "grouped_siglip", "head_warmup_steps": 1,
                                                "grad_log_every": 1, "target_grad_ratio": 0.25})
    batches = iter(trainer.epoch_loader(0))
    warm = trainer.train_step(next(batches))
    assert "text/grad_ratio_aux_ce" not in warm  # warm-up: B detached, nothing to balance
    logs = trainer.train_step(next(batches))
    assert logs["text/grad_ratio_aux_ce"] == pytest.approx(0.25, rel=1e-4)
    assert -1 <= logs["text/grad_cos_aux_ce"] <= 1 and 0 < logs["text/lambda"] <= 0.9
    assert trainer.objective.end_epoch()["grad_ratio_aux_ce"] == pytest.approx(0.25, rel=1e-4)


def test_warmup_keeps_the_aux_gradient_out_of_the_segmenter(tiny_run, tmp_path):
    trainer = text_trainer(tiny_run, tmp_path, {"name": "grouped_siglip", "head_warmup_steps": 5,
                                                "lambda_mode": "fixed", "lambda": 0.5})
    batch = first_batch(trainer)
    images, masks = batch["image"], batch["mask"]
    from ttdl.text.objectives import StepTensors

    logits, bottleneck = trainer.model(images)
    zero_ce = logits.sum() * 0
    valid = masks != 255
    step = StepTensors(batch, images, masks, logits, bottleneck, zero_ce.expand(masks.shape), valid, zero_ce)
    loss, logs = trainer.objective(step)
    assert logs["text/texts"] > 0
    loss.backward()  # CE is a zero here: any backbone gradient would come from the aux loss
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in trainer.model.shared_parameters())
    assert trainer.objective.head.mlp.weight.grad.abs().sum() > 0


def test_contrastive_validation_goes_through_its_own_cache(tiny_run, tmp_path):
    trainer = text_trainer(tiny_run, tmp_path, {"name": "grouped_siglip", "contrastive_validation": True}, lr=1e-12)
    first = trainer.validate()["text"]
    assert first["val_describer_calls"] > 0 and math.isfinite(first["val_aux"])
    second = trainer.validate()["text"]  # the model did not change: every val mask is cached
    assert second["val_describer_calls"] == 0 and second["val_cache_hit_rate"] == 1.0
    assert second["val_aux"] == pytest.approx(first["val_aux"], rel=1e-5)
    assert len(trainer.objective.cache) == 0  # the training cache is untouched


@pytest.mark.parametrize("objective", [
    {"name": "paired_negatives", "negatives": 2},
    {"name": "bottleneck_adapter", "mix": "additive", "embedding_norm": "l2", "detach_bottleneck": True},
    {"name": "bottleneck_adapter", "adapter": "attn_pool"},
])
def test_issue4_heads_train_through_the_loop(tiny_run, tmp_path, objective):
    trainer = text_trainer(tiny_run, tmp_path, objective)
    logs = trainer.train_step(first_batch(trainer))
    assert logs["text/texts"] > 0 and math.isfinite(logs["aux"]) and logs["aux"] > 0


def test_pr_fusion_head_needs_the_vle2_adapter(tiny_run, tmp_path):
    with pytest.raises(ValueError, match="vle/2"):
        text_trainer(tiny_run, tmp_path, {"name": "pr_fusion"})


def test_unusable_answers_stop_the_run_naming_the_setting(tiny_run, tmp_path):
    """A server that only answers garbage must not turn a text run into a silently scaled CE run."""
    trainer = text_trainer(tiny_run, tmp_path, {"name": "grouped_siglip"}, describer={"image_size": 48,
                                                                                   "min_answers_to_judge": 4})
    trainer.objective.describer.describe = lambda requests: [None] * len(requests)
    with pytest.raises(UnusableAnswersError, match=r"only 0 of \d+ describer answers .*min_usable_share"):
        trainer.train_step(first_batch(trainer))


def test_unusable_share_is_judged_at_the_end_of_a_short_epoch(tiny_run, tmp_path):
    trainer = text_trainer(tiny_run, tmp_path, {"name": "grouped_siglip"})  # min_answers_to_judge 16 > one step
    real = trainer.objective.describer.describe
    trainer.objective.describer.describe = lambda requests: [None] * (len(requests) - 1) + real(requests[-1:])
    logs = trainer.train_step(first_batch(trainer))
    assert 0 < logs["text/describer_calls"] < 16 and logs["text/texts"] == 1
    with pytest.raises(UnusableAnswersError, match="describer.min_usable_share 50%"):
        trainer.objective.end_epoch()


def test_zero_min_usable_share_trains_on_whatever_arrives(tiny_run, tmp_path):
    trainer = text_trainer(tiny_run, tmp_path, {"name": "grouped_siglip"},
                           describer={"image_size": 48, "min_usable_share": 0.0, "min_answers_to_judge": 1})
    trainer.objective.describer.describe = lambda requests: [None] * len(requests)
    logs = trainer.train_step(first_batch(trainer))
    assert logs["text/texts"] == 0 and logs["text/malformed"] == logs["text/describer_calls"] > 0
    assert trainer.objective.end_epoch()["malformed"] == logs["text/malformed"]


def test_summary_reports_answer_statistics(tiny_run, tmp_path):
    trainer = text_trainer(tiny_run, tmp_path, {"name": "grouped_siglip"})
    summary = trainer.fit()
    assert summary["describer_usable_share"] == 1.0
    assert summary["answer_words_mean"] > 3  # the rules describer writes sentences


def test_a_cache_from_another_describer_is_refused_naming_what_differs(tiny_run, tmp_path):
    run = tiny_run("t", objective={"name": "grouped_siglip"}, **TEXT)
    trainer = Trainer(run, tmp_path / "out", log=lambda *_: None)
    save_torch(tmp_path / "w.pth", {"model": trainer.model.state_dict(), "provenance": trainer.provenance})
    prefill_cache(run, str(tmp_path / "w.pth"), tmp_path / "prefill.pt")
    other = tiny_run("t", objective={"name": "grouped_siglip"}, describer={"image_size": 48, "seed": 7})
    with pytest.raises(ProvenanceError, match=r"prefill.pt: this mask-text cache was produced by another setup"
                                              r"(.|\n)*describer: file has"):
        Trainer(other, tmp_path / "other", cache_path=str(tmp_path / "prefill.pt"), log=lambda *_: None)
    state = load_torch(tmp_path / "prefill.pt")
    del state["provenance"]
    save_torch(tmp_path / "bare.pt", state)
    with pytest.raises(ProvenanceError, match="records nothing about what produced it"):
        Trainer(run, tmp_path / "bare", cache_path=str(tmp_path / "bare.pt"), log=lambda *_: None)
