"""Encoder adaptation vle/1 on a synthetic (difference-mask overlay, description) task."""
from __future__ import annotations

import pytest
import torch

from ttdl.core.io import save_torch
from ttdl.core.settings import EncoderSettings
from ttdl.text.adaptation import (
    METADATA_KEY,
    adapt_encoder,
    adapter_anchor_penalty,
    check_adaptation,
    distinct_text_batches,
    image_tower_pretrained,
    retrieval_top1,
    split_indices,
    text_geometry,
)
from ttdl.text.encoders import build_encoder

SIZE = 64


def _region(top: int, bottom: int, left: int, right: int):
    def draw(img: torch.Tensor, g: torch.Generator) -> None:
        dy, dx = (int(v) for v in torch.randint(-3, 4, (2,), generator=g))
        img[:, max(0, top + dy) : bottom + dy, max(0, left + dx) : right + dx] = 1.0
    return draw


# Each description names where the white (wrong) pixels of the overlay are.
PATTERNS = [
    ("the prediction misses the left part of the object", _region(12, 52, 2, 18)),
    ("a spurious region was hallucinated at the bottom right", _region(44, 62, 44, 62)),
    ("the predicted region extends too far at the top", _region(2, 14, 14, 50)),
    ("the prediction matches the ground truth well", lambda img, g: None),
    ("the object is missed completely", _region(18, 46, 18, 46)),
    ("the boundary of the prediction is too coarse",
     lambda img, g: [_region(r, r + 3, 12, 52)(img, g) for r in (12, 50)]),
]


