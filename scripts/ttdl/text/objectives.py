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

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ttdl.core import provenance
from ttdl.core.io import load_torch
from ttdl.core.losses import mix_losses
from ttdl.core.settings import RunSettings
from ttdl.text.cache import MaskTextCache, cache_from_settings
from ttdl.text.describers import describer_for_run
from ttdl.text.encoders import build_encoder
from ttdl.text.heads import HEADS, HeadContext
from ttdl.text.text_sources import (
    SCHEDULES,
    ClassNameTexts,
    Counters,
    DescriberTexts,
    SyntheticTexts,
    TextItems,
    shuffle_texts,
)
from ttdl.text.textbatch import build_text_batch

__all__ = ["SCHEDULES", "CrossEntropyOnly", "StepTensors", "TextItems", "TextObjective", "UnusableAnswersError",
           "build_objective", "shuffle_texts"]


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


class UnusableAnswersError(RuntimeError):
    """Too few describer answers were usable: the run would train on (almost) no text."""


class CrossEntropyOnly(nn.Module):
    """The null objective of CE-only runs: the loss is CE, and there is nothing else to keep."""

    def forward(self, step: StepTensors) -> tuple[Tensor, dict]:
        return step.ce, {}

    def before_step(self, next_batch: dict | None, predict) -> None:
        return None

    def carry_over_head(self, head_state: dict | None, source: str, log) -> None:
        return None

    def aux_head_state(self) -> dict:
        return {}

    def start_epoch(self, epoch: int) -> None:
        return None

    def end_epoch(self) -> dict:
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


# ---- the text objective ---------------------------------------------------------------

class TextObjective(nn.Module):
    """CE mixed with an auxiliary loss computed from texts about the current predictions."""

    def __init__(self, run: RunSettings, head: nn.Module, source, encoder, cache: MaskTextCache | None,
                 describer, num_classes: int, ignore_index: int, val_source=None, val_cache=None):
        super().__init__()
        self.run_id, self.cfg, self.head = run.run_id, run.objective, head
        self.min_usable_share, self.min_answers = run.describer.min_usable_share, run.describer.min_answers_to_judge
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

    def before_step(self, next_batch: dict | None, predict) -> None:
        """lookahead: send the describer requests of the batch after this one (its masks from `predict`)."""
        if next_batch is None or not isinstance(self.source, DescriberTexts) or self.source.schedule != "lookahead":
            return
        images, masks = next_batch["image"], next_batch["mask"]
        tb = build_text_batch(list(next_batch["uid"]), images, masks, predict(images), size=self.describer_size,
                              num_classes=self.num_classes, ignore_index=self.ignore_index,
                              include_predicted=self.cfg.include_predicted_classes)
        self.source.prefetch(tb)

    def forward(self, s: StepTensors) -> tuple[Tensor, dict]:
        aux, step = self._aux(s.batch["uid"], s.images, s.masks, s.logits, s.bottleneck, s.pixel_ce, s.valid,
                              self.source, self.cfg.shuffle_texts)
        self.epoch_counters.add(step)
        self.total.add(step)
        if self.epoch_counters.calls >= self.min_answers:
            self.check_answers()
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

    def check_answers(self) -> None:
        """Stop a text run whose describer answers are mostly unusable: it would be neither a text run nor CE."""
        counters = self.epoch_counters
        if counters.calls and counters.usable_share < self.min_usable_share:
            raise UnusableAnswersError(
                f"[{self.run_id}] only {counters.calls - counters.malformed} of {counters.calls} describer answers "
                f"this epoch were usable ({counters.usable_share:.0%} < describer.min_usable_share "
                f"{self.min_usable_share:.0%}): the server answers empty, garbled or non-text replies. Check the "
                "describer's model and server (its log lines name them) and the prompt template; set "
                "describer.min_usable_share: 0 to train on whatever arrives.")

    def end_epoch(self) -> dict:
        """The epoch's text logs; raises UnusableAnswersError if too few of its answers were usable."""
        self.check_answers()
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
        if self.cache is not None:
            logs |= self.total.answer_stats()
        return logs | {"objective": self.cfg.name, "text_source": self.cfg.text,
                       "describer": self.describer.__class__.__name__ if self.describer else None}

    def state_dict_full(self) -> dict:
        """Everything a resumed run needs, the running epoch's counters included (metrics.csv stays exact)."""
        def plain(counters: Counters) -> dict:
            return {name: getattr(counters, name) for name in Counters.__dataclass_fields__}

        return {"head": self.head.state_dict(), "total": plain(self.total), "epoch": plain(self.epoch_counters),
                "shuffle_rng": self.shuffle_generator.get_state(),
                "cache": self.cache.state_dict() if self.cache is not None else None,
                "val_cache": self.val_cache.state_dict() if self.val_cache is not None else None,
                "source": self.source.state_dict() if isinstance(self.source, DescriberTexts) else None}

    def load_state_dict_full(self, state: dict) -> None:
        self.head.load_state_dict(state["head"])
        self.total = Counters(**state["total"])
        self.epoch_counters = Counters(**state["epoch"])
        self.shuffle_generator.set_state(state["shuffle_rng"])
        if self.cache is not None and state["cache"] is not None:
            self.cache.load_state_dict(state["cache"], source="training state")
        if self.val_cache is not None and state.get("val_cache") is not None:
            self.val_cache.load_state_dict(state["val_cache"], source="training state")
        if isinstance(self.source, DescriberTexts) and state.get("source") is not None:
            self.source.load_state_dict(state["source"])

    def save_outputs(self, out_dir: Path) -> None:
        if self.cache is not None:
            self.cache.save(Path(out_dir) / "cache" / "cache.pt")

    def close(self) -> None:
        if isinstance(self.source, DescriberTexts):
            self.source.close()
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
        produced_by = provenance.for_cache(run.data, run.describer)
        if cache_path:
            state = load_torch(cache_path)
            provenance.check(produced_by, state.get("provenance"), cache_path, "mask-text cache",
                             "rerun the prefill for this run's data and describer (delete the file; the workflow "
                             "writes it again)")
            cache.load_state_dict(state, source=cache_path)
        cache.provenance = produced_by
        describer = describer_for_run(run.describer, class_names, support_dataset)
        source = DescriberTexts(describer, cache, class_names, run.describer.schedule,
                                run.describer.max_staleness_steps)
        if cfg.contrastive_validation:
            val_cache = cache_from_settings(run.cache)
            val_source = DescriberTexts(describer, val_cache, class_names)  # validation: always sync
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
