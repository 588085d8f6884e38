"""Mask-text cache: decides which (image, class) keys need a fresh description.

Describer calls (a VLM) bound training time, so a key is only re-described when
its predicted mask moved enough since the mask that was last described
(docs/method.md section 4). Masks are kept bit-packed so a cache over a whole
dataset at describer resolution stays a few MB in memory and on disk.

Two policies decide what "moved enough" means (`cache.policy`):

- `percentile` (default): the keys whose IoU lies in the lowest `q` quantile of
  the batch; the original's flaws are switchable through `cache.mode`
  (see `cache_from_settings`).
- `budget`: a key whose mask moved past a fixed threshold (IoU against the
  described mask below `redescribe_below_iou`), or whose description is
  `max_text_age_epochs` epochs old.

Either can be capped by a per-epoch call budget, in calls (`calls_per_epoch`)
or in calls per (image, class) pair planned (`calls_per_pair`): the cache never
plans more describer calls in an epoch than that, spends them on the keys that
moved most, and spreads them over the epoch.

Whatever the policy, a cached text is reused only while the mask it describes
stays close to the current one (`reuse_min_iou`): a policy that leaves a moved
key alone (the percentile keeps the batch's most-moved share; a budget defers)
would otherwise train on a text about a different mask. Such a key is described
again, or, when the budget forbids it, carries no text this step.
"""
from __future__ import annotations

import math
import os
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ttdl.core.io import load_torch, save_torch
from ttdl.core.settings import CacheSettings

FORMAT = "ttdl.mask_text_cache"
VERSION = 1  # later additions (epoch stamps, budget counters) are optional keys: older files still load

_MODES: dict[str, dict[str, Any]] = {
    "ours": {"skip_unchanged": True, "empty_vs_empty": 1.0, "reuse_cached_text": True},
    "original": {"skip_unchanged": False, "empty_vs_empty": 0.0, "reuse_cached_text": False},
}
POLICIES = ("percentile", "budget")
NEVER = 1 << 30  # the age of a key the cache has never seen (older than any max age)


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

    name = "percentile"

    def __init__(self, q: float = 0.4, skip_unchanged: bool = True) -> None:
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"percentile q must lie in [0, 1], got {q}")
        self.q = float(q)
        # The original's threshold becomes 1 once most masks are unchanged, so it then
        # re-described everything; excluding IoU == 1 keeps the cache useful.
        self.skip_unchanged = bool(skip_unchanged)

    def select(self, iou: torch.Tensor, age: torch.Tensor | None = None) -> torch.Tensor:
        """Which keys to describe; `age` (epochs since described) plays no part here."""
        if iou.numel() == 0:
            return torch.zeros(0, dtype=torch.bool, device=iou.device)
        iou = iou.float()
        tau = torch.quantile(iou, self.q, interpolation="linear")
        selected = iou <= tau
        if self.skip_unchanged:
            selected &= iou < 1.0
        return selected

    def settings(self) -> dict[str, Any]:
        return {"policy": self.name, "percentile": self.q, "skip_unchanged": self.skip_unchanged}


class BudgetPolicy:
    """Re-describe a key when its mask moved past a threshold or its description grew old.

    moved: IoU(described mask, current mask) < `below_iou` (a key never seen scores 0);
    old: described `max_age_epochs` or more epochs ago (None: never by age). So a text
    is used for at most `max_age_epochs` epochs, and a mask that drifts slowly is
    described again once it has drifted past the threshold in total, because the
    comparison is always against the mask that was described.
    """

    name = "budget"

    def __init__(self, below_iou: float = 0.8, max_age_epochs: int | None = None) -> None:
        if not 0.0 < below_iou <= 1.0:
            raise ValueError(f"redescribe_below_iou must lie in (0, 1], got {below_iou}")
        if max_age_epochs is not None and max_age_epochs < 1:
            raise ValueError(f"max_text_age_epochs must be at least 1 (or None), got {max_age_epochs}")
        self.below_iou = float(below_iou)
        self.max_age_epochs = None if max_age_epochs is None else int(max_age_epochs)

    def select(self, iou: torch.Tensor, age: torch.Tensor | None = None) -> torch.Tensor:
        selected = iou.float() < self.below_iou
        if self.max_age_epochs is not None and age is not None:
            selected |= age.to(iou.device) >= self.max_age_epochs
        return selected

    def settings(self) -> dict[str, Any]:
        return {"policy": self.name, "redescribe_below_iou": self.below_iou,
                "max_text_age_epochs": self.max_age_epochs}


