"""FLAIR checkpoints -> open_clip text encoder (ttdl.text.flair).

No real FLAIR file exists offline, so the checkpoint is synthesised from an
open_clip model with FLAIR's wrapping ('state_dict', 'module.' prefixes) and
FLAIR-only modules added. A tiny registered open_clip config with ViT-B-16's
key structure keeps it fast; a meta-device ViT-B-16 checks that the mapping
covers the real architecture's key names.
"""
from __future__ import annotations

import json
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

from ttdl.core.settings import EncoderSettings
from ttdl.text import flair
from ttdl.text.encoders import build_encoder as build_flair_encoder
from ttdl.text.flair import flair_to_open_clip, load_flair_text_encoder

TINY = "ttdl-test-tiny-flair"
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
TEXTS = ["the prediction of the star region is incomplete on the left",
         "a spurious circle region was hallucinated at the bottom right", "fine"]


def flair_only_extras() -> dict[str, torch.Tensor]:
    """Stand-ins for FLAIR modules open_clip lacks (text-conditioned pooling, image-token head)."""
    g = torch.Generator().manual_seed(7)
    return {
        "visual_proj.attn.in_proj_weight": torch.randn(96, 32, generator=g),
        "visual_proj.attn.out_proj.weight": torch.randn(32, 32, generator=g),
        "visual_proj.ln_q.weight": torch.ones(32),
        "image_post.weight": torch.randn(32, 32, generator=g),
        "attn_mask": torch.zeros(77, 77),
    }


@pytest.fixture(scope="module")
def tiny_model_name(tmp_path_factory) -> str:
    cfg_dir = tmp_path_factory.mktemp("open_clip_cfg")
    (cfg_dir / f"{TINY}.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(cfg_dir)
    return TINY


@pytest.fixture(scope="module")
def source(tiny_model_name):
    torch.manual_seed(1)
    model = open_clip.create_model(tiny_model_name, pretrained=None, pretrained_text=False, device="cpu").eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1 / 0.05))
    return model


def flair_checkpoint(source, drop: tuple[str, ...] = (), replace: dict | None = None) -> dict:
    """An open_clip training-style checkpoint of `source` as FLAIR's DDP training would save it."""
    sd = {k: v.clone() for k, v in source.state_dict().items() if k not in drop}
    sd.update(replace or {})
    sd.update(flair_only_extras())
    sd["logit_bias"] = torch.tensor([-10.0])  # sigmoid loss; stored with shape [1]
    return {"epoch": 3, "name": "flair-test", "state_dict": {f"module.{k}": v for k, v in sd.items()}}


@pytest.fixture(scope="module")
def checkpoint_path(source, tmp_path_factory):
    path = tmp_path_factory.mktemp("flair") / "flair-cc3m-recap.pt"
    torch.save(flair_checkpoint(source), path)
    return path


def tokens(texts: list[str]) -> torch.Tensor:
    return open_clip.get_tokenizer(TINY)(texts)


# ---- the mapping ----------------------------------------------------------------------

def test_mapping_strips_wrappers_keeps_open_clip_keys_and_reports_flair_extras(source) -> None:
    mapped, report = flair_to_open_clip(flair_checkpoint(source))
    assert set(mapped) == set(source.state_dict()) | {"logit_bias"}
    assert torch.equal(mapped["transformer.resblocks.1.attn.in_proj_weight"],
                       source.state_dict()["transformer.resblocks.1.attn.in_proj_weight"])
    assert report["dropped"] == sorted(flair_only_extras())
    assert report["dropped_modules"] == ["attn_mask", "image_post", "visual_proj"]
    assert "text_projection" in report["text"] and "token_embedding.weight" in report["text"]
    assert report["scalars"] == ["logit_bias", "logit_scale"]
    assert report["visual"] and all(k.startswith("visual.") for k in report["visual"])


def test_custom_text_layout_maps_to_the_same_names(source) -> None:
    sd = source.state_dict()
    custom = {(k if k.startswith("visual.") or k == "logit_scale" else f"text.{k}"): v for k, v in sd.items()}
    mapped, report = flair_to_open_clip(custom)
    assert set(mapped) == set(sd) and not report["dropped"]


def test_mapping_covers_every_key_of_the_real_vit_b_16() -> None:
    """Built on the meta device: the real key names and shapes, no memory, no init cost."""
    cfg = open_clip.get_model_config("ViT-B-16")
    with torch.device("meta"):
        model = open_clip.CLIP(**cfg)
    sd = model.state_dict()
    assert sd["text_projection"].shape == (512, 512) and sd["visual.proj"].shape == (768, 512)
    wrapped = {"state_dict": {f"module.{k}": v for k, v in sd.items()}}
    wrapped["state_dict"]["module.visual_proj.attn.in_proj_weight"] = torch.empty(1536, 512, device="meta")
    mapped, report = flair_to_open_clip(wrapped)
    assert set(mapped) == set(sd)
    assert report["dropped"] == ["visual_proj.attn.in_proj_weight"]
    assert len([k for k in report["text"] if k.startswith("transformer.resblocks.")]) == 12 * 12


