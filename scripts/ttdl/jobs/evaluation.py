"""Jobs that use a finished checkpoint: evaluation, cache prefill, and data for encoder adaptation."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from ttdl.core import provenance
from ttdl.core.data import class_names_of, split_of
from ttdl.core.io import load_torch
from ttdl.core.metrics import evaluate
from ttdl.core.models import SegmentationNet, build_model
from ttdl.core.runtime import autocast_dtype, pick_device, progress_bar
from ttdl.core.settings import RunSettings


@dataclass
class LoadedRun:
    """A run's checkpoint on its device, with what the jobs that read it need."""

    run: RunSettings
    model: SegmentationNet
    device: torch.device
    amp_dtype: torch.dtype | None
    class_names: list[str]

    def loader(self, split: str) -> DataLoader:
        """The run's `split` in evaluation batches (the train split flips as the run trains)."""
        train = self.run.train
        return DataLoader(split_of(self.run.data, split, train), batch_size=train.eval_batch_size,
                          num_workers=train.num_workers)


def load_run(run: RunSettings, weights: str) -> LoadedRun:
    torch.set_num_threads(run.train.threads)
    device = pick_device(run.train.device)
    class_names = class_names_of(run.data)
    state = load_torch(weights)
    # Evaluating or describing weights trained on other data or classes would print numbers that look fine.
    provenance.check(provenance.for_checkpoint(run.data, class_names), state.get("provenance"), weights,
                     "checkpoint", "use it with the data and classes of the run that trained it, or rerun that "
                     "run (snakemake --forcerun train ...)")
    # The checkpoint replaces every weight; bn_momentum only shapes how BN would keep training.
    model = build_model(run.model.name, len(class_names), bn_momentum=run.model.bn_momentum).to(device)
    model.load_state_dict(state["model"])
    return LoadedRun(run, model, device, autocast_dtype(run.train.amp, device), class_names)


def evaluate_checkpoint(run: RunSettings, weights: str) -> dict:
    loaded = load_run(run, weights)
    loader = loaded.loader("val")
    started = time.time()
    result = evaluate(loaded.model, loader, len(loaded.class_names), run.data.ignore_index, loaded.device,
                      loaded.amp_dtype, loaded.class_names, progress_bar(run.train.progress))
    return result | {"run_id": run.run_id, "weights": str(weights), "num_images": len(loader.dataset),
                     "class_names": loaded.class_names, "eval_time_s": round(time.time() - started, 2)}


@torch.no_grad()
def predict_text_batches(loaded: LoadedRun, *, train_mode: bool):
    """Yield (TextBatch, batch) over the training split, as a text step would see them."""
    from ttdl.text.textbatch import build_text_batch

    run = loaded.run
    loaded.model.train(train_mode)
    bar = progress_bar(run.train.progress)
    for batch in bar(loaded.loader("train"), desc="predict"):
        images = batch["image"].to(loaded.device)
        with torch.autocast(loaded.device.type, dtype=loaded.amp_dtype, enabled=loaded.amp_dtype is not None):
            logits, _ = loaded.model(images)
        flipped = batch.get("flipped")
        yield build_text_batch(list(batch["uid"]), batch["image"], batch.get("clean_mask", batch["mask"]),
                               logits.max(1).indices.cpu(), size=run.describer.image_size,
                               num_classes=len(loaded.class_names), ignore_index=run.data.ignore_index,
                               include_predicted=run.objective.include_predicted_classes,
                               flipped=None if flipped is None else [bool(f) for f in flipped]), batch
