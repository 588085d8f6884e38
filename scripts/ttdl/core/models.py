"""Segmentation networks from torchvision behind a small registry.

Every model is wrapped so that it takes images in [0,1] (normalisation is part
of the model, which keeps the raw photo at hand for describer overlays) and
returns both the logits and the *bottleneck* feature map that the text losses
attach to (captured by a forward hook on the backbone).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torchvision.models import segmentation as tvseg

from ttdl.core.io import load_torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelSpec:
    builder: Callable[..., nn.Module]
    bottleneck_key: str      # key of the backbone's output dict that is the bottleneck
    bottleneck_channels: int


REGISTRY: dict[str, ModelSpec] = {
    "lraspp_mobilenet_v3_large": ModelSpec(tvseg.lraspp_mobilenet_v3_large, "high", 960),
    "deeplabv3_mobilenet_v3_large": ModelSpec(tvseg.deeplabv3_mobilenet_v3_large, "out", 960),
    "deeplabv3_resnet50": ModelSpec(tvseg.deeplabv3_resnet50, "out", 2048),
    "fcn_resnet50": ModelSpec(tvseg.fcn_resnet50, "out", 2048),
}


class SegmentationNet(nn.Module):
    """torchvision segmenter + input normalisation + bottleneck capture."""

    def __init__(self, net: nn.Module, spec: ModelSpec):
        super().__init__()
        self.net = net
        self.bottleneck_key = spec.bottleneck_key
        self.bottleneck_channels = spec.bottleneck_channels
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self._bottleneck: torch.Tensor | None = None
        net.backbone.register_forward_hook(self._capture)

    def _capture(self, _module, _inputs, output) -> None:
        self._bottleneck = output[self.bottleneck_key]

    def shared_parameters(self) -> list[nn.Parameter]:
        """The parameters that compute B: both CE and every aux loss reach them (the rest is CE's alone)."""
        return list(self.net.backbone.parameters())

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.net((images - self.mean) / self.std)["out"]
        bottleneck, self._bottleneck = self._bottleneck, None
        return logits, bottleneck


def _state_dict_from(obj, path: Path) -> dict:
    """Accept a bare state dict or a training checkpoint holding one under 'model'."""
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict):
        raise RuntimeError(f"{path} does not hold a state dict")
    return obj


def set_bn_momentum(model: nn.Module, momentum: float) -> None:
    """torchvision's MobileNetV3 uses momentum 0.01, tuned for finetuning pretrained weights.

    From a random init and a few hundred steps, the running statistics then lag far
    behind the weights and eval-mode predictions collapse to one class.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = momentum


def build_model(name: str, num_classes: int, weights: str | None = None,
                backbone_weights: str | None = None, bn_momentum: float | None = 0.1) -> SegmentationNet:
    """Random init by default; never downloads. Optional local weights files."""
    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(REGISTRY))}")
    spec = REGISTRY[name]
    kwargs = {"weights": None, "weights_backbone": None, "num_classes": num_classes}
    if name != "lraspp_mobilenet_v3_large":
        kwargs["aux_loss"] = False
    model = SegmentationNet(spec.builder(**kwargs), spec)
    if bn_momentum is not None:
        set_bn_momentum(model, bn_momentum)
    if backbone_weights:
        path = Path(backbone_weights)
        state = _state_dict_from(load_torch(path), path)
        backbone = model.net.backbone
        if not set(state) & set(backbone.state_dict()):
            raise RuntimeError(f"{path}: no key matches the {name} backbone (its keys are e.g. {list(state)[:3]})")
        backbone.load_state_dict(state, strict=False)
    if weights:
        path = Path(weights)
        state = _state_dict_from(load_torch(path), path)
        target = model if any(k.startswith("net.") for k in state) else model.net  # ours or torchvision's keys
        try:
            target.load_state_dict(state)
        except RuntimeError as exc:
            raise RuntimeError(f"weights file {path} does not fit model {name} with {num_classes} classes: "
                               f"{exc}") from exc
    return model
