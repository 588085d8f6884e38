"""FLAIR checkpoints as a ttdl text encoder (docs/method.md §1: the original embedded dT with FLAIR).

FLAIR (ExplainableML/flair) is an open_clip ViT-B/16 CLIP trained with extra
modules; the original needed a patched FLAIR checkout that unpickled checkpoints
with `weights_only=False`. Here no FLAIR code is needed: its checkpoint is read
as plain tensors (`ttdl.core.io.load_torch`, weights_only=True), the keys of the
parts open_clip also has are mapped onto an open_clip `ViT-B-16` built with
`pretrained=None`, and the result is wrapped in `ttdl.text.encoders.TextImageEncoder`.

Assumptions about the checkpoint (from FLAIR's open_clip-based code; the
mapping is by *name*, so unknown extras are reported, never silently loaded):

* The file is either a bare state dict or an open_clip training checkpoint
  (`{"epoch", "name", "state_dict", "optimizer", ...}`); keys may carry
  `module.` (DDP) and/or `_orig_mod.` (torch.compile) prefixes.
* The text tower uses CLIP's flat layout (`token_embedding.weight`,
  `positional_embedding`, `transformer.resblocks.N.*`, `ln_final.*`,
  `text_projection`); the CustomTextCLIP layout (`text.` + the same names) is
  accepted too. 77 positions, the open_clip BPE tokenizer, GELU (not QuickGELU:
  FLAIR trains from scratch with open_clip's ViT-B-16 config).
* The image tower, when present, is an open_clip `VisionTransformer` under
  `visual.` (conv1, class/positional embedding, ln_pre, resblocks, ln_post, proj).
* Everything else is FLAIR-only and dropped: the text-conditioned attention
  pooling (`visual_proj.*`), image-token heads/projections, extra logit scales,
  and non-persistent buffers such as `attn_mask`. `logit_scale` and (FLAIR is
  sigmoid-trained) `logit_bias` are kept.

The text tower is loaded strictly (a missing, extra or mis-shaped text tensor
fails, naming the keys): the embeddings of the descriptions are the whole
point of using FLAIR. The image tower is best effort: vle/1 adapts it anyway,
and the report says what was loaded.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ttdl.core.io import load_torch

log = logging.getLogger(__name__)

# ttdl encoder name -> open_clip architecture the FLAIR checkpoint was trained on.
FLAIR_MODELS: dict[str, str] = {"flair-vit-b-16": "ViT-B-16"}
FLAIR_CONTEXT_LENGTH = 77

_WRAPPERS = ("module.", "_orig_mod.")
_TEXT = re.compile(
    r"(token_embedding\.weight|positional_embedding|text_projection(\.weight|\.bias)?"
    r"|ln_final\.(weight|bias)|transformer\.resblocks\.\d+\.\S+)"
)
_VISUAL = re.compile(
    r"visual\.(conv1\.weight|class_embedding|positional_embedding|ln_pre\.(weight|bias)"
    r"|transformer\.resblocks\.\d+\.\S+|ln_post\.(weight|bias)|proj)"
)
_SCALARS = ("logit_scale", "logit_bias")


@dataclass
class FlairReport:
    """What the mapping kept and dropped, and (after loading) what the model got."""

    text: list[str] = field(default_factory=list)
    visual: list[str] = field(default_factory=list)
    scalars: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    visual_missing: list[str] = field(default_factory=list)  # filled by the loader
    visual_skipped: str | None = None  # why the loader left the whole image tower at random init

    @property
    def dropped_modules(self) -> list[str]:
        """Dropped keys grouped by their first name part (visual_proj, image_post, ...)."""
        return sorted({k.split(".")[0] if not k.startswith("visual.") else ".".join(k.split(".")[:2])
                       for k in self.dropped})

    def as_dict(self) -> dict[str, Any]:
        return {"text": self.text, "visual": self.visual, "scalars": self.scalars,
                "dropped": self.dropped, "dropped_modules": self.dropped_modules,
                "visual_missing": self.visual_missing, "visual_skipped": self.visual_skipped}

    def summary(self) -> str:
        visual = (f"{len(self.visual)} image-tower tensors" if self.visual else "no image tower (random init)")
        if self.visual_skipped:
            visual = f"image tower NOT loaded (random init): {self.visual_skipped}"
        if self.visual_missing:
            visual += f", {len(self.visual_missing)} image-tower tensors left at random init"
        dropped = f"dropped {len(self.dropped)} FLAIR-only tensors"
        if self.dropped:
            dropped += f" ({', '.join(self.dropped_modules)})"
        return f"{len(self.text)} text-tower tensors, {visual}, {dropped}"


def _unwrap(state: Any) -> dict[str, Tensor]:
    """The tensor dict inside a bare or training-checkpoint file, wrapper prefixes removed."""
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise ValueError("a FLAIR checkpoint must be a state dict (or a dict with a 'state_dict' entry)")
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise ValueError(f"FLAIR state dict entry {key!r} is not a named tensor")
        name = key
        while name.startswith(_WRAPPERS):
            name = next(name.removeprefix(p) for p in _WRAPPERS if name.startswith(p))
        if name in out:
            raise ValueError(f"FLAIR state dict has {name!r} twice (once with a wrapper prefix)")
        out[name] = value
    return out


def flair_to_open_clip(state: dict) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Map a FLAIR state dict onto open_clip CLIP key names.

    Returns (mapped, report): `mapped` holds the text tower, text projection,
    logit scale/bias and (when present) the image tower under open_clip's
    flat CLIP names; `report` lists the kept keys per part and the dropped
    FLAIR-only ones (see FlairReport.as_dict).
    """
    mapped, report = _map(state)
    return mapped, report.as_dict()


