"""Auxiliary text objectives, chosen by name from the run's config.

Every objective shares one pipeline (method.md §2): significant (image, class)
pairs -> texts (from the describer through the mask-text cache, or synthetic
templates) -> frozen text embeddings -> an experiment-specific loss head. The
training loop only sees `objective(...) -> (aux, logs)`; it never asks which
experiment it runs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .cache import MaskTextCache, cache_from_config
from .describers import build_describer
from .describers.prompt import make_support_example, load_template
from .encoders import build_encoder
from .io import load_torch
from .heads import HEADS
from .synthetic_text import synthetic_descriptions
from .textbatch import TextBatch, build_text_batch

ENCODER_KEYS_OURS = ("adapted_by",)  # workflow-level keys, not passed to build_encoder


@dataclass
class TextItems:
    """The texts of one step: pair positions with their text; `fresh` marks describer output."""

    positions: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    fresh: list[bool] = field(default_factory=list)


@dataclass
class Counters:
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
    """Texts from the describer, through the mask-text cache (method.md §4)."""

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


# ---- the objective -------------------------------------------------------------------

class TextObjective(nn.Module):
    def __init__(self, run: dict, head: nn.Module, source, encoder, cache: MaskTextCache | None,
                 describer, num_classes: int, ignore_index: int, val_source=None, val_cache=None):
        super().__init__()
        self.val_source, self.val_cache = val_source or source, val_cache
        cfg = run["objective"]
        self.cfg, self.head = cfg, head
        self.lam, self.mix = cfg["lambda"], cfg["mix"]
        self.source, self.encoder, self.cache, self.describer = source, [encoder], cache, describer
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.describer_size = run["describer"]["image_size"]
        self.epoch_counters, self.total = Counters(), Counters()
        self.shuffle_generator = torch.Generator().manual_seed(run["train"]["seed"])

    def _aux(self, uids, images, masks, logits, bottleneck, pixel_ce, valid, source, shuffle: bool):
        pr = logits.detach().argmax(1)
        tb = build_text_batch(list(uids), images, masks, pr, size=self.describer_size,
                              num_classes=self.num_classes, ignore_index=self.ignore_index,
                              include_predicted=self.cfg["include_predicted_classes"])
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

    def forward(self, batch, images, masks, logits, bottleneck, pixel_ce, valid):
        aux, step = self._aux(batch["uid"], images, masks, logits, bottleneck, pixel_ce, valid,
                              self.source, self.cfg["shuffle_texts"])
        self.epoch_counters.add(step)
        self.total.add(step)
        return aux, step.as_logs()

    @torch.no_grad()
    def validation_logs(self, model, loader, device, amp_dtype) -> dict:
        """Aux loss on the val split (3.5's contrastive validation), through its own cache.

        The seed re-described the whole validation set every epoch; here unchanged val
        masks keep their cached text, so later epochs cost few describer calls.
        """
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

    def start_epoch(self, epoch: int) -> None:
        self.epoch_counters = Counters()

    def epoch_logs(self) -> dict:
        logs = self.epoch_counters.as_logs()
        return logs if self.cache is not None else {k: v for k, v in logs.items() if k != "cache_hit_rate"}

    def summary(self) -> dict:
        logs = self.total.as_logs()
        if self.cache is None:  # synthetic or class-name text: no describer, no cache to hit
            logs["cache_hit_rate"] = None
        return logs | {"objective": self.cfg["name"], "text_source": self.cfg["text"],
                                       "describer": self.describer.__class__.__name__ if self.describer else None}

    def state_dict_full(self) -> dict:
        counters = {name: getattr(self.total, name) for name in Counters.__dataclass_fields__}
        return {"head": self.head.state_dict(), "total": counters, "shuffle_rng": self.shuffle_generator.get_state(),
                "cache": self.cache.state_dict() if self.cache is not None else None,
                "val_cache": self.val_cache.state_dict() if self.val_cache is not None else None}

    def load_state_dict_full(self, state: dict) -> None:
        self.head.load_state_dict(state["head"])
        self.total = Counters(**state["total"])
        self.shuffle_generator.set_state(state["shuffle_rng"])
        if self.cache is not None and state["cache"] is not None:
            self.cache.load_state_dict(state["cache"], source="training state")
        if self.val_cache is not None and state.get("val_cache") is not None:
            self.val_cache.load_state_dict(state["val_cache"], source="training state")

    def close(self) -> None:
        if self.describer is not None:
            self.describer.close()


def encoder_config(run: dict, adapted_path: str | None) -> dict:
    cfg = {k: v for k, v in run["encoder"].items() if k not in ENCODER_KEYS_OURS}
    if adapted_path:
        cfg["adapted"] = adapted_path
    return cfg


def support_example(dataset, template_path: str, class_names: list[str]):
    """The one-shot example of the prompt: the first training (image, class) that fits the template."""
    template = load_template(template_path)
    for index in range(min(len(dataset), 50)):
        sample = dataset[index]
        for c in sorted(set(sample["mask"].unique().tolist()) - {0, 255}):
            try:
                return make_support_example(sample["image"], sample["mask"], c, class_names[c], template)
            except ValueError:
                continue
    return None  # the prompt builder falls back to its own drawn example


def build_describer_for(run: dict, class_names: list[str], dataset=None):
    cfg = run["describer"]
    support = None
    if cfg["backend"] != "rules" and dataset is not None:
        support = support_example(dataset, cfg["prompt_template"], class_names)
    return build_describer(cfg, class_names, support)


def build_objective(run: dict, trainer, cache_path: str | None, adapted_path: str | None = None,
                    concat_path: str | None = None):
    cfg = run.get("objective") or {}
    if cfg.get("name", "none") == "none":
        return None
    if cfg["name"] not in HEADS:
        raise ValueError(f"unknown objective {cfg['name']!r}; known: none, {', '.join(HEADS)}")
    class_names, ignore = trainer.class_names, trainer.ignore_index
    encoder = build_encoder(encoder_config(run, adapted_path)).to(trainer.device).eval()
    encoder.requires_grad_(False)
    cache = describer = val_cache = val_source = None
    if cfg["text"] == "describer":
        cache = cache_from_config(run["cache"])
        if cache_path:
            cache.load_state_dict(load_torch(cache_path), source=cache_path)
        describer = build_describer_for(run, class_names, trainer.train_set)
        source = DescriberTexts(describer, cache, class_names)
        if cfg["contrastive_validation"]:
            val_cache = cache_from_config(run["cache"])
            val_source = DescriberTexts(describer, val_cache, class_names)
    elif cfg["text"] == "class_name":
        source = ClassNameTexts(class_names)
    else:
        source = SyntheticTexts(class_names, ignore)
    head_cfg = cfg | {"class_names": class_names, "negatives_seed": run["train"]["seed"],
                      "concat_adapter_path": concat_path}
    head = HEADS[cfg["name"]](head_cfg, encoder.embed_dim, trainer.model.bottleneck_channels, encoder)
    objective = TextObjective(run, head, source, encoder, cache, describer, trainer.num_classes, ignore,
                              val_source, val_cache)
    return objective.to(trainer.device)