@dataclass
class CachePlan:
    """What one step does with its candidate keys (positions index the batch's key list).

    `iou` and `age` are per position: the IoU of the current mask against the cached
    one (what the policy saw; for a reused key, how well its text's mask matches the
    mask trained on) and the epochs since the key was described or recorded
    (`NEVER` for a key the cache has not seen). `deferred`: positions the policy
    selected but the epoch's call budget did not allow (they reuse or skip).
    `stale`: positions whose cached text describes a mask with IoU below
    `reuse_min_iou` against the current one; they are never reused, so those not in
    `describe` are in `skipped` and carry no text this step (`withheld`).
    """

    describe: list[int]
    reuse: list[int]
    n_keys: int = 0
    n_unseen: int = 0
    skipped: list[int] = field(default_factory=list)
    deferred: list[int] = field(default_factory=list)
    iou: list[float] = field(default_factory=list)
    age: list[int] = field(default_factory=list)
    stale: list[int] = field(default_factory=list)

    @property
    def withheld(self) -> list[int]:
        """Stale positions not described now: they have a text but may not use it."""
        described = set(self.describe)
        return [i for i in self.stale if i not in described]

    @property
    def n_describe(self) -> int:
        return len(self.describe)

    @property
    def n_reuse(self) -> int:
        return len(self.reuse)

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)

    @property
    def n_deferred(self) -> int:
        return len(self.deferred)


def _pack(masks: torch.Tensor) -> list[np.ndarray]:
    """One packed uint8 row per mask; rows are copies so no batch buffer stays alive."""
    flat = masks.detach().to("cpu", torch.bool).flatten(1).numpy()  # flatten: also for K = 0
    packed = np.packbits(flat, axis=1)
    return [row.copy() for row in packed]


def _unpack(entry: tuple[np.ndarray, tuple[int, int]]) -> torch.Tensor:
    packed, (h, w) = entry
    return torch.from_numpy(np.unpackbits(packed, count=h * w).reshape(h, w).astype(bool))


def _check_masks(keys: list[str], masks: torch.Tensor) -> None:
    if masks.dtype != torch.bool or masks.dim() != 3:
        raise TypeError(f"masks must be a bool [K,H,W] tensor, got {masks.dtype} {tuple(masks.shape)}")
    if len(keys) != masks.shape[0]:
        raise ValueError(f"{len(keys)} keys but {masks.shape[0]} masks")


