"""Encoder adaptation vle/1 on a synthetic (difference-mask overlay, description) task."""
from __future__ import annotations

import pytest
import torch

from ttdl.core.settings import EncoderSettings
from ttdl.text.adaptation import adapt_encoder, distinct_text_batches, retrieval_top1, split_indices
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
