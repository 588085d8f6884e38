"""Mask-text cache: decides which (image, class) keys need a fresh description.

Describer calls (a VLM) bound training time, so a key is only re-described when
its predicted mask moved enough since the mask that was last described
(docs/method.md section 4). Masks are kept bit-packed so a cache over a whole
dataset at describer resolution stays a few MB in memory and on disk.

Seed behaviour and our fixes are switchable: see `cache_from_config`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ttdl.core.io import load_torch, save_torch
from ttdl.core.settings import CacheSettings

FORMAT = "ttdl.mask_text_cache"
VERSION = 1

_MODES: dict[str, dict[str, Any]] = {
    "ours": {"skip_unchanged": True, "empty_vs_empty": 1.0, "reuse_cached_text": True},
    "original": {"skip_unchanged": False, "empty_vs_empty": 0.0, "reuse_cached_text": False},
}


def batch_iou(old: torch.Tensor, new: torch.Tensor, empty_vs_empty: float) -> torch.Tensor:
    """IoU per mask pair; `empty_vs_empty` is the score of two empty masks.

    1.0 says "unchanged" (our default); 0.0 is the original's, which thereby
    re-described classes the model never predicts at every step.
    """
    if old.shape != new.shape or old.dim() != 3:
        raise ValueError(f"expected two [K,H,W] masks of equal shape, got {tuple(old.shape)} and {tuple(new.shape)}")
    old, new = old.bool().flatten(1), new.bool().flatten(1)
    inter = (old & new).sum(1)
    union = (old | new).sum(1)
    iou = inter.double() / union.clamp(min=1).double()
    return torch.where(union > 0, iou, torch.full_like(iou, float(empty_vs_empty))).float()


class PercentilePolicy:
    """Re-describe the keys whose IoU lies in the lowest `q` quantile of the batch."""

    def __init__(self, q: float = 0.4, skip_unchanged: bool = True) -> None:
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"percentile q must lie in [0, 1], got {q}")
        self.q = float(q)
        # The original's threshold becomes 1 once most masks are unchanged, so it then
        # re-described everything; excluding IoU == 1 keeps the cache useful.
        self.skip_unchanged = bool(skip_unchanged)

    def select(self, iou: torch.Tensor) -> torch.Tensor:
        if iou.numel() == 0:
            return torch.zeros(0, dtype=torch.bool, device=iou.device)
        iou = iou.float()
        tau = torch.quantile(iou, self.q, interpolation="linear")
        selected = iou <= tau
        if self.skip_unchanged:
            selected &= iou < 1.0
        return selected


@dataclass
class CachePlan:
    """What one step does with its candidate keys (positions index the batch's key list)."""

    describe: list[int]
    reuse: list[int]
    n_keys: int = 0
    n_unseen: int = 0
    skipped: list[int] = field(default_factory=list)

    @property
    def n_describe(self) -> int:
        return len(self.describe)

    @property
    def n_reuse(self) -> int:
        return len(self.reuse)

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)


def _pack(masks: torch.Tensor) -> list[np.ndarray]:
    """One packed uint8 row per mask; rows are copies so no batch buffer stays alive."""
    flat = masks.detach().to("cpu", torch.bool).reshape(masks.shape[0], -1).numpy()
    packed = np.packbits(flat, axis=1)
    return [row.copy() for row in packed]


def _check_masks(keys: list[str], masks: torch.Tensor) -> None:
    if masks.dtype != torch.bool or masks.dim() != 3:
        raise TypeError(f"masks must be a bool [K,H,W] tensor, got {masks.dtype} {tuple(masks.shape)}")
    if len(keys) != masks.shape[0]:
        raise ValueError(f"{len(keys)} keys but {masks.shape[0]} masks")