def _map(state: Any) -> tuple[dict[str, Tensor], FlairReport]:
    flat = _unwrap(state)
    mapped: dict[str, Tensor] = {}
    report = FlairReport()
    for key, value in flat.items():
        name = key.removeprefix("text.") if key.startswith("text.") else key
        if _TEXT.fullmatch(name):
            target, bucket = name, report.text
        elif key in _SCALARS:
            target, bucket = key, report.scalars
        elif _VISUAL.fullmatch(key):
            target, bucket = key, report.visual
        else:
            report.dropped.append(key)
            continue
        if target in mapped:
            raise ValueError(f"FLAIR state dict maps two tensors onto {target!r} (flat and 'text.' layouts mixed)")
        mapped[target] = value
        bucket.append(target)
    if not report.text:
        raise ValueError("no text-tower tensors found (expected token_embedding.weight, transformer.resblocks.*, "
                         f"ln_final.*, text_projection); first keys: {sorted(flat)[:8]}")
    for bucket in (report.text, report.visual, report.scalars, report.dropped):
        bucket.sort()
    return mapped, report


def _is_text_key(key: str) -> bool:
    return not key.startswith("visual.") and key not in _SCALARS


@dataclass
class FlairEncoder:
    """An open_clip model with FLAIR weights plus what TextImageEncoder needs to wrap it."""

    model: nn.Module
    tokenizer: Any
    embed_dim: int
    report: FlairReport


