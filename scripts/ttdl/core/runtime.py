"""Where and how a job computes: device choice, autocast dtype, progress bars.

Shared by every job that runs the model (training, evaluation, prefill, adaptation).
"""
from __future__ import annotations

import sys

import torch
from tqdm import tqdm

# train.amp: "auto" picks bf16 on CUDA and no autocast on the CPU; the others name the dtype.
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
AMP_MODES = ("auto", *AUTOCAST_DTYPES)
DEVICES = ("auto", "cpu", "cuda")  # train.device


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "off"
    return AUTOCAST_DTYPES[amp]


def progress_bar(enabled: bool):
    def wrap(iterable, **kwargs):
        interactive = sys.stderr.isatty()
        return tqdm(iterable, disable=not enabled, dynamic_ncols=True, leave=False,
                    mininterval=0.5 if interactive else 30.0, **kwargs)
    return wrap
