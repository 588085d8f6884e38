"""Overlay images shown to describers and to the image tower of the text encoder.

A describer (or CLIP-like image encoder) never sees a raw mask: it sees the photo
blended with a binary mask rendered white on black, so that the object stays
recognisable while the region of interest stands out. Every function accepts a
single image [3,H,W] or a batch [N,3,H,W] (masks [H,W] / [N,H,W]).
"""
from __future__ import annotations

import base64
import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

VOID = 255
ALPHA = 0.6  # the photo's share of an overlay (a prompt template may set its own `overlay_alpha`)


def mask_overlay(image: Tensor, binary_mask: Tensor, alpha: float = ALPHA) -> Tensor:
    """Blend the photo with the mask drawn white (1) on black (0).

    out = alpha * image + (1 - alpha) * m, with m = 1 on the mask and 0 elsewhere,
    broadcast over the three channels; the result stays in [0, 1].
    """
    m = binary_mask.to(image.dtype).unsqueeze(-3)
    return alpha * image + (1.0 - alpha) * m


def difference_mask(gt: Tensor, pr: Tensor, class_index: int, void: int = VOID) -> Tensor:
    """(GT==c) XOR (PR==c) with void pixels forced to False: where the prediction is wrong for c."""
    return ((gt == class_index) ^ (pr == class_index)) & (gt != void)


def difference_overlay(
    image: Tensor, gt: Tensor, pr: Tensor, class_index: int, alpha: float = ALPHA, void: int = VOID
) -> Tensor:
    """The photo with the wrongly predicted pixels of class c in white (same blend as mask_overlay)."""
    return mask_overlay(image, difference_mask(gt, pr, class_index, void), alpha)


def class_overlays(
    image: Tensor, gt: Tensor, pr: Tensor, class_index: int, alpha: float = ALPHA
) -> tuple[Tensor, Tensor]:
    """The (GT overlay, PR overlay) pair of docs/method.md section 5 for one class."""
    return (
        mask_overlay(image, gt == class_index, alpha),
        mask_overlay(image, pr == class_index, alpha),
    )


def resize_for_describer(
    image: Tensor, gt: Tensor, pr: Tensor, size: int | tuple[int, int]
) -> tuple[Tensor, Tensor, Tensor]:
    """Downsample to describer size: bilinear (antialiased) photo, nearest masks so ids stay exact."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    single = image.dim() == 3
    img = image.unsqueeze(0) if single else image
    if tuple(img.shape[-2:]) != hw:
        img = F.interpolate(img.float(), size=hw, mode="bilinear", align_corners=False, antialias=True)
        img = img.clamp(0.0, 1.0)
    masks = []
    for m in (gt, pr):
        mm = m.unsqueeze(0) if single else m
        if tuple(mm.shape[-2:]) != hw:
            mm = F.interpolate(mm.unsqueeze(1).float(), size=hw, mode="nearest-exact").squeeze(1)
            mm = mm.round().to(m.dtype)
        masks.append(mm[0] if single else mm)
    return (img[0] if single else img), masks[0], masks[1]


def to_uint8_hwc(image: Tensor) -> np.ndarray:
    """[3,H,W] float in [0,1] -> HxWx3 uint8 (what PIL and PNG want)."""
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an image of shape [3,H,W], got {tuple(image.shape)}")
    arr = (image.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8)
    return arr.permute(1, 2, 0).cpu().numpy()


def png_bytes_uint8(pixels: np.ndarray) -> bytes:
    """PNG of an HxWx3 uint8 array, at its own size (lossless; zlib's default level)."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def to_png_bytes(image: Tensor) -> bytes:
    return png_bytes_uint8(to_uint8_hwc(image))


def to_base64_png(image: Tensor) -> str:
    """Bare base64 PNG, the form Ollama's native API expects."""
    return base64.b64encode(to_png_bytes(image)).decode("ascii")


def to_data_url(image: Tensor) -> str:
    """data: URL, the form OpenAI-compatible servers expect in image_url parts."""
    return "data:image/png;base64," + to_base64_png(image)