def load_flair_text_encoder(
    path: str | os.PathLike,
    *,
    model_name: str = FLAIR_MODELS["flair-vit-b-16"],
    image_size: int | None = None,
    quick_gelu: bool = False,
) -> FlairEncoder:
    """Build open_clip `model_name` with pretrained=None and load a FLAIR checkpoint into it.

    Text tower: strict (missing, unexpected or mis-shaped tensors raise a
    RuntimeError naming them). Image tower: loaded where present; missing parts
    stay randomly initialised and are listed in the report, and any shape
    mismatch leaves the whole tower at random init (reported, logged).
    `.safetensors` files are read with safetensors, anything else with
    torch.load(weights_only=True): a checkpoint that needs arbitrary unpickling
    is refused (convert it once, in an environment you trust, to a bare
    state dict).
    """
    import open_clip
    from open_clip.model import resize_pos_embed

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FLAIR weights not found: {path} (encoder.weights must be an existing local file)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        raw: Any = load_file(str(path), device="cpu")
    else:
        try:
            raw = load_torch(path)
        except RuntimeError as exc:
            raise RuntimeError(
                f"{exc}\nIf this FLAIR checkpoint holds pickled non-tensor objects, convert it once where you "
                "trust the file: load it with weights_only=False and save only its 'state_dict' tensors"
            ) from exc
    try:
        mapped, report = _map(raw)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None

    pos = mapped.get("positional_embedding")
    if pos is not None and pos.shape[0] != FLAIR_CONTEXT_LENGTH:
        raise ValueError(f"{path}: text context length {pos.shape[0]}, but ttdl tokenises to {FLAIR_CONTEXT_LENGTH}")
    if open_clip.get_model_config(model_name) is None:
        raise ValueError(f"unknown open_clip model {model_name!r}")
    extra: dict[str, Any] = {}
    if "logit_bias" in mapped:  # sigmoid-trained: give the model a bias to load it into
        extra["init_logit_bias"] = float(mapped["logit_bias"].reshape(-1)[0])
    model = open_clip.create_model(model_name, pretrained=None, pretrained_text=False, force_image_size=image_size,
                                   force_quick_gelu=quick_gelu, device="cpu", **extra)
    own = model.state_dict()

    text_theirs = {k for k in mapped if _is_text_key(k)}
    text_mine = {k for k in own if _is_text_key(k)}
    problems = []
    if missing := sorted(text_mine - text_theirs):
        problems.append(f"missing text-tower keys: {', '.join(missing)}")
    if unexpected := sorted(text_theirs - text_mine):
        problems.append(f"unexpected text-tower keys (not in open_clip {model_name}): {', '.join(unexpected)}")
    if mapped.get("visual.positional_embedding") is not None:
        try:  # a different image_size re-grids the position embedding
            resize_pos_embed(mapped, model)
        except RuntimeError:  # not a square patch grid: reported as a shape mismatch below
            pass
    shapes = {k: f"{k}: checkpoint {tuple(mapped[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(mapped) & set(own))
              if k not in _SCALARS and mapped[k].shape != own[k].shape}
    if text_shapes := [line for k, line in shapes.items() if _is_text_key(k)]:
        problems.append("shape mismatches: " + "; ".join(text_shapes))
    if problems:
        raise RuntimeError(f"FLAIR weights {path} do not fit open_clip {model_name}: " + " | ".join(problems))
    if visual_shapes := [line for k, line in shapes.items() if k.startswith("visual.")]:
        # A different image architecture: half-loading it would be worse than none (vle/1 adapts it).
        report.visual_skipped = "shape mismatches: " + "; ".join(visual_shapes)
        log.warning("FLAIR weights %s: image tower not loaded, %s", path, report.visual_skipped)
        report.dropped = sorted(report.dropped + report.visual)
        report.visual = []
        mapped = {k: v for k, v in mapped.items() if not k.startswith("visual.")}

    visual_unknown = sorted(k for k in mapped if k.startswith("visual.") and k not in own)
    report.dropped = sorted(report.dropped + visual_unknown)
    report.visual = [k for k in report.visual if k in own]
    if report.visual:
        report.visual_missing = sorted(k for k in own if k.startswith("visual.") and k not in mapped)
    sd = {k: v for k, v in mapped.items() if k in own}
    for key in _SCALARS:
        if key in sd:
            sd[key] = sd[key].reshape(own[key].shape)
    result = model.load_state_dict(sd, strict=False)
    leftover = [k for k in result.missing_keys if _is_text_key(k)]
    if leftover or result.unexpected_keys:  # guarded above; a failure here is a bug in the mapping
        raise RuntimeError(f"FLAIR mapping bug: missing {leftover}, unexpected {result.unexpected_keys}")
    tokenizer = open_clip.get_tokenizer(model_name, context_length=FLAIR_CONTEXT_LENGTH)
    embed_dim = int(open_clip.get_model_config(model_name)["embed_dim"])
    return FlairEncoder(model.eval(), tokenizer, embed_dim, report)


def build_flair_towers(cfg: dict[str, Any]) -> tuple[nn.Module, Any, int, FlairReport]:
    """The open_clip model, tokenizer and width of a FLAIR checkpoint (`encoder.name: flair-vit-b-16`).

    `ttdl.text.encoders.build_encoder` wraps them like any other tower, so a run
    switches text encoder by name only.
    """
    name = cfg["name"]
    if name not in FLAIR_MODELS:
        raise ValueError(f"{name!r} is not a FLAIR encoder; known: {sorted(FLAIR_MODELS)}")
    if cfg["weights"] is None:
        raise ValueError(f"encoder {name!r} needs `weights:` a local FLAIR checkpoint (e.g. flair-cc3m-recap.pt)")
    flair = load_flair_text_encoder(cfg["weights"], model_name=FLAIR_MODELS[name], image_size=cfg["image_size"])
    log.info("FLAIR weights %s: %s", cfg["weights"], flair.report.summary())
    return flair.model, flair.tokenizer, flair.embed_dim, flair.report
