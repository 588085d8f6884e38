"""The one training loop every experiment uses.

The run's settings choose everything: data, model, optimiser schedule, and the
*objective* (ttdl.text.objectives), which turns a step's tensors into the loss
to minimise. CE-only runs get the null objective, so the loop never branches on
what kind of run it is.

Resumability: all state (model, optimiser, scheduler, scaler, RNG, objective
with its cache, metric history) is written atomically to `state/last.pt` at the
end of every epoch (and every `checkpoint_every_steps`). Rerunning a killed job
continues from there. The data order of an epoch is a pure function of
(seed, epoch), so a resumed epoch skips exactly the batches already trained.
"""
from __future__ import annotations

import csv
import hashlib
import io as _io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ttdl.core import io, provenance
from ttdl.core.data import read_class_names, split_of
from ttdl.core.metrics import evaluate
from ttdl.core.models import build_model
from ttdl.core.runtime import autocast_dtype, pick_device, progress_bar
from ttdl.core.settings import DataSettings, RunSettings, TrainSettings
from ttdl.text.heads import SiglipLogitParams
from ttdl.text.objectives import StepTensors, build_objective

STATE_VERSION = 1
StepHook = Callable[["Trainer", dict], None]  # called after every optimiser step with the step's logs


# ---- pieces -----------------------------------------------------------------------

def run_fingerprint(run: RunSettings, *files: str | None) -> str:
    """Identifies the settings and input files a saved state belongs to (a changed init retrains)."""
    settings = {k: v for k, v in run.to_dict().items() if k != "description"}
    settings["train"] = {k: v for k, v in settings["train"].items() if k not in ("progress", "threads", "num_workers")}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for path in files:
        if path:
            with open(path, "rb") as handle:
                digest.update(hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Linear warm-up, then cosine decay to 0 (or constant)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen).tolist()


def build_datasets(data: DataSettings, train: TrainSettings):
    return split_of(data, "train", train), split_of(data, "val")


