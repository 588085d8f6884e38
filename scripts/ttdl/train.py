"""The one training loop every experiment uses.

The run's resolved config chooses everything: data, model, optimiser schedule,
and (for text experiments) an auxiliary *objective* built by
`ttdl.objectives`. The loop never branches on an experiment id.

Resumability: all state (model, optimiser, scheduler, scaler, RNG, cache,
objective, metric history) is written atomically to `state/last.pt` at the end
of every epoch (and every `checkpoint_every_steps`). Rerunning a killed job
continues from there. The data order of an epoch is a pure function of
(seed, epoch), so a resumed epoch skips exactly the batches already trained.
"""
from __future__ import annotations

import csv
import hashlib
import json
import io as _io
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import io
from .data import SegmentationFolder, read_class_names
from .losses import mix_losses
from .metrics import evaluate
from .models import build_model

STATE_VERSION = 1


# ---- pieces ----

def run_fingerprint(run: dict, *files: str | None) -> str:
    """Identifies the settings and input files a saved state belongs to (a changed init retrains)."""
    settings = {k: v for k, v in run.items() if k != "description"}
    settings["train"] = {k: v for k, v in run["train"].items() if k not in ("progress", "threads", "num_workers")}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for path in files:
        if path:
            with open(path, "rb") as handle:
                digest.update(hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "off"
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


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


def build_datasets(data_cfg: dict, train_cfg: dict):
    common = dict(resize=data_cfg["resize"], crop=data_cfg["crop"], image_ext=data_cfg["image_ext"])
    train_set = SegmentationFolder(data_cfg["root"], "train", hflip=train_cfg["hflip"], seed=train_cfg["seed"], **common)
    val_set = SegmentationFolder(data_cfg["root"], "val", **common)
    return train_set, val_set


def progress_bar(enabled: bool):
    def wrap(iterable, **kwargs):
        interactive = sys.stderr.isatty()
        return tqdm(iterable, disable=not enabled, dynamic_ncols=True, leave=False,
                    mininterval=0.5 if interactive else 30.0, **kwargs)
    return wrap


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


# ---- the loop --------------------------------------------------------------------

class Trainer:
    def __init__(self, run: dict, out_dir: str | Path, init_weights: str | None = None,
                 cache_path: str | None = None, encoder_path: str | None = None,
                 concat_path: str | None = None, log=print):
        self.run, self.log = run, log
        self.out = Path(out_dir)
        self.state_path = self.out / "state" / "last.pt"
        self.best_path = self.out / "state" / "best.pt"
        tc, dc = run["train"], run["data"]
        self.tc = tc
        torch.set_num_threads(tc["threads"])
        torch.manual_seed(tc["seed"])
        self.device = pick_device(tc["device"])
        self.amp_dtype = autocast_dtype(tc["amp"], self.device)
        self.class_names = read_class_names(dc["root"], dc["class_names"])
        self.num_classes = len(self.class_names)
        self.ignore_index = dc["ignore_index"]
        self.train_set, self.val_set = build_datasets(dc, tc)
        self.steps_per_epoch = len(self.train_set) // tc["batch_size"]
        if self.steps_per_epoch == 0:
            raise ValueError(f"train split has {len(self.train_set)} images, fewer than train.batch_size={tc['batch_size']}")
        self.total_steps = self.steps_per_epoch * tc["epochs"]
        mc = run["model"]
        self.model = build_model(mc["name"], self.num_classes, weights=init_weights or mc["weights"],
                                 backbone_weights=None if init_weights else mc["backbone_weights"],
                                 bn_momentum=mc["bn_momentum"]).to(self.device)
        from .objectives import build_objective  # text branch; None for plain CE runs
        self.objective = build_objective(run, self, cache_path, encoder_path, concat_path)
        if self.objective is not None and init_weights:
            self._init_aux_head(init_weights)
        params = list(self.model.parameters())
        if self.objective is not None:
            params += [p for p in self.objective.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=tc["lr"], weight_decay=tc["weight_decay"])
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, tc["warmup_steps"], self.total_steps, tc["schedule"]))
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.epoch = self.step = self.step_in_epoch = 0
        self.best_miou, self.best_epoch, self.wall_time, self.done = -1.0, -1, 0.0, False
        self.history = History()
        self.epoch_sums: dict[str, float] = {}  # running sums of the current epoch (resumed with it)
        self.epoch_count = 0
        self.bar = progress_bar(tc["progress"])
        self._kill_at = int(os.environ.get("TTDL_DEBUG_KILL_AT_STEP", "0"))
        self.fingerprint = run_fingerprint(run, init_weights, cache_path, encoder_path, concat_path)

    def _init_aux_head(self, init_weights: str) -> None:
        """Carry a trained aux head over from the init run when it fits (3.1 phase 2 -> finetune)."""
        head = io.load_torch(init_weights).get("aux_head")
        if not head:
            return
        own = self.objective.head.state_dict()
        if own.keys() == head.keys() and all(own[k].shape == head[k].shape for k in own):
            self.objective.head.load_state_dict(head)
            self.log(f"aux head initialised from {init_weights}")

    def _aux_head_state(self) -> dict:
        return self.objective.head.state_dict() if self.objective is not None else {}

    # -- persistence --
    def state_dict(self) -> dict:
        state = {
            "version": STATE_VERSION, "run_id": self.run["run_id"], "fingerprint": self.fingerprint,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "epoch": self.epoch, "step": self.step, "step_in_epoch": self.step_in_epoch,
            "best_miou": self.best_miou, "best_epoch": self.best_epoch, "wall_time": self.wall_time,
            "done": self.done, "history": self.history.rows, "rng": torch.get_rng_state(),
            "epoch_sums": self.epoch_sums, "epoch_count": self.epoch_count,
        }
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state()
        if self.objective is not None:
            state["objective"] = self.objective.state_dict_full()
        return state

    def save_state(self) -> None:
        io.save_torch(self.state_path, self.state_dict())

    def try_resume(self) -> bool:
        if not self.state_path.exists():
            return False
        state = io.load_torch(self.state_path)
        if state.get("version") != STATE_VERSION or state.get("run_id") != self.run["run_id"]:
            raise RuntimeError(f"{self.state_path} belongs to another run or format; delete it to start over")
        if state.get("fingerprint") != self.fingerprint:
            self.log(f"{self.state_path} was saved with other settings or inputs; starting this run over")
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
        if self.objective is not None:
            self.objective.load_state_dict_full(state["objective"])
        self.log(f"resumed {self.run['run_id']} from {self.state_path}: epoch {self.epoch}, "
                 f"step {self.step} ({self.step_in_epoch} into the epoch)")
        return True

    # -- steps --
    def train_step(self, batch: dict) -> dict:
        self.model.train()
        images = batch["image"].to(self.device, non_blocking=True)
        masks = batch["mask"].to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            logits, bottleneck = self.model(images)
            pixel_ce = F.cross_entropy(logits.float(), masks, ignore_index=self.ignore_index, reduction="none")
            valid = masks != self.ignore_index
            ce = pixel_ce[valid].mean() if valid.any() else pixel_ce.sum() * 0
            logs = {"ce": ce.item()}
            if self.objective is not None:
                aux, aux_logs = self.objective(batch, images, masks, logits, bottleneck, pixel_ce, valid)
                loss = mix_losses(ce, aux, self.objective.lam, self.objective.mix)
                logs |= {"aux": aux.item(), "aux_ce_ratio": aux.item() / max(ce.item(), 1e-12)}
                logs |= {f"text/{key}": value for key, value in aux_logs.items()}
            else:
                loss = ce
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.tc["grad_clip"]:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tc["grad_clip"])
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return logs | {"loss": loss.item(), "lr": self.scheduler.get_last_lr()[0]}

    def epoch_loader(self, epoch: int, skip: int = 0) -> DataLoader:
        """The epoch's batches, a pure function of (seed, epoch); `skip` drops those already trained."""
        self.train_set.set_epoch(epoch)
        order = epoch_order(len(self.train_set), self.tc["seed"], epoch)
        bs = self.tc["batch_size"]
        batches = [order[i * bs:(i + 1) * bs] for i in range(self.steps_per_epoch)][skip:]
        return DataLoader(self.train_set, batch_sampler=batches, num_workers=self.tc["num_workers"],
                          pin_memory=self.device.type == "cuda")

    def val_loader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.tc["eval_batch_size"], shuffle=False,
                          num_workers=self.tc["num_workers"])

    def validate(self) -> dict:
        metrics = evaluate(self.model, self.val_loader(), self.num_classes, self.ignore_index, self.device,
                           self.amp_dtype, self.class_names, self.bar)
        if self.objective is not None and self.objective.cfg["contrastive_validation"]:
            metrics["text"] = self.objective.validation_logs(self.model, self.val_loader(), self.device,
                                                             self.amp_dtype)
        return metrics

    def fit(self) -> dict:
        from torch.utils.tensorboard import SummaryWriter

        self.out.mkdir(parents=True, exist_ok=True)
        self.try_resume()
        writer = SummaryWriter(str(self.out / "tb"), purge_step=self.step or None)
        tc = self.tc
        try:
            while not self.done and self.epoch < tc["epochs"]:
                self._run_epoch(writer)
            self.done = True
            self.save_state()
        finally:
            writer.close()
        return self.finish()

    def _run_epoch(self, writer) -> None:
        started = time.time()
        loader = self.epoch_loader(self.epoch, skip=self.step_in_epoch)
        if self.step_in_epoch == 0:
            self.epoch_sums, self.epoch_count = {}, 0
        sums = self.epoch_sums
        if self.objective is not None:
            self.objective.start_epoch(self.epoch)
        bar = self.bar(loader, total=len(loader),
                       desc=f"{self.run['run_id']} epoch {self.epoch + 1}/{self.tc['epochs']}")
        for batch in bar:
            logs = self.train_step(batch)
            self.step += 1
            self.step_in_epoch += 1
            self.epoch_count += 1
            for key, value in logs.items():
                if not key.startswith("text/"):  # text counters enter the CSV as epoch totals
                    sums[key] = sums.get(key, 0.0) + value
                writer.add_scalar(key if key.startswith("text/") else f"train/{key}", value, self.step)
            bar.set_postfix(loss=f"{logs['loss']:.3f}")
            every = self.tc["checkpoint_every_steps"]
            if every and self.step % every == 0 and self.step_in_epoch < self.steps_per_epoch:
                self.wall_time += time.time() - started
                started = time.time()
                self.save_state()
            if self._kill_at and self.step == self._kill_at:
                os.kill(os.getpid(), signal.SIGKILL)  # test hook: die like a killed job
        metrics = self.validate()
        self.wall_time += time.time() - started
        row = {"epoch": self.epoch + 1, "step": self.step}
        row |= {f"train_{k}": v / max(self.epoch_count, 1) for k, v in sums.items() if k != "lr"}
        row |= {"lr": self.scheduler.get_last_lr()[0], "val_miou": metrics["miou"],
                "val_pixel_acc": metrics["pixel_acc"], "wall_time_s": round(self.wall_time, 2)}
        if self.objective is not None:
            row |= self.objective.epoch_logs() | metrics.get("text", {})
        self.history.rows.append(row)
        for key in ("val_miou", "val_pixel_acc"):
            writer.add_scalar(f"val/{key[4:]}", row[key], self.epoch + 1)
        self.log(f"[{self.run['run_id']}] epoch {self.epoch + 1}: loss {row.get('train_loss', float('nan')):.4f} "
                 f"val mIoU {metrics['miou']:.4f} pixel acc {metrics['pixel_acc']:.4f}")
        self.epoch += 1
        self.step_in_epoch = 0
        if metrics["miou"] > self.best_miou:
            self.best_miou, self.best_epoch = metrics["miou"], self.epoch
            io.save_torch(self.best_path, {"model": self.model.state_dict(), "epoch": self.epoch,
                                           "aux_head": self._aux_head_state(),
                                           "val": {k: metrics[k] for k in ("miou", "pixel_acc", "per_class_iou")}})
        target = self.tc["target_miou"]
        if target is not None and metrics["miou"] >= target:
            self.log(f"[{self.run['run_id']}] reached target mIoU {target} at epoch {self.epoch}; stopping")
            self.done = True
        self.save_state()

    def finish(self) -> dict:
        """Write the declared outputs from the saved state (also after a resume of a finished run)."""
        best = io.load_torch(self.best_path)
        io.save_torch(self.out / "weights.pth", {"model": best["model"], "epoch": best["epoch"],
                                                  "aux_head": best["aux_head"],
                                                  "run_id": self.run["run_id"], "class_names": self.class_names,
                                                  "model_name": self.run["model"]["name"]})
        self.history.write_csv(self.out / "metrics.csv")
        target = self.tc["target_miou"]
        summary = {
            "run_id": self.run["run_id"], "description": self.run.get("description", ""),
            "best_val_miou": best["val"]["miou"], "best_val_pixel_acc": best["val"]["pixel_acc"],
            "best_epoch": best["epoch"], "epochs": self.epoch, "steps": self.step,
            "per_class_iou": best["val"]["per_class_iou"], "wall_time_s": round(self.wall_time, 2),
            "target_miou": target,
            "target_reached": None if target is None else best["val"]["miou"] >= target,
            "device": str(self.device), "init": self.run.get("init"),
        }
        if self.objective is not None:
            summary |= self.objective.summary()
            if self.objective.cache is not None:
                self.objective.cache.save(self.out / "cache" / "cache.pt")
            self.objective.close()
        if target is not None and not summary["target_reached"]:
            self.log(f"WARNING: [{self.run['run_id']}] target mIoU {target} not reached in {self.epoch} epochs "
                     f"(best {summary['best_val_miou']:.4f}); weights.pth is the best checkpoint")
        io.write_json(self.out / "summary.json", summary)
        return summary
