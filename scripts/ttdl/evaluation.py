"""Jobs that use a finished checkpoint: evaluation, cache prefill, and data for encoder adaptation."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from .data import SegmentationFolder, read_class_names
from .io import load_torch
from .metrics import evaluate
from .models import SegmentationNet, build_model
from .train import autocast_dtype, pick_device, progress_bar


@dataclass
class LoadedRun:
    model: SegmentationNet
    device: torch.device
    amp_dtype: torch.dtype | None
    class_names: list[str]

    def loader(self, run: dict, split: str) -> DataLoader:
        dc, tc = run["data"], run["train"]
        dataset = SegmentationFolder(dc["root"], split, resize=dc["resize"], crop=dc["crop"],
                                     image_ext=dc["image_ext"], hflip=tc["hflip"] and split == "train",
                                     seed=tc["seed"])
        return DataLoader(dataset, batch_size=tc["eval_batch_size"], num_workers=tc["num_workers"])


def load_run(run: dict, weights: str) -> LoadedRun:
    tc, dc = run["train"], run["data"]
    torch.set_num_threads(tc["threads"])
    device = pick_device(tc["device"])
    class_names = read_class_names(dc["root"], dc["class_names"])
    model = build_model(run["model"]["name"], len(class_names)).to(device)
    model.load_state_dict(load_torch(weights)["model"])
    return LoadedRun(model, device, autocast_dtype(tc["amp"], device), class_names)


def evaluate_checkpoint(run: dict, weights: str) -> dict:
    loaded = load_run(run, weights)
    loader = loaded.loader(run, "val")
    started = time.time()
    result = evaluate(loaded.model, loader, len(loaded.class_names), run["data"]["ignore_index"], loaded.device,
                      loaded.amp_dtype, loaded.class_names, progress_bar(run["train"]["progress"]))
    return result | {"run_id": run["run_id"], "weights": str(weights), "num_images": len(loader.dataset),
                     "class_names": loaded.class_names, "eval_time_s": round(time.time() - started, 2)}


@torch.no_grad()
def predict_text_batches(run: dict, loaded: LoadedRun, *, train_mode: bool):
    """Yield (TextBatch, batch) over the training split, as a text step would see them."""
    from .textbatch import build_text_batch

    loaded.model.train(train_mode)
    oc = run["objective"]
    bar = progress_bar(run["train"]["progress"])
    for batch in bar(loaded.loader(run, "train"), desc="predict"):
        images = batch["image"].to(loaded.device)
        with torch.autocast(loaded.device.type, dtype=loaded.amp_dtype, enabled=loaded.amp_dtype is not None):
            logits, _ = loaded.model(images)
        yield build_text_batch(list(batch["uid"]), batch["image"], batch["mask"], logits.argmax(1).cpu(),
                               size=run["describer"]["image_size"], num_classes=len(loaded.class_names),
                               ignore_index=run["data"]["ignore_index"],
                               include_predicted=oc["include_predicted_classes"]), batch