def parameter_groups(model: nn.Module, objective: nn.Module, lr: float, weight_decay: float,
                     head_lr_scale: float = 1.0) -> list[dict]:
    """AdamW groups: the segmenter; the aux head at head_lr_scale × lr; its SigLIP logit scale and bias
    at 10 × that and without weight decay, which would pull them toward s = 1, b = 0 (the ill-posed fixed
    values the learned ones exist to leave). A fresh head has a few dozen steps of a finetune to fit."""
    logit = [p for name, p in objective.named_parameters()
             if p.requires_grad and name.rsplit(".", 1)[-1] in SiglipLogitParams.NO_DECAY]
    taken = {id(p) for p in logit}
    head = [p for p in objective.parameters() if p.requires_grad and id(p) not in taken]
    groups = [{"params": list(model.parameters()), "lr": lr, "weight_decay": weight_decay},
              {"params": head, "lr": lr * head_lr_scale, "weight_decay": weight_decay},
              {"params": logit, "lr": lr * head_lr_scale * 10, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


@dataclass
class History:
    rows: list[dict] = field(default_factory=list)

    def write_csv(self, path: Path) -> None:
        columns: list[str] = []
        for row in self.rows:
            columns += [k for k in row if k not in columns]
        buf = _io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns)
        writer.writeheader()
        writer.writerows(self.rows)
        io.write_text(path, buf.getvalue())


# ---- the loop ------------------------------------------------------------------------

class Trainer:
    def __init__(self, run: RunSettings, out_dir: str | Path, init_weights: str | None = None,
                 cache_path: str | None = None, encoder_path: str | None = None,
                 concat_path: str | None = None, log=print, step_hooks: tuple[StepHook, ...] = ()):
        self.run, self.log, self.step_hooks = run, log, tuple(step_hooks)
        self.train_cfg = tc = run.train
        self.out = Path(out_dir)
        self.state_path = self.out / "state" / "last.pt"
        self.best_path = self.out / "state" / "best.pt"
        torch.set_num_threads(tc.threads)
        torch.manual_seed(tc.seed)
        self.device = pick_device(tc.device)
        self.amp_dtype = autocast_dtype(tc.amp, self.device)
        self.class_names = read_class_names(run.data.root, run.data.class_names)
        self.num_classes = len(self.class_names)
        self.ignore_index = run.data.ignore_index
        self.train_set, self.val_set = build_datasets(run.data, tc)
        self.steps_per_epoch = len(self.train_set) // tc.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"train split has {len(self.train_set)} images, "
                             f"fewer than train.batch_size={tc.batch_size}")
        self.total_steps = self.steps_per_epoch * tc.epochs

        model = run.model
        self.model = build_model(model.name, self.num_classes, weights=init_weights or model.weights,
                                 backbone_weights=None if init_weights else model.backbone_weights,
                                 bn_momentum=model.bn_momentum).to(self.device)
        self.objective = build_objective(
            run, class_names=self.class_names, ignore_index=self.ignore_index, device=self.device,
            bottleneck_channels=self.model.bottleneck_channels, support_dataset=self.train_set,
            cache_path=cache_path, encoder_path=encoder_path, concat_path=concat_path,
            shared_parameters=self.model.shared_parameters(), log=log)
        self.provenance = provenance.for_checkpoint(run.data, self.class_names)
        if init_weights:
            init = io.load_torch(init_weights)
            provenance.check(self.provenance, init.get("provenance"), init_weights, "checkpoint",
                             "start this run from a checkpoint of the same dataset and classes (or rerun its init run)")
            self.objective.carry_over_head(init.get("aux_head"), init_weights, log)

        self.optimizer = torch.optim.AdamW(parameter_groups(self.model, self.objective, tc.lr, tc.weight_decay,
                                                            run.objective.head_lr_scale), lr=tc.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, tc.warmup_steps, self.total_steps, tc.schedule))
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

        self.epoch = self.step = self.step_in_epoch = 0
        self.best_miou, self.best_epoch, self.wall_time, self.done = -1.0, -1, 0.0, False
        self.history = History()
        self.epoch_sums: dict[str, float] = {}  # running sums of the current epoch (resumed with it)
        self.epoch_count = 0
        self.bar = progress_bar(tc.progress)
        self.fingerprint = run_fingerprint(run, init_weights, cache_path, encoder_path, concat_path)

    # -- persistence --
    def state_dict(self) -> dict:
        state = {
            "version": STATE_VERSION, "run_id": self.run.run_id, "fingerprint": self.fingerprint,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "epoch": self.epoch, "step": self.step, "step_in_epoch": self.step_in_epoch,
            "best_miou": self.best_miou, "best_epoch": self.best_epoch, "wall_time": self.wall_time,
            "done": self.done, "history": self.history.rows, "rng": torch.get_rng_state(),
            "epoch_sums": self.epoch_sums, "epoch_count": self.epoch_count,
            "objective": self.objective.state_dict_full(),
        }
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state()
        return state

    def save_state(self) -> None:
        # the state this save replaces stays as last.prev.pt, try_resume's fallback
        io.save_torch(self.state_path, self.state_dict(), keep_previous=self.state_path.with_name("last.prev.pt"))

    def try_resume(self) -> bool:
        """Continue from state/last.pt, or from state/last.prev.pt (one save earlier) if last.pt is unreadable.

        An unreadable last.pt is moved aside to last.pt.corrupt, so that the next save cannot
        rotate it into last.prev.pt. With no readable state left, the error names the files
        to delete. (The data order is a function of (seed, epoch), so resuming one save
        earlier ends in the same weights.)
        """
        previous = self.state_path.with_name("last.prev.pt")
        if not self.state_path.exists():
            return False
        tried: list[io.CheckpointError] = []
        for path in (self.state_path, previous):
            if not path.exists():
                continue
            try:
                state = io.load_torch(path)
                break
            except io.CheckpointError as exc:
                tried.append(exc)
        else:
            files = " and ".join(str(exc.path) for exc in tried)
            raise io.CheckpointError(
                f"[{self.run.run_id}] cannot resume: " + "; ".join(f"{exc.path}: {exc.reason}" for exc in tried)
                + f". Delete {files} and rerun to start this run over from its first epoch (its progress is lost).",
                self.state_path, tried[0].reason)
        if tried:
            aside = self.state_path.with_name("last.pt.corrupt")
            self.state_path.replace(aside)
            self.log(f"WARNING: [{self.run.run_id}] {self.state_path} is unreadable ({tried[0].reason}); "
                     f"resuming from {path}, saved one checkpoint earlier. The unreadable file was moved "
                     f"to {aside}; delete it once you no longer need it.")
        if state.get("version") != STATE_VERSION or state.get("run_id") != self.run.run_id:
            raise RuntimeError(f"{path} belongs to another run or format; delete {self.state_path} and {previous} "
                               f"to start over")
        if state.get("fingerprint") != self.fingerprint:
            self.log(f"{path} was saved with other settings or inputs; starting this run over")
            return False
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        for key in ("epoch", "step", "step_in_epoch", "best_miou", "best_epoch", "wall_time", "done",
                    "epoch_sums", "epoch_count"):
            setattr(self, key, state[key])
        self.history.rows = state["history"]
        torch.set_rng_state(state["rng"])
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"])
        self.objective.load_state_dict_full(state["objective"])
        self.log(f"resumed {self.run.run_id} from {path}: epoch {self.epoch}, "
                 f"step {self.step} ({self.step_in_epoch} into the epoch)")
        return True

    # -- one step --
    def train_step(self, batch: dict) -> dict:
        self.model.train()
        images = batch["image"].to(self.device, non_blocking=True)
        masks = batch["mask"].to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            logits, bottleneck = self.model(images)
            pixel_ce = F.cross_entropy(logits.float(), masks, ignore_index=self.ignore_index, reduction="none")
            valid = masks != self.ignore_index
            ce = pixel_ce[valid].mean() if valid.any() else pixel_ce.sum() * 0
            loss, logs = self.objective(StepTensors(batch, images, masks, logits, bottleneck, pixel_ce, valid, ce))
        logs = {"ce": ce.item()} | logs | {"loss": loss.item()}
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.train_cfg.grad_clip or math.inf)
        self.stop_if_not_finite(logs, float(grad_norm))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return logs | {"lr": self.scheduler.get_last_lr()[0]}

    def stop_if_not_finite(self, logs: dict, grad_norm: float) -> None:
        """A NaN or inf loss or gradient ends the job here, before the optimiser touches the weights.

        Nothing non-finite is ever saved: the last checkpoint is the previous good one,
        and weights.pth is published only when a run finishes. (With fp16 the gradient
        scaler skips inf steps by design, so only the loss is checked there.)
        """
        bad_grad = not math.isfinite(grad_norm) and not self.scaler.is_enabled()
        parts = {k: logs[k] for k in ("ce", "aux", "loss") if k in logs}
        bad_loss = [k for k, v in parts.items() if not math.isfinite(v)]
        if bad_grad or bad_loss:
            parts = ", ".join(f"{k}={v:.4g}" for k, v in parts.items())
            raise FloatingPointError(
                f"[{self.run.run_id}] step {self.step + 1} (epoch {self.epoch + 1}): non-finite "
                f"{'loss' if bad_loss else 'gradient'} ({parts}, gradient norm {grad_norm:.4g}); stopped before the "
                f"update. Nothing was published from this step. Check objective.lambda, train.lr and the inputs.")

    @torch.no_grad()
    def predict_masks(self, images: torch.Tensor) -> torch.Tensor:
        """What the current weights predict for `images` in train mode; BatchNorm running stats stay as they were."""
        buffers = [b.clone() for b in self.model.buffers()]
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            logits, _ = self.model(images.to(self.device))
        for buffer, saved in zip(self.model.buffers(), buffers):
            buffer.copy_(saved)
        return logits.max(1).indices  # argmax over classes is ~4x slower on the CPU

    # -- data --
    def epoch_loader(self, epoch: int, skip: int = 0) -> DataLoader:
        """The epoch's batches, a pure function of (seed, epoch); `skip` drops those already trained."""
        self.train_set.set_epoch(epoch)
        order = epoch_order(len(self.train_set), self.train_cfg.seed, epoch)
        bs = self.train_cfg.batch_size
        batches = [order[i * bs:(i + 1) * bs] for i in range(self.steps_per_epoch)][skip:]
        return DataLoader(self.train_set, batch_sampler=batches, num_workers=self.train_cfg.num_workers,
                          pin_memory=self.device.type == "cuda")

    def val_loader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.train_cfg.eval_batch_size, shuffle=False,
                          num_workers=self.train_cfg.num_workers)

    def validate(self) -> dict:
        metrics = evaluate(self.model, self.val_loader(), self.num_classes, self.ignore_index, self.device,
                           self.amp_dtype, self.class_names, self.bar)
        return metrics | {"text": self.objective.validation_logs(self.model, self.val_loader(), self.device,
                                                                  self.amp_dtype)}

    # -- the run --
    def fit(self) -> dict:
        from torch.utils.tensorboard import SummaryWriter

        self.out.mkdir(parents=True, exist_ok=True)
        for folder in (self.out, self.state_path.parent, self.out / "cache"):  # this job's own folders only
            for stale in io.sweep_stale_temp(folder):  # left by a write this job's last attempt did not finish
                self.log(f"removed {stale}, the temp file of an interrupted write")
        self.try_resume()
        writer = SummaryWriter(str(self.out / "tb"), purge_step=self.step or None)
        try:
            while not self.done and self.epoch < self.train_cfg.epochs:
                self.run_epoch(writer)
            if not self.done:  # a rerun of a finished run keeps its states as they are (last.prev.pt included)
                self.done = True
                self.save_state()
        finally:
            writer.close()
        return self.finish()

    def run_epoch(self, writer) -> None:
        started = time.time()
        loader = self.epoch_loader(self.epoch, skip=self.step_in_epoch)
        if self.step_in_epoch == 0:  # a resumed epoch keeps its sums and the objective's counters
            self.epoch_sums, self.epoch_count = {}, 0
            self.objective.start_epoch(self.epoch)
        bar = self.bar(loader, total=len(loader),
                       desc=f"{self.run.run_id} epoch {self.epoch + 1}/{self.train_cfg.epochs}")
        batches = iter(bar)
        upcoming = next(batches, None)
        while upcoming is not None:
            batch, upcoming = upcoming, next(batches, None)
            self.objective.before_step(upcoming, self.predict_masks)  # lookahead describes `upcoming` now
            logs = self.train_step(batch)
            self.step += 1
            self.step_in_epoch += 1
            self.epoch_count += 1
            self.log_step(writer, logs)
            bar.set_postfix(loss=f"{logs['loss']:.3f}")
            every = self.train_cfg.checkpoint_every_steps
            if every and self.step % every == 0 and self.step_in_epoch < self.steps_per_epoch:
                self.wall_time += time.time() - started
                started = time.time()
                self.save_state()
            for hook in self.step_hooks:
                hook(self, logs)
        metrics = self.validate()
        self.wall_time += time.time() - started
        self.end_epoch(writer, metrics)

    def log_step(self, writer, logs: dict) -> None:
        for key, value in logs.items():
            if not key.startswith("text/"):  # text counters enter the CSV as epoch totals
                self.epoch_sums[key] = self.epoch_sums.get(key, 0.0) + value
            writer.add_scalar(key if key.startswith("text/") else f"train/{key}", value, self.step)

    def end_epoch(self, writer, metrics: dict) -> None:
        row = {"epoch": self.epoch + 1, "step": self.step}
        row |= {f"train_{k}": v / max(self.epoch_count, 1) for k, v in self.epoch_sums.items() if k != "lr"}
        row |= {"lr": self.scheduler.get_last_lr()[0], "val_miou": metrics["miou"],
                "val_pixel_acc": metrics["pixel_acc"], "wall_time_s": round(self.wall_time, 2)}
        row |= self.objective.end_epoch() | metrics["text"]
        self.history.rows.append(row)
        for key in ("val_miou", "val_pixel_acc"):
            writer.add_scalar(f"val/{key[4:]}", row[key], self.epoch + 1)
        self.log(f"[{self.run.run_id}] epoch {self.epoch + 1}: loss {row.get('train_loss', float('nan')):.4f} "
                 f"val mIoU {metrics['miou']:.4f} pixel acc {metrics['pixel_acc']:.4f}")
        self.epoch += 1
        self.step_in_epoch = 0
        if metrics["miou"] > self.best_miou:
            self.best_miou, self.best_epoch = metrics["miou"], self.epoch
            io.save_torch(self.best_path, {"model": self.model.state_dict(), "epoch": self.epoch,
                                           "provenance": self.provenance,
                                           "aux_head": self.objective.aux_head_state(),
                                           "val": {k: metrics[k] for k in ("miou", "pixel_acc", "per_class_iou")}})
        target = self.train_cfg.target_miou
        if target is not None and metrics["miou"] >= target:
            self.log(f"[{self.run.run_id}] reached target mIoU {target} at epoch {self.epoch}; stopping")
            self.done = True
        self.save_state()

    def finish(self) -> dict:
        """Write the declared outputs from the saved state (also after a resume of a finished run)."""
        best = io.load_torch(self.best_path)
        io.save_torch(self.out / "weights.pth", {"model": best["model"], "epoch": best["epoch"],
                                                  "aux_head": best["aux_head"], "run_id": self.run.run_id,
                                                  "class_names": self.class_names,
                                                  "model_name": self.run.model.name,
                                                  "provenance": best["provenance"]})
        self.history.write_csv(self.out / "metrics.csv")
        target = self.train_cfg.target_miou
        summary = {
            "run_id": self.run.run_id, "description": self.run.description,
            "best_val_miou": best["val"]["miou"], "best_val_pixel_acc": best["val"]["pixel_acc"],
            "best_epoch": best["epoch"], "epochs": self.epoch, "steps": self.step,
            "per_class_iou": best["val"]["per_class_iou"], "wall_time_s": round(self.wall_time, 2),
            "target_miou": target,
            "target_reached": None if target is None else best["val"]["miou"] >= target,
            "device": str(self.device), "init": self.run.init,
        }
        summary |= self.objective.summary()
        self.objective.save_outputs(self.out)
        self.objective.close()
        if target is not None and not summary["target_reached"]:
            self.log(f"WARNING: [{self.run.run_id}] target mIoU {target} not reached in {self.epoch} epochs "
                     f"(best {summary['best_val_miou']:.4f}); weights.pth is the best checkpoint")
        io.write_json(self.out / "summary.json", summary)
        return summary
