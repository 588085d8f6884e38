"""Small trainable maps between the segmenter's bottleneck B and the text space (docs/method.md 3d-3g).

They live on the image side of the aux losses: B has the segmenter's width
(960 for LRASPP) and no notion of text, so every head needs some map from
B's [C,h,w] grid to one vector in the text encoder's D-dim space.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ttdl.core import io
from ttdl.core.losses import SIGLIP_INIT_LOGIT_BIAS, SIGLIP_INIT_LOGIT_SCALE

CONCAT_FORMAT = "ttdl-concat-adapter/2"  # /2: the file states its input/output norms, scale and bias
CONCAT_FORMATS_READ = ("ttdl-concat-adapter/1", CONCAT_FORMAT)
CONCAT_NORMS = ("l2", "none")


class GapLinear(nn.Module):
    """GAP then a bias-free linear map to the text dim (3e): the cheapest B -> text adapter."""

    def __init__(self, in_ch: int, out_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_ch, out_dim, bias=False)

    def forward(self, bottleneck: Tensor) -> Tensor:
        """[N,C,h,w] -> [N,D]."""
        return self.linear(bottleneck.float().mean(dim=(2, 3)))


class AttentionPoolByText(nn.Module):
    """1x1 conv to the text dim, then multi-head attention pooling with a text as the query (3d).

    The original's `conv_attn_pool_by_text`: a description talks about one region
    of the image, so the text chooses which positions of B it is scored
    against, instead of the whole-image average that GAP would give.
    """

    def __init__(self, in_ch: int, text_dim: int, heads: int) -> None:
        super().__init__()
        if text_dim % heads:
            raise ValueError(f"text_dim {text_dim} is not divisible by heads {heads}")
        self.proj = nn.Conv2d(in_ch, text_dim, kernel_size=1)
        self.attn = nn.MultiheadAttention(text_dim, heads, batch_first=True)

    def forward(self, bottleneck: Tensor, rows: Tensor, queries: Tensor) -> Tensor:
        """bottleneck [N,C,h,w], rows [T] (batch row of each query), queries [T,D] -> pooled [T,D]."""
        if rows.numel() == 0:
            return bottleneck.float().sum() * 0 + queries.new_zeros((0, self.proj.out_channels))
        feats = self.proj(bottleneck.float())                       # [N,D,h,w]
        tokens = feats.flatten(2).transpose(1, 2)[rows.to(feats.device)]  # [T,h*w,D]
        query = queries.to(feats.device, torch.float32).unsqueeze(1)      # [T,1,D]
        pooled, _ = self.attn(query, tokens, tokens, need_weights=False)
        return pooled.squeeze(1)


class ConcatAdapter(nn.Module):
    """Bias-free 2D -> D map over [a || b] (vle/2 GT_PR||dT, used frozen by 4.x).

    Starts as the mean of both halves, 0.5*(a + b): an untrained adapter
    already lands in the joint text space, so training only has to learn how
    to weigh and mix the two embeddings.

    Its training contract travels with it, because a frozen map is only right
    on inputs like the ones it was fitted on: vle/2 fed it two unit (L2-normalised)
    image embeddings and scored the L2-normalised output against unit text
    embeddings with logits exp(logit_scale)*cos + logit_bias. `fuse(a, b)` is
    that whole image side; `prepare` is its input step alone; `forward` is the
    bare linear map (no normalisation), for callers that normalise themselves.
    """

    def __init__(self, dim: int, *, input_norm: str = "l2", output_norm: str = "l2",
                 logit_scale: float = SIGLIP_INIT_LOGIT_SCALE, logit_bias: float = SIGLIP_INIT_LOGIT_BIAS) -> None:
        super().__init__()
        for name, value in (("input_norm", input_norm), ("output_norm", output_norm)):
            if value not in CONCAT_NORMS:
                raise ValueError(f"ConcatAdapter {name} must be one of {CONCAT_NORMS}, got {value!r}")
        self.dim = dim
        self.input_norm = input_norm    # how each of a, b was normalised in training
        self.output_norm = output_norm  # how the output was normalised before the logits
        self.logit_scale = float(logit_scale)  # log temperature learned with it (logits use its exp)
        self.logit_bias = float(logit_bias)
        self.meta: dict = {}  # what vle/2 stored beside the weights (encoder name, metrics...)
        self.linear = nn.Linear(2 * dim, dim, bias=False)
        with torch.no_grad():
            eye = torch.eye(dim)
            self.linear.weight.copy_(0.5 * torch.cat([eye, eye], dim=1))

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        """The bare map W·[a || b]; inputs as given (see `prepare` / `fuse`)."""
        return self.linear(torch.cat([a.float(), b.float()], dim=-1))

    def prepare(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """Normalise both inputs as in training (`input_norm`; vle/2: L2, so GAP-of-B features fit too)."""
        return _normed(a, self.input_norm), _normed(b, self.input_norm)

    def fuse(self, a: Tensor, b: Tensor) -> Tensor:
        """The image side vle/2 trained: prepare the inputs, map, normalise the output (`output_norm`)."""
        return _normed(self(*self.prepare(a, b)), self.output_norm)

    def save(self, path: str | os.PathLike, **meta) -> None:
        """Atomic write of the weights, the training contract (norms, scale, bias) and metadata."""
        io.save_torch(path, {"format": CONCAT_FORMAT, "dim": self.dim,
                             "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()},
                             "input_norm": self.input_norm, "output_norm": self.output_norm,
                             "logit_scale": self.logit_scale, "logit_bias": self.logit_bias,
                             "meta": meta})

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "ConcatAdapter":
        """Load with weights_only (ttdl.core.io.load_torch); reject files of another format.

        Files of format /1 predate the stored contract; vle/2 wrote them from unit
        inputs with a normalised output, and kept scale/bias in `meta` when at all.
        """
        blob = io.load_torch(path)
        fmt = blob.get("format") if isinstance(blob, dict) else None
        if fmt not in CONCAT_FORMATS_READ:
            raise ValueError(f"{path} is not a concat-adapter file ({CONCAT_FORMAT}); it is written by vle/2")
        meta = dict(blob.get("meta") or {})
        source = blob if fmt == CONCAT_FORMAT else meta
        adapter = cls(int(blob["dim"]), input_norm=blob.get("input_norm", "l2"),
                      output_norm=blob.get("output_norm", "l2"),
                      logit_scale=float(source.get("logit_scale", SIGLIP_INIT_LOGIT_SCALE)),
                      logit_bias=float(source.get("logit_bias", SIGLIP_INIT_LOGIT_BIAS)))
        adapter.load_state_dict(blob["state_dict"])
        adapter.meta = meta
        return adapter


def _normed(x: Tensor, kind: str) -> Tensor:
    return l2(x) if kind == "l2" else x.float()


def l2(x: Tensor) -> Tensor:
    return F.normalize(x.float(), dim=-1)