class MaskTextCache:
    """key -> (last described or recorded PR mask, its text or None, the epoch it was stored).

    Keys are `ttdl.text.textbatch.text_key`s: "{uid}-{c}", or "{uid}~flip-{c}" for
    the flipped view. Epochs: the caller says which epoch a plan belongs to
    (`plan(..., epoch=e)` or `start_epoch(e)`); without that the cache stays in the
    epoch it was last told (0 at first). They matter for `max_text_age_epochs` and
    for the budget, which is counted per epoch of this cache.

    The stored mask is what the policy compares against; the text may describe an
    older mask (a malformed answer or a prefill stores a new mask and keeps the
    text). For those keys the mask the text describes is kept as well, because
    reuse (`reuse_min_iou`) and the logged staleness must judge the text by the
    mask it was written for.
    """

    def __init__(
        self,
        policy: PercentilePolicy | BudgetPolicy,
        reuse_cached_text: bool = True,
        empty_vs_empty: float = 1.0,
        calls_per_epoch: int | None = None,
        calls_per_pair: float | None = None,
        reuse_min_iou: float = 0.0,
    ) -> None:
        if calls_per_epoch is not None and calls_per_epoch < 0:
            raise ValueError(f"calls_per_epoch must be >= 0 (or None), got {calls_per_epoch}")
        if calls_per_pair is not None and calls_per_pair < 0:
            raise ValueError(f"calls_per_pair must be >= 0 (or None), got {calls_per_pair}")
        self.policy = policy
        self.reuse_cached_text = bool(reuse_cached_text)
        self.empty_vs_empty = float(empty_vs_empty)
        self.calls_per_epoch = None if calls_per_epoch is None else int(calls_per_epoch)
        self.calls_per_pair = None if calls_per_pair is None else float(calls_per_pair)
        if not 0.0 <= reuse_min_iou <= 1.0:
            raise ValueError(f"reuse_min_iou must lie in [0, 1], got {reuse_min_iou}")
        self.reuse_min_iou = float(reuse_min_iou)  # 0: a cached text is reused however far its mask moved
        self._masks: dict[str, tuple[np.ndarray, tuple[int, int]]] = {}
        self._texts: dict[str, str] = {}
        # keys whose text describes another mask than the stored one -> the mask the text describes
        self._described: dict[str, tuple[np.ndarray, tuple[int, int]]] = {}
        self._stamps: dict[str, int] = {}  # epoch in which the stored mask was described or recorded
        self.provenance: dict[str, Any] = {}  # what produced the entries (ttdl.core.provenance.for_cache)
        self.epoch = 0
        self.epoch_calls = 0  # describer calls planned in this epoch (what the budget counts)
        self.epoch_pairs = 0  # keys planned in this epoch (paces the budget)
        self.last_epoch_pairs = 0  # keys planned in the previous epoch

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
        return None if entry is None else _unpack(entry)

    def text_mask(self, key: str) -> torch.Tensor | None:
        """The mask the key's cached text describes (None without a text); staleness is measured on it."""
        if key not in self._texts:
            return None
        return _unpack(self._described.get(key) or self._masks[key])

    def stamp(self, key: str) -> int | None:
        """The epoch in which the key's mask was last described or recorded."""
        return self._stamps.get(key) if key in self._masks else None

    # ---- epochs and the budget ------------------------------------------
    def start_epoch(self, epoch: int) -> None:
        """Enter `epoch` (a no-op if the cache is in it already): the epoch's budget starts afresh."""
        epoch = int(epoch)
        if epoch == self.epoch:
            return
        if self.epoch_pairs:
            self.last_epoch_pairs = self.epoch_pairs
        self.epoch, self.epoch_calls, self.epoch_pairs = epoch, 0, 0

    def budget_left(self) -> int | None:
        """Calls the epoch's `calls_per_epoch` still allows (None: no such cap)."""
        if self.calls_per_epoch is None:
            return None
        return max(0, self.calls_per_epoch - self.epoch_calls)

    def _allowance(self, n_keys: int) -> int | None:
        """Calls this plan may spend (None: no cap); the tighter of the two caps.

        calls_per_pair: the epoch's calls never pass that share of the keys planned in it
        so far, this plan's included (so the cap paces itself over the epoch).
        calls_per_epoch: the epoch's budget, paced by the share of the epoch's keys
        planned so far. The epoch's size in keys is what the previous epoch planned,
        or the number of keys the cache holds (a prefill records the whole split);
        while neither says more than the keys planned so far (a first epoch without
        prefill), the rest of the budget is available at once.
        """
        limits = []
        planned = self.epoch_pairs + n_keys
        if self.calls_per_pair is not None:
            limits.append(math.floor(self.calls_per_pair * planned + 1e-9) - self.epoch_calls)
        if self.calls_per_epoch is not None:
            expected = max(self.last_epoch_pairs, len(self._masks), 1)
            paced = math.ceil(self.calls_per_epoch * min(1.0, planned / expected) - 1e-9)
            limits.append(min(self.calls_per_epoch, paced) - self.epoch_calls)
        return max(0, min(limits)) if limits else None

    # ---- policy --------------------------------------------------------
    def _cached_iou(self, keys: list[str], masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """IoU against the cached masks and the ages in epochs; unseen keys (or a changed size) score 0, NEVER."""
        k, h, w = masks.shape
        iou = torch.zeros(k, device=masks.device)
        age = torch.full((k,), NEVER, dtype=torch.int64)
        seen = [i for i, key in enumerate(keys) if key in self._masks and self._masks[key][1] == (h, w)]
        if seen:
            rows = np.stack([self._masks[keys[i]][0] for i in seen])
            old = np.unpackbits(rows, axis=1, count=h * w).reshape(len(seen), h, w).astype(bool)
            idx = torch.tensor(seen, device=masks.device)
            old_t = torch.from_numpy(old).to(masks.device)
            iou[idx] = batch_iou(old_t, masks[idx], self.empty_vs_empty)
            age[seen] = torch.tensor([max(0, self.epoch - self._stamps.get(keys[i], 0)) for i in seen])
        return iou, age, k - len(seen)

    def _stale(self, keys: list[str], masks: torch.Tensor, iou: torch.Tensor) -> tuple[list[bool], list[bool]]:
        """Per key: its text describes a mask with IoU < reuse_min_iou against the current one (stale),
        and that text is not about the stored mask (diverged: the last description of the stored mask failed)."""
        k, h, w = masks.shape
        stale, diverged = [False] * k, [False] * k
        if not self.reuse_min_iou or not self.reuse_cached_text:  # nothing is reused: nothing is served stale
            return stale, diverged
        iou_list = iou.cpu().tolist()
        for i, key in enumerate(keys):
            if key not in self._texts:
                continue
            described = self._described.get(key)
            if described is None:
                text_iou = iou_list[i]
            else:
                diverged[i] = True
                text_iou = 0.0
                if described[1] == (h, w):
                    old = _unpack(described).to(masks.device)[None]
                    text_iou = float(batch_iou(old, masks[i:i + 1], self.empty_vs_empty)[0])
            stale[i] = text_iou < self.reuse_min_iou
        return stale, diverged

    def plan(self, keys: list[str], masks: torch.Tensor, epoch: int | None = None,
             exclude: Collection[str] | None = None) -> CachePlan:
        """Decide which keys to describe and which cached texts to reuse (the objective counts the calls).

        epoch: the training epoch this batch belongs to (None: the cache's current
        epoch, see `start_epoch`); ages and the per-epoch budget count in it.
        exclude: keys that must not be described now (e.g. already in flight); they
        reuse or skip like unselected keys and cost no budget. Every key of
        `describe` is charged to the epoch's budget here, at planning time.

        A key with a stale text (see `reuse_min_iou`) is described even when the policy
        leaves it alone; it competes for the budget like any other (its low IoU ranks
        it early). Not when its stored mask is not the text's (its description failed, or
        a prefill recorded it): asking again about that mask would most likely fail the
        same way, so it waits for its mask to move (the policy's call) and meanwhile
        carries no text.
        """
        _check_masks(keys, masks)
        if epoch is not None:
            self.start_epoch(epoch)
        iou, age, n_unseen = self._cached_iou(keys, masks)
        selected = self.policy.select(iou, age).cpu()
        stale, diverged = self._stale(keys, masks, iou)
        selected |= torch.tensor([s and not d for s, d in zip(stale, diverged)], dtype=torch.bool)
        if exclude:
            selected &= torch.tensor([key not in exclude for key in keys], dtype=torch.bool)
        candidates = selected.nonzero().flatten().tolist()
        allowance = self._allowance(len(keys))
        deferred: list[int] = []
        if allowance is not None and len(candidates) > allowance:
            # the budget goes to the keys that moved most, then to the oldest descriptions
            iou_list, age_list = iou.cpu().tolist(), age.tolist()
            ranked = sorted(candidates, key=lambda i: (iou_list[i], -age_list[i], i))
            keep = set(ranked[:allowance])
            deferred = [i for i in candidates if i not in keep]
            candidates = [i for i in candidates if i in keep]
        describe = candidates
        chosen = set(describe)
        rest = [i for i in range(len(keys)) if i not in chosen]
        if self.reuse_cached_text:
            reuse = [i for i in rest if keys[i] in self._texts and not stale[i]]
        else:  # original: keys not re-described drop out of the aux loss
            reuse = []
        reused = set(reuse)
        skipped = [i for i in rest if i not in reused]
        self.epoch_calls += len(describe)
        self.epoch_pairs += len(keys)
        return CachePlan(describe=describe, reuse=reuse, n_keys=len(keys), n_unseen=n_unseen, skipped=skipped,
                         deferred=deferred, iou=iou.cpu().tolist(), age=age.tolist(),
                         stale=[i for i, s in enumerate(stale) if s])

    # ---- updates -------------------------------------------------------
    def update(self, keys: list[str], masks: torch.Tensor, texts: list[str | None]) -> None:
        """Store the described masks and their texts (stamped with the cache's current epoch).

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
            if text is None:
                self._keep_described(key)
            else:
                self._texts[key] = text
                self._described.pop(key, None)
            self._masks[key] = (row, shape)
            self._stamps[key] = self.epoch

    def _keep_described(self, key: str) -> None:
        """Before the stored mask of a key with text is replaced without a new text: keep the text's mask."""
        if key in self._texts and key not in self._described:
            self._described[key] = self._masks[key]

    def record_masks(self, keys: list[str], masks: torch.Tensor) -> None:
        """Prefill: remember masks without describing them; existing texts stay."""
        _check_masks(keys, masks)
        shape = (int(masks.shape[1]), int(masks.shape[2]))
        for key, row in zip(keys, _pack(masks)):
            self._keep_described(key)
            self._masks[key] = (row, shape)
            self._stamps[key] = self.epoch

    # ---- logging -------------------------------------------------------
    def stats(self) -> dict[str, int]:
        return {"keys": len(self), "texts": len(self._texts)}

    # ---- persistence ---------------------------------------------------
    def settings(self) -> dict[str, Any]:
        return self.policy.settings() | {"empty_vs_empty": self.empty_vs_empty,
                                         "reuse_cached_text": self.reuse_cached_text,
                                         "calls_per_epoch": self.calls_per_epoch,
                                         "calls_per_pair": self.calls_per_pair,
                                         "reuse_min_iou": self.reuse_min_iou}

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors/lists/dicts only, so torch.load(weights_only=True) reads it.

        The policy settings are recorded for reference; `load_state_dict` does
        not apply them (the current run's config decides), `load` uses them as
        defaults. The epoch counters travel with the state, so a run resumed
        mid-epoch cannot spend that epoch's budget twice.
        """
        keys = list(self._masks)
        rows = [self._masks[k][0] for k in keys]
        packed = np.concatenate(rows) if rows else np.zeros(0, dtype=np.uint8)
        shapes = torch.tensor([list(self._masks[k][1]) for k in keys], dtype=torch.int64).reshape(-1, 2)
        described = list(self._described)
        return {
            "format": FORMAT,
            "version": VERSION,
            "keys": keys,
            "shapes": shapes,
            "packed": torch.from_numpy(packed),
            "texts": dict(self._texts),
            "stamps": torch.tensor([self._stamps.get(k, 0) for k in keys], dtype=torch.int64),
            "described": {  # the masks of texts that describe an older mask than the stored one
                "keys": described,
                "shapes": torch.tensor([list(self._described[k][1]) for k in described],
                                       dtype=torch.int64).reshape(-1, 2),
                "packed": torch.from_numpy(np.concatenate([self._described[k][0] for k in described])
                                           if described else np.zeros(0, dtype=np.uint8)),
            },
            "epoch_state": {"epoch": self.epoch, "calls": self.epoch_calls, "pairs": self.epoch_pairs,
                            "last_epoch_pairs": self.last_epoch_pairs},
            "config": self.settings(),
            "provenance": dict(self.provenance),
        }

    def load_state_dict(self, d: dict[str, Any], source: str = "state dict") -> None:
        """Replace the entries and the epoch counters; `source` names the file in errors.

        Files without epoch stamps (older caches) load with every entry stamped epoch 0;
        files without "described" masks take every text to describe its stored mask.
        """
        _check_state(d, source)
        keys: list[str] = list(d["keys"])
        shapes = d["shapes"].tolist()
        packed = d["packed"].numpy()
        stamps = d["stamps"].tolist() if "stamps" in d else [0] * len(keys)
        if len(stamps) != len(keys):
            raise ValueError(f"{source}: mask-text cache is inconsistent ({len(keys)} keys, {len(stamps)} stamps)")
        self._masks = _unpacked_entries(keys, shapes, packed, source)
        self._texts = {str(k): str(v) for k, v in d["texts"].items()}
        described = d.get("described") or {"keys": [], "shapes": torch.zeros(0, 2), "packed": torch.zeros(0)}
        self._described = {key: entry for key, entry in _unpacked_entries(
            list(described["keys"]), described["shapes"].tolist(), described["packed"].numpy(), source).items()
            if key in self._texts}
        self._stamps = {key: int(s) for key, s in zip(keys, stamps)}
        self.provenance = dict(d.get("provenance") or {})
        counters = d.get("epoch_state") or {}
        self.epoch = int(counters.get("epoch", 0))
        self.epoch_calls = int(counters.get("calls", 0))
        self.epoch_pairs = int(counters.get("pairs", 0))
        self.last_epoch_pairs = int(counters.get("last_epoch_pairs", 0))

    def save(self, path: str | os.PathLike) -> None:
        save_torch(path, self.state_dict())

    @classmethod
    def load(cls, path: str | os.PathLike, **kwargs: Any) -> MaskTextCache:
        """Load a saved cache; constructor kwargs override the settings stored in the file."""
        d = load_torch(path)
        _check_state(d, str(path))
        stored = d.get("config", {})
        if "policy" not in kwargs:
            if stored.get("policy", "percentile") == "budget":
                kwargs["policy"] = BudgetPolicy(stored["redescribe_below_iou"], stored.get("max_text_age_epochs"))
            else:
                kwargs["policy"] = PercentilePolicy(
                    q=stored.get("percentile", 0.4), skip_unchanged=stored.get("skip_unchanged", True)
                )
        kwargs.setdefault("reuse_cached_text", stored.get("reuse_cached_text", True))
        kwargs.setdefault("empty_vs_empty", stored.get("empty_vs_empty", 1.0))
        kwargs.setdefault("calls_per_epoch", stored.get("calls_per_epoch"))
        kwargs.setdefault("calls_per_pair", stored.get("calls_per_pair"))
        kwargs.setdefault("reuse_min_iou", stored.get("reuse_min_iou", 0.0))
        cache = cls(**kwargs)
        cache.load_state_dict(d, source=str(path))
        return cache


def _unpacked_entries(keys: list[str], shapes: list[list[int]], packed: np.ndarray,
                      source: str) -> dict[str, tuple[np.ndarray, tuple[int, int]]]:
    """Split a state's concatenated packed masks into one entry per key."""
    sizes = [(int(h) * int(w) + 7) // 8 for h, w in shapes]
    if len(shapes) != len(keys) or sum(sizes) != packed.size:
        raise ValueError(f"{source}: mask-text cache is inconsistent ({len(keys)} keys, "
                         f"{len(shapes)} shapes, {packed.size} packed bytes)")
    entries: dict[str, tuple[np.ndarray, tuple[int, int]]] = {}
    offset = 0
    for key, (h, w), n in zip(keys, shapes, sizes):
        entries[key] = (packed[offset:offset + n].copy(), (int(h), int(w)))
        offset += n
    return entries


def _check_state(d: Any, source: str) -> None:
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise ValueError(f"{source}: not a mask-text cache (missing format tag {FORMAT!r})")
    if d.get("version") != VERSION:
        raise ValueError(f"{source}: unsupported mask-text cache version {d.get('version')!r} "
                         f"(this code reads version {VERSION})")


def cache_from_settings(settings: CacheSettings) -> MaskTextCache:
    """Build the cache from its settings.

    `mode` picks the flags (skip_unchanged, empty_vs_empty, reuse_cached_text),
    explicit keys override them; `policy` picks percentile or budget; the call
    budgets (calls_per_epoch, calls_per_pair) and `reuse_min_iou` apply to either.
    """
    opts = dict(_MODES[settings.mode])
    for name in opts:
        if getattr(settings, name) is not None:
            opts[name] = getattr(settings, name)
    if settings.policy == "budget":
        policy: PercentilePolicy | BudgetPolicy = BudgetPolicy(settings.redescribe_below_iou,
                                                               settings.max_text_age_epochs)
    elif settings.policy == "percentile":
        policy = PercentilePolicy(q=settings.percentile, skip_unchanged=bool(opts["skip_unchanged"]))
    else:
        raise ValueError(f"unknown cache policy {settings.policy!r}; known: {', '.join(POLICIES)}")
    return MaskTextCache(
        policy,
        reuse_cached_text=bool(opts["reuse_cached_text"]),
        empty_vs_empty=float(opts["empty_vs_empty"]),
        calls_per_epoch=settings.calls_per_epoch,
        calls_per_pair=settings.calls_per_pair,
        reuse_min_iou=settings.reuse_min_iou,
    )