def synthetic_pairs(n: int, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """Grey noisy 'photos' with a white error region; several images share each text."""
    g = torch.Generator().manual_seed(seed)
    images, texts = [], []
    for k in range(n):
        text, draw = PATTERNS[k % len(PATTERNS)]
        img = 0.3 + 0.3 * torch.rand(3, SIZE, SIZE, generator=g)
        draw(img, g)
        images.append(img)
        texts.append(text)
    return torch.stack(images), texts


pytestmark = pytest.mark.usefixtures("one_thread")


def test_adaptation_beats_before_and_chance():
    encoder = build_encoder(EncoderSettings.from_partial({"image_size": SIZE}))
    images, texts = synthetic_pairs(72)
    lines: list[str] = []
    m = adapt_encoder(encoder, images, texts, epochs=10, batch_size=12, lr=1e-3,
                      val_fraction=0.25, seed=0, log=lines.append)
    before, after = m["before"], m["after"]
    assert (m["n_train"], m["n_val"]) == (54, 18) and len(lines) == 10
    assert before["chance"] == pytest.approx(1 / 18)
    for key in ("i2t_top1", "t2i_top1"):
        assert after[key] >= 0.7, m
        assert after[key] >= before[key] + 0.25, m
        assert after[key] > 2 * after["chance_expected"] > after["chance"], m
    assert m["train_loss"][-1] < 0.5 * m["train_loss"][0]
    assert not encoder.training
    assert all(p.grad is None for p in encoder.model.text.parameters())
    # scale and bias have their own learning rate: they leave (log 10, -10)
    assert (m["logit_scale_before"], m["logit_bias_before"]) == pytest.approx((2.302585, -10.0))
    assert abs(m["logit_bias"] - m["logit_bias_before"]) > 0.1, m
    # the text side did not fold onto one direction
    geo0, geo1 = m["text_geometry_before"], m["text_geometry_after"]
    assert geo1["mean_cos"] <= geo0["mean_cos"] + 0.05 and geo1["effective_rank"] >= 0.9 * geo0["effective_rank"], m


def test_pretrained_image_tower_stays_frozen_only_adapter_scale_bias_train():
    encoder = build_encoder(EncoderSettings.from_partial({"image_size": SIZE}))
    images, texts = synthetic_pairs(24)
    visual = {k: v.clone() for k, v in encoder.model.visual.state_dict().items()}
    adapter = encoder.text_adapter.linear.weight.detach().clone()
    bias = float(encoder.logit_bias.detach())
    m = adapt_encoder(encoder, images, texts, epochs=2, batch_size=6, lr=1e-3, val_fraction=0.25, seed=0,
                      train_image_tower=False)
    assert m["trained"] == {"image_tower": False, "text_adapter": True, "logit_scale_bias": True}
    assert all(torch.equal(v, encoder.model.visual.state_dict()[k]) for k, v in visual.items())
    assert not torch.equal(adapter, encoder.text_adapter.linear.weight)
    assert float(encoder.logit_bias) != bias
    no_adapter = build_encoder(EncoderSettings.from_partial({"image_size": SIZE, "text_adapter": False}))
    with pytest.raises(ValueError, match="nothing to adapt"):
        adapt_encoder(no_adapter, images, texts, epochs=1, batch_size=6, lr=1e-3, val_fraction=0.0, seed=0,
                      train_image_tower=False)


def test_image_tower_pretrained_decision(tmp_path):
    default = EncoderSettings.from_partial({})
    encoder = build_encoder(EncoderSettings.from_partial({"image_size": SIZE}))
    assert not image_tower_pretrained(default, encoder)  # minilm-vit: random ViT, vle/1 trains it
    assert image_tower_pretrained(default.replace(adapted="results/vle/1/encoder.pt"), encoder)
    assert image_tower_pretrained(default.replace(name="ViT-B-16", weights="w.pt"), encoder)


def test_adapter_anchor_is_zero_at_identity_and_grows_with_distance():
    encoder = build_encoder(EncoderSettings.from_partial({"image_size": SIZE}))
    with torch.no_grad():
        assert float(adapter_anchor_penalty(encoder.text_adapter)) == 0.0
        encoder.text_adapter.linear.weight.mul_(0.5)
        assert float(adapter_anchor_penalty(encoder.text_adapter)) == pytest.approx(0.25 * encoder.embed_dim,
                                                                                    rel=1e-5)
    assert adapter_anchor_penalty(None) == 0.0


def test_text_geometry_sees_a_collapse():
    spread = torch.eye(8)
    collapsed = torch.nn.functional.normalize(torch.ones(8, 8) + 0.01 * torch.eye(8), dim=-1)
    assert text_geometry(spread) == pytest.approx({"mean_cos": 0.0, "effective_rank": 8.0})
    assert text_geometry(collapsed)["mean_cos"] > 0.99 and text_geometry(collapsed)["effective_rank"] < 1.5


def _fake_adapted(path, i2t: float, t2i: float, n_val: int = 50, chance_expected: float = 0.02, **extra):
    meta = {"n_val": n_val, "logit_scale_before": 2.3026, "logit_bias_before": -10.0, "logit_scale": 2.9,
            "logit_bias": -9.1, "after": {"i2t_top1": i2t, "t2i_top1": t2i, "chance": 1 / n_val,
                                          "chance_expected": chance_expected}} | extra
    save_torch(path, {"format": "ttdl-adapted-encoder/1", METADATA_KEY: meta})
    return path


def test_check_adaptation_refuses_chance_and_accepts_a_learned_encoder(tmp_path):
    at_chance = _fake_adapted(tmp_path / "chance.pt", i2t=0.02, t2i=0.02)
    ok, reason = check_adaptation(at_chance, 2.0)
    assert not ok
    assert "refused" in reason and "1.00x chance 0.0200" in reason and "2x required" in reason, reason
    good = _fake_adapted(tmp_path / "good.pt", i2t=0.10, t2i=0.06)
    ok, reason = check_adaptation(good, 2.0)
    assert ok and "accepted" in reason and "mean 0.080" in reason and "4.00x" in reason, reason
    assert "2.303 -> 2.900" in reason and "-10.000 -> -9.100" in reason  # scale/bias moves are named
    assert not check_adaptation(good, 5.0)[0]
    assert check_adaptation(at_chance, 0.0)[0]  # 0 disables the check


def test_check_adaptation_refuses_files_that_cannot_show_they_learned(tmp_path):
    save_torch(tmp_path / "old.pt", {"format": "ttdl-adapted-encoder/1"})
    ok, reason = check_adaptation(tmp_path / "old.pt", 2.0)
    assert not ok and "no adaptation metrics" in reason
    no_split = _fake_adapted(tmp_path / "nosplit.pt", 0.5, 0.5, after=None)
    ok, reason = check_adaptation(no_split, 2.0)
    assert not ok and "no held-out" in reason


def test_split_is_deterministic_and_disjoint():
    train, val = split_indices(50, 0.2, seed=3)
    train2, val2 = split_indices(50, 0.2, seed=3)
    assert torch.equal(train, train2) and torch.equal(val, val2)
    assert len(val) == 10 and sorted(train.tolist() + val.tolist()) == list(range(50))
    assert not torch.equal(split_indices(50, 0.2, seed=4)[1], val)
    assert len(split_indices(5, 0.0, seed=0)[1]) == 0


def test_batches_never_repeat_a_text():
    texts = ["a"] * 6 + ["b"] * 3 + ["c", "d"]
    batches = distinct_text_batches(list(range(len(texts))), texts, batch_size=3)
    for b in batches:
        assert 1 < len(b) <= 3 and len({texts[i] for i in b}) == len(b)
    used = [i for b in batches for i in b]
    assert len(used) == len(set(used))
    assert set(range(6, 11)) <= set(used)  # only surplus copies of "a" are left out


def test_retrieval_counts_duplicate_texts_as_hits():
    texts = ["x", "x", "y", "z"]
    txt = torch.eye(4)
    # Image 0 retrieves text row 1 (same string "x"): a hit. Image 2 retrieves row 3 ("z"): a miss.
    img = torch.tensor([[0, 1.0, 0, 0], [1.0, 0, 0, 0], [0, 0, 0, 1.0], [0, 0, 0, 1.0]])
    m = retrieval_top1(img, txt, texts)
    assert m["i2t_top1"] == pytest.approx(3 / 4)
    # Text columns: 0 -> image 1 ("x") hit, 1 -> image 0 hit, 2 -> image 0 ("x") miss, 3 -> image 2 ("y") miss.
    assert m["t2i_top1"] == pytest.approx(2 / 4)
    assert m["chance"] == pytest.approx(1 / 4)
    assert m["chance_expected"] == pytest.approx((2 + 2 + 1 + 1) / 16)


def test_adaptation_rejects_unusable_input():
    encoder = build_encoder(EncoderSettings.from_partial({"image_size": SIZE}))
    images, texts = synthetic_pairs(6)
    with pytest.raises(ValueError, match="two different texts"):
        adapt_encoder(encoder, images, ["same"] * 6, epochs=1, batch_size=4, lr=1e-3, val_fraction=0.0, seed=0)
    with pytest.raises(ValueError, match="6 images but 5 texts"):
        adapt_encoder(encoder, images, texts[:5], epochs=1, batch_size=4, lr=1e-3, val_fraction=0.0, seed=0)