class MaskTextCache:
    """key "{uid}-{c}" -> (last described or recorded PR mask, its text or None)."""

    def __init__(
        self,
        policy: PercentilePolicy,
        reuse_cached_text: bool = True,
        empty_vs_empty: float = 1.0,
    ) -> None:
        self.policy = policy
        self.reuse_cached_text = bool(reuse_cached_text)
        self.empty_vs_empty = float(empty_vs_empty)
        self._masks: dict[str, tuple[np.ndarray, tuple[int, int]]] = {}
        self._texts: dict[str, str] = {}

    # ---- lookups -------------------------------------------------------
    def __len__(self) -> int:
        return len(self._masks)

    def __contains__(self, key: object) -> bool:
        return key in self._masks

    def text(self, key: str) -> str | None:
        return self._texts.get(key)

    def mask(self, key: str) -> torch.Tensor | None:
        """Unpacked cached mask (for inspection and tests)."""
        entry = self._masks.get(key)
        if entry is None:
            return None
        packed, (h, w) = entry
        return torch.from_numpy(np.unpackbits(packed, count=h * w).reshape(h, w).astype(bool))

    # ---- policy --------------------------------------------------------
    def _cached_iou(self, keys: list[str], masks: torch.Tensor) -> tuple[torch.Tensor, int]:
        """IoU against the cached masks; unseen keys (or a changed mask size) score 0."""
        k, h, w = masks.shape
        iou = torch.zeros(k, device=masks.device)
        seen = [i for i, key in enumerate(keys) if key in self._masks and self._masks[key][1] == (h, w)]
        if seen:
            rows = np.stack([self._masks[keys[i]][0] for i in seen])
            old = np.unpackbits(rows, axis=1, count=h * w).reshape(len(seen), h, w).astype(bool)
            idx = torch.tensor(seen, device=masks.device)
            old_t = torch.from_numpy(old).to(masks.device)
            iou[idx] = batch_iou(old_t, masks[idx], self.empty_vs_empty)
        return iou, k - len(seen)

    def plan(self, keys: list[str], masks: torch.Tensor) -> CachePlan:
        """Decide which keys to describe and which cached texts to reuse (the objective counts the calls)."""
        _check_masks(keys, masks)
        iou, n_unseen = self._cached_iou(keys, masks)
        selected = self.policy.select(iou).tolist()
        describe = [i for i, s in enumerate(selected) if s]
        rest = [i for i, s in enumerate(selected) if not s]
        if self.reuse_cached_text:
            reuse = [i for i in rest if keys[i] in self._texts]
        else:  # original: keys not re-described drop out of the aux loss
            reuse = []
        reused = set(reuse)
        skipped = [i for i in rest if i not in reused]
        return CachePlan(describe=describe, reuse=reuse, n_keys=len(keys), n_unseen=n_unseen, skipped=skipped)

    # ---- updates -------------------------------------------------------
    def update(self, keys: list[str], masks: torch.Tensor, texts: list[str | None]) -> None:
        """Store the described masks and their texts.

        A None text (describer failed or answered malformed) still stores the
        mask but keeps the previous text: retrying the same mask every step
        would mostly repeat a deterministic failure and cost a call each time,
        while the previous text is still the best description we have. The key
        is re-described once its mask moves again.
        """
        _check_masks(keys, masks)
        if len(texts) != len(keys):
            raise ValueError(f"{len(keys)} keys but {len(texts)} texts")
        shape = (int(masks.shape[1]), int(masks.shape[2]))
        for key, row, text in zip(keys, _pack(masks), texts):
            self._masks[key] = (row, shape)
            if text is not None:
                self._texts[key] = text

    def record_masks(self, keys: list[str], masks: torch.Tensor) -> None:
        """Prefill: remember masks without describing them; existing texts stay."""
        _check_masks(keys, masks)
        shape = (int(masks.shape[1]), int(masks.shape[2]))
        for key, row in zip(keys, _pack(masks)):
            self._masks[key] = (row, shape)

    # ---- logging -------------------------------------------------------
    def stats(self) -> dict[str, int]:
        return {"keys": len(self), "texts": len(self._texts)}

    # ---- persistence ---------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain tensors/lists/dicts only, so torch.load(weights_only=True) reads it.

        The policy settings are recorded for reference; `load_state_dict` does
        not apply them (the current run's config decides), `load` uses them as
        defaults.
        """
        keys = list(self._masks)
        rows = [self._masks[k][0] for k in keys]
        packed = np.concatenate(rows) if rows else np.zeros(0, dtype=np.uint8)
        shapes = torch.tensor([list(self._masks[k][1]) for k in keys], dtype=torch.int64).reshape(-1, 2)
        return {
            "format": FORMAT,
            "version": VERSION,
            "keys": keys,
            "shapes": shapes,
            "packed": torch.from_numpy(packed),
            "texts": dict(self._texts),
            "config": {
                "percentile": self.policy.q,
                "skip_unchanged": self.policy.skip_unchanged,
                "empty_vs_empty": self.empty_vs_empty,
                "reuse_cached_text": self.reuse_cached_text,
            },
        }

    def load_state_dict(self, d: dict[str, Any], source: str = "state dict") -> None:
        """Replace the entries; `source` names the file in errors."""
        _check_state(d, source)
        keys: list[str] = list(d["keys"])
        shapes = d["shapes"].tolist()
        packed = d["packed"].numpy()
        sizes = [(h * w + 7) // 8 for h, w in shapes]
        if len(shapes) != len(keys) or sum(sizes) != packed.size:
            raise ValueError(f"{source}: mask-text cache is inconsistent ({len(keys)} keys, "
                             f"{len(shapes)} shapes, {packed.size} packed bytes)")
        masks: dict[str, tuple[np.ndarray, tuple[int, int]]] = {}
        offset = 0
        for key, (h, w), n in zip(keys, shapes, sizes):
            masks[key] = (packed[offset:offset + n].copy(), (int(h), int(w)))
            offset += n
        self._masks = masks
        self._texts = {str(k): str(v) for k, v in d["texts"].items()}

    def save(self, path: str | os.PathLike) -> None:
        save_torch(path, self.state_dict())

    @classmethod
    def load(cls, path: str | os.PathLike, **kwargs: Any) -> MaskTextCache:
        """Load a saved cache; constructor kwargs override the settings stored in the file."""
        d = load_torch(path)
        _check_state(d, str(path))
        stored = d.get("config", {})
        if "policy" not in kwargs:
            kwargs["policy"] = PercentilePolicy(
                q=stored.get("percentile", 0.4), skip_unchanged=stored.get("skip_unchanged", True)
            )
        kwargs.setdefault("reuse_cached_text", stored.get("reuse_cached_text", True))
        kwargs.setdefault("empty_vs_empty", stored.get("empty_vs_empty", 1.0))
        cache = cls(**kwargs)
        cache.load_state_dict(d, source=str(path))
        return cache


def _check_state(d: Any, source: str) -> None:
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise ValueError(f"{source}: not a mask-text cache (missing format tag {FORMAT!r})")
    if d.get("version") != VERSION:
        raise ValueError(f"{source}: unsupported mask-text cache version {d.get('version')!r} "
                         f"(this code reads version {VERSION})")


def cache_from_settings(settings: CacheSettings) -> MaskTextCache:
    """Build the cache from its settings; `mode` picks the policy's flags, explicit keys override them."""
    opts = dict(_MODES[settings.mode])
    for name in opts:
        if getattr(settings, name) is not None:
            opts[name] = getattr(settings, name)
    policy = PercentilePolicy(q=settings.percentile, skip_unchanged=bool(opts["skip_unchanged"]))
    return MaskTextCache(
        policy,
        reuse_cached_text=bool(opts["reuse_cached_text"]),
        empty_vs_empty=float(opts["empty_vs_empty"]),
    )
