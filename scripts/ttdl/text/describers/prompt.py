"""The class-split one-shot prompt (docs/method.md section 5) as backend-neutral messages.

All wording lives in a YAML template under config/prompts/; this file only
assembles it. Placeholders: {class_name} (as the dataset names it) and
{CLASS_NAME} (upper case). A message is {"role", "text", "images": [Tensor]};
each HTTP backend converts that to its own wire format.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from ttdl.core.config import load_schema
from ttdl.text.describers.request import DescribeRequest
from ttdl.text.overlays import ALPHA, class_overlays, mask_overlay, resize_for_describer

# The template a run uses unless describer.prompt_template names another (the schema's default).
DEFAULT_TEMPLATE: str = load_schema()["definitions"]["describer"]["properties"]["prompt_template"]["default"]
SYSTEM_SECTIONS = ("context", "colour_map", "input_format", "task", "output_format")
REQUIRED_KEYS = SYSTEM_SECTIONS + ("support.class_name", "support.intro", "support.answer", "query")


@dataclass
class SupportExample:
    """The solved example shown before every query: a scene, its masks and the ideal answer."""

    image: Tensor  # [3,H,W] float in [0,1]
    gt_mask: Tensor  # [H,W] bool
    pr_mask: Tensor  # [H,W] bool
    class_name: str
    answer: str


def fill(text: str, class_name: str) -> str:
    return text.format(class_name=class_name, CLASS_NAME=class_name.upper()).strip()


def _lookup(data: dict, dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def load_template(path: str | Path) -> dict[str, Any]:
    """Read and validate a template now, so that a typo fails at start-up and not mid-training."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt template not found: {path} (relative paths are read from the repo root)")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"prompt template {path}: expected a mapping of sections, got {type(data).__name__}")
    for key in REQUIRED_KEYS:
        value = _lookup(data, key)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"prompt template {path}: required key '{key}' is missing or not a non-empty string")
        try:
            fill(value, "x")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"prompt template {path}: section '{key}' has a bad placeholder ({exc!r}); "
                "only {class_name} and {CLASS_NAME} are allowed (write {{ }} for literal braces)"
            ) from None
    return data


def make_support_example(
    image: Tensor, gt: Tensor, class_index: int, class_name: str, template: dict
) -> SupportExample:
    """Build the support PR from the GT so that the template's ideal answer is literally true.

    The PR drops the left half of the object's bounding box and adds a small
    detached square in the bottom-right cell of the image, which is exactly what
    `support.answer` says.
    """
    obj = gt == class_index
    if not bool(obj.any()):
        raise ValueError(f"support image has no pixel of class {class_index} ({class_name})")
    h, w = obj.shape
    cols = torch.nonzero(obj.any(dim=0)).flatten()
    cut = (int(cols.min()) + int(cols.max()) + 1) // 2
    pr = obj.clone()
    pr[:, :cut] = False
    side = max(2, round(0.1 * min(h, w)))
    margin = max(1, round(0.04 * min(h, w)))
    y0, x0 = h - margin - side, w - margin - side
    halo = torch.nn.functional.max_pool2d(obj[None, None].float(), 3, stride=1, padding=1)[0, 0] > 0
    if bool(halo[y0 - 1 : h - margin + 1, x0 - 1 : w - margin + 1].any()):
        raise ValueError(
            f"support object ({class_name}) reaches the bottom-right corner, where the spurious "
            "square of the ideal answer goes; pick another support image"
        )
    pr[y0 : h - margin, x0 : w - margin] = True
    answer = fill(template["support"]["answer"], class_name)
    return SupportExample(image=image, gt_mask=obj, pr_mask=pr, class_name=class_name, answer=answer)


def synthetic_support(template: dict, size: int) -> SupportExample:
    """A drawn scene (shaded disk on a gradient) for when no dataset image is chosen as support."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    disk = (yy - 0.45) ** 2 + (xx - 0.42) ** 2 <= 0.22**2
    shade = 0.5 + 0.5 * torch.cos(6 * math.pi * (xx + yy))
    image = torch.stack([0.55 + 0.3 * yy, 0.7 - 0.2 * yy, 0.85 - 0.3 * yy])
    ball = torch.stack([0.8 + 0.15 * shade, 0.35 + 0.1 * shade, 0.2 + 0.05 * shade])
    image = torch.where(disk, ball, image).clamp(0, 1)
    gt = disk.long()
    return make_support_example(image, gt, 1, str(template["support"]["class_name"]), template)


def _message(role: str, text: str, images: list[Tensor] | None = None) -> dict:
    return {"role": role, "text": text, "images": images or []}


def build_messages(
    template: dict, request: "DescribeRequest", support: SupportExample | None, image_size: int
) -> list[dict]:
    """system (sections) -> user (support images) -> assistant (ideal answer) -> user (query images).

    The one-shot example is a real conversation turn so that the model sees the
    answer style as its own previous reply. Without a support example the prompt is zero-shot.
    """
    alpha = float(template.get("overlay_alpha", ALPHA))
    name = request.class_name
    system = "\n\n".join(fill(template[s], name) for s in SYSTEM_SECTIONS)
    messages = [_message("system", system)]
    if support is not None:
        img, gt, pr = resize_for_describer(
            support.image, support.gt_mask.long(), support.pr_mask.long(), image_size
        )
        shots = [mask_overlay(img, gt.bool(), alpha), mask_overlay(img, pr.bool(), alpha)]
        messages.append(_message("user", fill(template["support"]["intro"], support.class_name), shots))
        messages.append(_message("assistant", support.answer))
    img, gt, pr = resize_for_describer(request.image, request.gt, request.pr, image_size)
    query_images = list(class_overlays(img, gt, pr, request.class_index, alpha))
    messages.append(_message("user", fill(template["query"], name), query_images))
    return messages
