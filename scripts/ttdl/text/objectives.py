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
from ttdl.text import grad_balance
from ttdl.text.adaptation import check_adaptation
from ttdl.text.cache import MaskTextCache, cache_from_settings
from ttdl.text.controls import AtDescribedPositions, class_name_texts, diagnosis_codes
from ttdl.text.describers import describer_for_run
from ttdl.text.diagnosis_code import code_dim, code_embedding
from ttdl.text.encoders import build_encoder
from ttdl.text.grad_balance import GradLog
from ttdl.text.heads import HEADS, HeadContext
from ttdl.text.text_sources import (
    SCHEDULES,
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
                 describer, num_classes: int, ignore_index: int, val_source=None, val_cache=None,
                 describer_texts: DescriberTexts | None = None, shared_parameters: list | None = None,
                 encoder_note: dict | None = None):
        super().__init__()
        self.run_id, self.cfg, self.head = run.run_id, run.objective, head
        self.min_usable_share, self.min_answers = run.describer.min_usable_share, run.describer.min_answers_to_judge
        self.source, self.val_source, self.val_cache = source, val_source or source, val_cache
        self.describer_texts = describer_texts  # the describer behind `source` (matched run or control), if any
        self.val_describer_texts = val_source if isinstance(val_source, DescriberTexts) else None
        self.encoder, self.cache, self.describer = [encoder], cache, describer  # encoder: frozen, not saved
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.describer_size = run.describer.image_size
        self.epoch_counters, self.total = Counters(), Counters()
        self.shuffle_generator = torch.Generator().manual_seed(run.train.seed)
        self.shared = list(shared_parameters or [])  # not registered: the segmenter owns them
        self.lambda_now, self.steps_seen = run.objective.lambda_, 0
        # A head without parameters (XEn rescale) has nothing to warm up: its aux loss is a weighted CE.
        self.warmup_steps = run.objective.head_warmup_steps if any(True for _ in head.parameters()) else 0
        self.grad_epoch = GradLog()
        self.encoder_note = encoder_note or {}

    def _text_batch(self, batch: dict, images: Tensor, masks: Tensor, pr: Tensor):
        """The describer's view of a batch: clean labels where the loader has them (privileged
        information: CE sees degraded ones), keys per flip so a text never serves the mirrored view."""
        gt = batch.get("clean_mask")
        gt = masks if gt is None else gt.to(masks.device)
        flipped = batch.get("flipped")
        return build_text_batch(list(batch["uid"]), images, gt, pr, size=self.describer_size,
                                num_classes=self.num_classes, ignore_index=self.ignore_index,
                                include_predicted=self.cfg.include_predicted_classes,
                                flipped=None if flipped is None else [bool(f) for f in flipped])

    def _embed(self, texts: list[str], device) -> Tensor:
        if self.cfg.text == "onehot":
            return code_embedding(texts, self.num_classes).to(device)
        encoder = self.encoder[0]
        if not texts:
            return torch.zeros((0, encoder.embed_dim), device=device)
        with torch.no_grad():
            return encoder.encode_text(texts).float().to(device)

    def _aux(self, batch, images, masks, logits, bottleneck, pixel_ce, valid, source, shuffle: bool):
        pr = logits.detach().max(1).indices  # max().indices: argmax over classes is ~4x slower on the CPU
        tb = self._text_batch(batch, images, masks, pr)
        step = Counters(pairs=len(tb.keys))
        items = source(tb, step)
        if shuffle:
            items = shuffle_texts(items, self.shuffle_generator)
        step.texts = len(items.texts)
        emb = self._embed(items.texts, bottleneck.device)
        # per-class probability maps: only the class-pooled image side reads them
        probs = torch.softmax(logits.detach().float(), dim=1) if self.cfg.image_side == "masked" else None
        aux = self.head(tb=tb, items=items, emb=emb, bottleneck=bottleneck, pixel_ce=pixel_ce, valid=valid,
                        probs=probs)
        return aux, step

    def before_step(self, next_batch: dict | None, predict) -> None:
        """lookahead: send the describer requests of the batch after this one (its masks from `predict`)."""
        texts = self.describer_texts
        if next_batch is None or texts is None or texts.schedule != "lookahead":
            return
        images = next_batch["image"]
        texts.prefetch(self._text_batch(next_batch, images, next_batch["mask"], predict(images)))

    @property
    def warming_up(self) -> bool:
        """The first head_warmup_steps steps train only the head: a random head's gradient is noise for B."""
        return self.steps_seen < self.warmup_steps

    def forward(self, s: StepTensors) -> tuple[Tensor, dict]:
        bottleneck = s.bottleneck.detach() if self.warming_up else s.bottleneck
        aux, step = self._aux(s.batch, s.images, s.masks, s.logits, bottleneck, s.pixel_ce, s.valid,
                              self.source, self.cfg.shuffle_texts)
        self.epoch_counters.add(step)
        self.total.add(step)
        if self.epoch_counters.calls >= self.min_answers:
            self.check_answers()
        logs = {"aux": aux.item(), "aux_ce_ratio": aux.item() / max(s.ce.item(), 1e-12)}
        logs |= self.balance(s.ce, aux)
        # Warm-up: the aux loss reaches only the head (B is detached) and CE keeps its full weight;
        # the aux weight does not matter there, since Adam's steps do not depend on a loss's scale.
        loss = s.ce + aux if self.warming_up else mix_losses(s.ce, aux, self.lambda_now, self.cfg.mix)
        self.steps_seen += 1
        return loss, logs | {f"text/{key}": value for key, value in step.as_logs().items()}

    def balance(self, ce: Tensor, aux: Tensor) -> dict:
        """Every grad_log_every steps after the warm-up: measure aux vs CE on the shared parameters,
        re-set lambda (lambda_mode grad_ratio), and log ratio, cosine and lambda (TensorBoard per step,
        metrics.csv as epoch means)."""
        every = self.cfg.grad_log_every
        since = self.steps_seen - self.warmup_steps
        if not every or since < 0 or since % every or not self.shared or not aux.requires_grad:
            return {}
        stats = grad_balance.grad_stats(ce, aux, self.shared)
        if self.cfg.lambda_mode == "grad_ratio":
            lam = grad_balance.lambda_for_ratio(stats, self.cfg.target_grad_ratio, self.cfg.mix, self.cfg.max_lambda)
            if lam is not None:
                self.lambda_now = lam
        ratio = grad_balance.weighted_ratio(stats, self.lambda_now, self.cfg.mix)
        self.grad_epoch.add(ratio, stats.cosine, self.lambda_now)
        return {"text/grad_ratio_aux_ce": ratio, "text/grad_cos_aux_ce": stats.cosine, "text/lambda": self.lambda_now}

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
        self.epoch_counters, self.grad_epoch = Counters(), GradLog()
        for texts in {id(t): t for t in (self.describer_texts, self.val_describer_texts) if t is not None}.values():
            texts.start_epoch(epoch)

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
        logs = self.epoch_counters.as_logs() | self.grad_epoch.as_logs()
        if self.describer_texts is not None:
            logs |= self.describer_texts.epoch_latency_logs()
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
            aux, step = self._aux(batch, images, masks, logits, bottleneck, pixel_ce,
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
        return logs | {"objective": self.cfg.name, "text_source": self.cfg.text, "preset": self.cfg.preset,
                       "final_lambda": self.lambda_now, "encoder_adaptation": self.encoder_note,
                       "describer": self.describer.__class__.__name__ if self.describer else None}

    def state_dict_full(self) -> dict:
        """Everything a resumed run needs, the running epoch's counters included (metrics.csv stays exact)."""
        def plain(counters: Counters) -> dict:
            return {name: getattr(counters, name) for name in Counters.__dataclass_fields__}

        return {"head": self.head.state_dict(), "total": plain(self.total), "epoch": plain(self.epoch_counters),
                "shuffle_rng": self.shuffle_generator.get_state(), "lambda_now": self.lambda_now,
                "steps_seen": self.steps_seen, "grad_epoch": self.grad_epoch.state(),
                "cache": self.cache.state_dict() if self.cache is not None else None,
                "val_cache": self.val_cache.state_dict() if self.val_cache is not None else None,
                "source": self.describer_texts.state_dict() if self.describer_texts is not None else None}

    def load_state_dict_full(self, state: dict) -> None:
        self.head.load_state_dict(state["head"])
        self.total = Counters(**state["total"])
        self.epoch_counters = Counters(**state["epoch"])
        self.shuffle_generator.set_state(state["shuffle_rng"])
        self.lambda_now, self.steps_seen = float(state["lambda_now"]), int(state["steps_seen"])
        self.grad_epoch = GradLog(**state["grad_epoch"])
        if self.cache is not None and state["cache"] is not None:
            self.cache.load_state_dict(state["cache"], source="training state")
        if self.val_cache is not None and state.get("val_cache") is not None:
            self.val_cache.load_state_dict(state["val_cache"], source="training state")
        if self.describer_texts is not None and state.get("source") is not None:
            self.describer_texts.load_state_dict(state["source"])

    def save_outputs(self, out_dir: Path) -> None:
        if self.cache is not None:
            self.cache.save(Path(out_dir) / "cache" / "cache.pt")

    def close(self) -> None:
        if self.describer_texts is not None:
            self.describer_texts.close()
        if self.describer is not None:
            self.describer.close()


# ---- building ------------------------------------------------------------------------

def build_objective(run: RunSettings, *, class_names: list[str], ignore_index: int, device: torch.device,
                    bottleneck_channels: int, support_dataset: Any = None, cache_path: str | None = None,
                    encoder_path: str | None = None, concat_path: str | None = None,
                    shared_parameters: list | None = None, log=print) -> nn.Module:
    """The run's objective, from explicit facts about the run (never from the trainer).

    `shared_parameters` are the segmenter parameters that feed B (the backbone):
    where the aux and CE gradients meet and are measured (ttdl.text.grad_balance).
    """
    cfg = run.objective
    if not cfg.uses_text:
        return CrossEntropyOnly()
    if cfg.name not in HEADS:
        raise ValueError(f"unknown objective {cfg.name!r}; known: none, {', '.join(HEADS)}")
    encoder_path, encoder_note = usable_encoder(run, encoder_path, log)
    if concat_path and encoder_note.get("path") and not encoder_note["used"]:
        raise ValueError(f"[{run.run_id}] the concat adapter {concat_path} was trained on the embeddings of "
                         f"{encoder_note['path']}, which this run refuses ({encoder_note['reason']}); a 4.x run "
                         "cannot fall back to the shipped encoder. Improve the encoder adaptation (vle/1) or lower "
                         "encoder.min_retrieval_over_chance")
    encoder = build_encoder(run.encoder, adapted_path=encoder_path).to(device).eval()
    encoder.requires_grad_(False)
    cache = describer = val_cache = val_source = describer_texts = None
    if cfg.text in DESCRIBED:
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
        # Matched (and shuffled) runs embed describer answers as they arrive; the controls replace them.
        early_embed = encoder.remember_texts if cfg.text == "describer" else None
        describer_texts = DescriberTexts(describer, cache, class_names, run.describer.schedule,
                                         run.describer.max_staleness_steps, on_answers=early_embed)
        source = describer_texts
        if cfg.text == "class_name":
            source = AtDescribedPositions(describer_texts, class_name_texts(class_names))
        elif cfg.text == "onehot":
            source = AtDescribedPositions(describer_texts, diagnosis_codes(class_names, run.describer))
        if cfg.contrastive_validation:
            val_cache = cache_from_settings(run.cache)
            val_source = DescriberTexts(describer, val_cache, class_names)  # validation: always sync
    else:
        source = SyntheticTexts(class_names, ignore_index)
    text_dim = code_dim(len(class_names)) if cfg.text == "onehot" else encoder.embed_dim
    context = HeadContext(text_dim=text_dim, bottleneck_dim=bottleneck_channels, encoder=encoder,
                          class_names=list(class_names), negatives_seed=run.train.seed,
                          concat_adapter_path=concat_path)
    head = HEADS[cfg.name](cfg, context)
    objective = TextObjective(run, head, source, encoder, cache, describer, len(class_names), ignore_index,
                              val_source, val_cache, describer_texts=describer_texts,
                              shared_parameters=shared_parameters, encoder_note=encoder_note)
    return objective.to(device)


# Text kinds whose pairs the describer's cache policy picks: the matched run and its controls.
DESCRIBED = ("describer", "class_name", "onehot")


def usable_encoder(run: RunSettings, encoder_path: str | None, log) -> tuple[str | None, dict]:
    """The adapted encoder if its held-out retrieval is clearly above chance, else None (the encoder
    as shipped), with a note for the summary. An adaptation that learned nothing would feed every text
    run a collapsed text space."""
    if not encoder_path:
        return None, {"used": False, "reason": "no adapted encoder configured"}
    ok, reason = check_adaptation(encoder_path, run.encoder.min_retrieval_over_chance)
    if ok:
        log(f"[{run.run_id}] adapted encoder {encoder_path}: {reason}")
        return encoder_path, {"used": True, "path": str(encoder_path), "reason": reason}
    log(f"WARNING: [{run.run_id}] refusing the adapted encoder {encoder_path}: {reason}; "
        "using the encoder as shipped")
    return None, {"used": False, "path": str(encoder_path), "reason": f"refused: {reason}"}
