"""Training objectives: what a step's loss is, chosen by name from the run's settings.

The training loop knows one contract (`Objective`): called with the step's
tensors, an objective returns the *mixed* loss and its logs, and it owns its
state, epoch logs, aux-head carry-over, cache and resources. A CE-only run gets
`CrossEntropyOnly`, so the loop never asks which kind of run it is.

Every text objective shares one pipeline (docs/method.md §2): significant
(image, class) pairs -> texts (describer through the mask-text cache, synthetic
templates, or a control) -> frozen text embeddings -> an experiment-specific
loss head (ttdl.text.heads).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ttdl.core.io import load_torch
from ttdl.core.losses import mix_losses
from ttdl.core.settings import RunSettings
from ttdl.text.cache import MaskTextCache, cache_from_settings
from ttdl.text.describers import describer_for_run
from ttdl.text.encoders import build_encoder
from ttdl.text.heads import HEADS, HeadContext
from ttdl.text.synthetic_text import synthetic_descriptions
from ttdl.text.textbatch import TextBatch, build_text_batch


@dataclass
class StepTensors:
    """What the loop hands an objective each step (all on the training device)."""

    batch: dict
    images: Tensor
    masks: Tensor
    logits: Tensor
    bottleneck: Tensor
    pixel_ce: Tensor
    valid: Tensor
    ce: Tensor


class CrossEntropyOnly(nn.Module):
    """The null objective of CE-only runs: the loss is CE, and there is nothing else to keep."""

    def forward(self, step: StepTensors) -> tuple[Tensor, dict]:
        return step.ce, {}

    def carry_over_head(self, head_state: dict | None, source: str, log) -> None:
        return None

    def aux_head_state(self) -> dict:
        return {}

    def start_epoch(self, epoch: int) -> None:
        return None

    def epoch_logs(self) -> dict:
        return {}

    def validation_logs(self, model, loader, device, amp_dtype) -> dict:
        return {}

    def summary(self) -> dict:
        return {}

    def state_dict_full(self) -> dict:
        return {}

    def load_state_dict_full(self, state: dict) -> None:
        return None

    def save_outputs(self, out_dir: Path) -> None:
        return None

    def close(self) -> None:
        return None


@dataclass
class TextItems:
    """The texts of one step: pair positions with their text; `fresh` marks describer output."""

    positions: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    fresh: list[bool] = field(default_factory=list)


@dataclass
class Counters:
    """The one count of describer traffic and text use (per epoch and per run; saved with the state)."""

    pairs: int = 0
    calls: int = 0
    reused: int = 0
    malformed: int = 0
    latency_s: float = 0.0
    texts: int = 0

    def add(self, other: "Counters") -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def as_logs(self, prefix: str = "") -> dict:
        hit = 1.0 - self.calls / self.pairs if self.pairs else 0.0
        return {f"{prefix}describer_calls": self.calls, f"{prefix}cache_hit_rate": round(hit, 4),
                f"{prefix}malformed": self.malformed, f"{prefix}texts": self.texts,
                f"{prefix}describer_latency_s": round(self.latency_s, 3)}


# ---- text sources --------------------------------------------------------------------

class DescriberTexts:
    """Texts from the describer, through the mask-text cache (docs/method.md §4)."""

    def __init__(self, describer, cache: MaskTextCache, class_names: list[str]):
        self.describer, self.cache, self.class_names = describer, cache, class_names

    def __call__(self, tb: TextBatch, counters: Counters) -> TextItems:
        masks = tb.pr_masks()
        plan = self.cache.plan(tb.keys, masks)
        items = TextItems()
        if plan.describe:
            started = time.monotonic()
            answers = self.describer.describe(tb.requests(plan.describe, self.class_names))
            counters.latency_s += time.monotonic() - started
            self.cache.update([tb.keys[p] for p in plan.describe], masks[plan.describe], answers)
            for position, text in zip(plan.describe, answers):
                if text is None:
                    counters.malformed += 1  # counted and skipped, never trained on
                    continue
                items.positions.append(position)
                items.texts.append(text)
                items.fresh.append(True)
        for position in plan.reuse:
            items.positions.append(position)
            items.texts.append(self.cache.text(tb.keys[position]))
            items.fresh.append(False)
        counters.calls += len(plan.describe)
        counters.reused += len(plan.reuse)
        return items


class SyntheticTexts:
    """Template text from which of TP/TN/FP/FN exist (3.1 phase 2); no describer calls."""

    def __init__(self, class_names: list[str], ignore_index: int):
        self.class_names, self.ignore_index = class_names, ignore_index

    def __call__(self, tb: TextBatch, counters: Counters) -> TextItems:
        pairs = list(zip(tb.rows, tb.classes))
        texts = synthetic_descriptions(tb.gt, tb.pr, pairs, self.class_names, self.ignore_index)
        return TextItems(list(range(len(pairs))), texts, [True] * len(pairs))


class ClassNameTexts:
    """Control: a text that names the class and diagnoses nothing."""

    TEMPLATE = "a photo region of {name}"

    def __init__(self, class_names: list[str]):
        self.class_names = class_names

    def __call__(self, tb: TextBatch, counters: Counters) -> TextItems:
        texts = [self.TEMPLATE.format(name=self.class_names[c]) for c in tb.classes]
        return TextItems(list(range(len(texts))), texts, [True] * len(texts))


def shuffle_texts(items: TextItems, generator: torch.Generator) -> TextItems:
    """Control: each text moves to a random other pair of the step (a cyclic shift of a random order)."""
    n = len(items.texts)
    if n < 2:
        return items
    order = torch.randperm(n, generator=generator).tolist()
    moved = list(items.texts)
    for i in range(n):
        moved[order[i]] = items.texts[order[(i + 1) % n]]
    return TextItems(items.positions, moved, items.fresh)


# ---- the text objective ---------------------------------------------------------------

class TextObjective(nn.Module):
    """CE mixed with an auxiliary loss computed from texts about the current predictions."""

    def __init__(self, run: RunSettings, head: nn.Module, source, encoder, cache: MaskTextCache | None,
                 describer, num_classes: int, ignore_index: int, val_source=None, val_cache=None):
        super().__init__()
        self.cfg, self.head = run.objective, head
        self.source, self.val_source, self.val_cache = source, val_source or source, val_cache
        self.encoder, self.cache, self.describer = [encoder], cache, describer  # encoder: frozen, not saved
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.describer_size = run.describer.image_size
        self.epoch_counters, self.total = Counters(), Counters()
        self.shuffle_generator = torch.Generator().manual_seed(run.train.seed)

    def _aux(self, uids, images, masks, logits, bottleneck, pixel_ce, valid, source, shuffle: bool):
        pr = logits.detach().argmax(1)
        tb = build_text_batch(list(uids), images, masks, pr, size=self.describer_size,
                              num_classes=self.num_classes, ignore_index=self.ignore_index,
                              include_predicted=self.cfg.include_predicted_classes)
        step = Counters(pairs=len(tb.keys))
        items = source(tb, step)
        if shuffle:
            items = shuffle_texts(items, self.shuffle_generator)
        step.texts = len(items.texts)
        encoder = self.encoder[0]
        if items.texts:
            with torch.no_grad():
                emb = encoder.encode_text(items.texts).float().to(bottleneck.device)
        else:
            emb = torch.zeros((0, encoder.embed_dim), device=bottleneck.device)
        aux = self.head(tb=tb, items=items, emb=emb, bottleneck=bottleneck, pixel_ce=pixel_ce, valid=valid)
        return aux, step

    def forward(self, s: StepTensors) -> tuple[Tensor, dict]:
        aux, step = self._aux(s.batch["uid"], s.images, s.masks, s.logits, s.bottleneck, s.pixel_ce, s.valid,
                              self.source, self.cfg.shuffle_texts)
        self.epoch_counters.add(step)
        self.total.add(step)
        loss = mix_losses(s.ce, aux, self.cfg.lambda_, self.cfg.mix)
        logs = {"aux": aux.item(), "aux_ce_ratio": aux.item() / max(s.ce.item(), 1e-12)}
        return loss, logs | {f"text/{key}": value for key, value in step.as_logs().items()}

    # -- the aux head travels with the weights (3.1 phase 2 -> finetune) --
    def carry_over_head(self, head_state: dict | None, source: str, log) -> None:
        """Start from the init run's trained aux head when it has the same shape."""
        if not head_state:
            return
        own = self.head.state_dict()
        if own.keys() == head_state.keys() and all(own[k].shape == head_state[k].shape for k in own):
            self.head.load_state_dict(head_state)
            log(f"aux head initialised from {source}")

    def aux_head_state(self) -> dict:
        return self.head.state_dict()

    # -- epochs and validation --
    def start_epoch(self, epoch: int) -> None:
        self.epoch_counters = Counters()

    def epoch_logs(self) -> dict:
        logs = self.epoch_counters.as_logs()
        return logs if self.cache is not None else {k: v for k, v in logs.items() if k != "cache_hit_rate"}

    @torch.no_grad()
    def validation_logs(self, model, loader, device, amp_dtype) -> dict:
        """Aux loss on the val split (3.5's contrastive validation), through its own cache.

        The original re-described the whole validation set every epoch; here
        unchanged val masks keep their cached text, so later epochs cost few calls.
        """
        if not self.cfg.contrastive_validation:
            return {}
        model.eval()
        total, batches, counters = 0.0, 0, Counters()
        for batch in loader:
            images, masks = batch["image"].to(device), batch["mask"].to(device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits, bottleneck = model(images)
            pixel_ce = F.cross_entropy(logits.float(), masks, ignore_index=self.ignore_index, reduction="none")
            aux, step = self._aux(batch["uid"], images, masks, logits, bottleneck, pixel_ce,
                                  masks != self.ignore_index, self.val_source, shuffle=False)
            total += aux.item()
            batches += 1
            counters.add(step)
        logs = counters.as_logs("val_")
        return {"val_aux": total / max(batches, 1), "val_describer_calls": logs["val_describer_calls"],
                "val_cache_hit_rate": logs["val_cache_hit_rate"]}

    # -- outputs, state and resources --
    def summary(self) -> dict:
        logs = self.total.as_logs()
        if self.cache is None:  # synthetic or class-name text: no describer, no cache to hit
            logs["cache_hit_rate"] = None
        return logs | {"objective": self.cfg.name, "text_source": self.cfg.text,
                       "describer": self.describer.__class__.__name__ if self.describer else None}

    def state_dict_full(self) -> dict:
        """Everything a resumed run needs, the running epoch's counters included (metrics.csv stays exact)."""
        def plain(counters: Counters) -> dict:
            return {name: getattr(counters, name) for name in Counters.__dataclass_fields__}

        return {"head": self.head.state_dict(), "total": plain(self.total), "epoch": plain(self.epoch_counters),
                "shuffle_rng": self.shuffle_generator.get_state(),
                "cache": self.cache.state_dict() if self.cache is not None else None,
                "val_cache": self.val_cache.state_dict() if self.val_cache is not None else None}

    def load_state_dict_full(self, state: dict) -> None:
        self.head.load_state_dict(state["head"])
        self.total = Counters(**state["total"])
        self.epoch_counters = Counters(**state["epoch"])
        self.shuffle_generator.set_state(state["shuffle_rng"])
        if self.cache is not None and state["cache"] is not None:
            self.cache.load_state_dict(state["cache"], source="training state")
        if self.val_cache is not None and state.get("val_cache") is not None:
            self.val_cache.load_state_dict(state["val_cache"], source="training state")

    def save_outputs(self, out_dir: Path) -> None:
        if self.cache is not None:
            self.cache.save(Path(out_dir) / "cache" / "cache.pt")

    def close(self) -> None:
        if self.describer is not None:
            self.describer.close()


# ---- building ------------------------------------------------------------------------

def build_objective(run: RunSettings, *, class_names: list[str], ignore_index: int, device: torch.device,
                    bottleneck_channels: int, support_dataset: Any = None, cache_path: str | None = None,
                    encoder_path: str | None = None, concat_path: str | None = None) -> nn.Module:
    """The run's objective, from explicit facts about the run (never from the trainer)."""
    cfg = run.objective
    if not cfg.uses_text:
        return CrossEntropyOnly()
    if cfg.name not in HEADS:
        raise ValueError(f"unknown objective {cfg.name!r}; known: none, {', '.join(HEADS)}")
    encoder = build_encoder(run.encoder, adapted_path=encoder_path).to(device).eval()
    encoder.requires_grad_(False)
    cache = describer = val_cache = val_source = None
    if cfg.text == "describer":
        cache = cache_from_settings(run.cache)
        if cache_path:
            cache.load_state_dict(load_torch(cache_path), source=cache_path)
        describer = describer_for_run(run.describer, class_names, support_dataset)
        source = DescriberTexts(describer, cache, class_names)
        if cfg.contrastive_validation:
            val_cache = cache_from_settings(run.cache)
            val_source = DescriberTexts(describer, val_cache, class_names)
    elif cfg.text == "class_name":
        source = ClassNameTexts(class_names)
    else:
        source = SyntheticTexts(class_names, ignore_index)
    context = HeadContext(text_dim=encoder.embed_dim, bottleneck_dim=bottleneck_channels, encoder=encoder,
                          class_names=list(class_names), negatives_seed=run.train.seed,
                          concat_adapter_path=concat_path)
    head = HEADS[cfg.name](cfg, context)
    objective = TextObjective(run, head, source, encoder, cache, describer, len(class_names), ignore_index,
                              val_source, val_cache)
    return objective.to(device)