def test_mapping_without_a_text_tower_fails_clearly() -> None:
    with pytest.raises(ValueError, match="no text-tower tensors"):
        flair_to_open_clip({"state_dict": {"module.visual_proj.weight": torch.zeros(2)}})


# ---- loading ----------------------------------------------------------------------------

def test_loaded_text_embeddings_equal_the_source_model(source, checkpoint_path, tiny_model_name) -> None:
    loaded = load_flair_text_encoder(checkpoint_path, model_name=tiny_model_name)
    with torch.no_grad():
        expected = source.encode_text(tokens(TEXTS))
        got = loaded.model.encode_text(loaded.tokenizer(TEXTS))
        image = torch.rand(2, 3, 32, 32)
        assert torch.equal(loaded.model.encode_image(image), source.encode_image(image))
    assert torch.equal(got, expected)
    assert float(loaded.model.logit_bias.detach()) == -10.0
    assert loaded.report.dropped == sorted(flair_only_extras()) and not loaded.report.visual_missing


def test_build_flair_encoder_wraps_it_as_a_text_image_encoder(source, checkpoint_path, tiny_model_name,
                                                              monkeypatch) -> None:
    monkeypatch.setitem(flair.FLAIR_MODELS, "flair-tiny", tiny_model_name)
    enc = build_flair_encoder(EncoderSettings.from_partial({"name": "flair-tiny", "weights": str(checkpoint_path)}))
    with torch.no_grad():
        expected = F.normalize(source.encode_text(tokens(TEXTS)), dim=-1)
        got = enc.encode_text(TEXTS)
    assert torch.allclose(got, expected, atol=1e-6)
    assert enc.embed_dim == 32 and enc.image_size == 32
    assert float(enc.logit_bias.detach()) == -10.0  # FLAIR's own sigmoid scale and bias are kept
    assert math.isclose(float(enc.logit_scale.detach()), math.log(1 / 0.05), rel_tol=1e-6)
    assert all(not p.requires_grad for n, p in enc.model.named_parameters() if not n.startswith("visual."))


def test_build_flair_encoder_requires_local_weights(monkeypatch, tiny_model_name) -> None:
    monkeypatch.setitem(flair.FLAIR_MODELS, "flair-tiny", tiny_model_name)
    with pytest.raises(ValueError, match="needs `weights:`"):
        build_flair_encoder(EncoderSettings.from_partial({"name": "flair-tiny"}))
    with pytest.raises(FileNotFoundError, match="FLAIR weights not found"):
        build_flair_encoder(EncoderSettings.from_partial({"name": "flair-tiny", "weights": "/nonexistent/flair.pt"}))


def test_missing_text_keys_fail_naming_them(source, tmp_path, tiny_model_name) -> None:
    gone = ("transformer.resblocks.1.mlp.c_fc.weight", "ln_final.bias")
    path = tmp_path / "broken.pt"
    torch.save(flair_checkpoint(source, drop=gone), path)
    with pytest.raises(RuntimeError, match="missing text-tower keys") as info:
        load_flair_text_encoder(path, model_name=tiny_model_name)
    assert all(key in str(info.value) for key in gone)


def test_wrong_text_shapes_fail_naming_the_key(source, tmp_path, tiny_model_name) -> None:
    path = tmp_path / "wide.pt"
    torch.save(flair_checkpoint(source, replace={"text_projection": torch.zeros(32, 64)}), path)
    with pytest.raises(RuntimeError, match=r"text_projection: checkpoint \(32, 64\) vs model \(32, 32\)"):
        load_flair_text_encoder(path, model_name=tiny_model_name)


class NotATensor:
    """Any pickled object: weights_only loading must refuse it."""


def test_checkpoints_needing_arbitrary_unpickling_are_refused(source, tmp_path, tiny_model_name) -> None:
    ckpt = flair_checkpoint(source)
    ckpt["args"] = NotATensor()
    path = tmp_path / "pickled.pt"
    torch.save(ckpt, path)
    with pytest.raises(RuntimeError, match="cannot load checkpoint") as info:
        load_flair_text_encoder(path, model_name=tiny_model_name)
    assert "weights_only=False" in str(info.value)  # the one-off conversion hint


def test_a_mismatched_image_tower_is_skipped_but_the_text_tower_still_loads(source, tmp_path,
                                                                            tiny_model_name) -> None:
    path = tmp_path / "other_visual.pt"
    torch.save(flair_checkpoint(source, replace={"visual.proj": torch.zeros(64, 48)}), path)
    loaded = load_flair_text_encoder(path, model_name=tiny_model_name)
    assert "visual.proj: checkpoint (64, 48) vs model (64, 32)" in loaded.report.visual_skipped
    assert not loaded.report.visual and "visual.conv1.weight" in loaded.report.dropped
    with torch.no_grad():
        assert torch.equal(loaded.model.encode_text(tokens(TEXTS)), source.encode_text(tokens(TEXTS)))
        assert not torch.equal(loaded.model.visual.conv1.weight, source.visual.conv1.weight)
