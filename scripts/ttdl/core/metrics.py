"""Segmentation metrics from an accumulated confusion matrix (void pixels ignored)."""
from __future__ import annotations

import torch


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """[C, C] counts, rows = ground truth, columns = prediction."""
    valid = target != ignore_index
    idx = target[valid] * num_classes + pred[valid]
    return torch.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes).cpu()


def scores(confusion: torch.Tensor, class_names: list[str]) -> dict:
    """Pixel accuracy, mIoU over classes that occur (GT or prediction), per-class IoU."""
    conf = confusion.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    present = union > 0
    return {
        "pixel_acc": float(tp.sum() / conf.sum().clamp(min=1)),
        "miou": float(iou[present].mean()) if present.any() else 0.0,
        "per_class_iou": {name: (None if torch.isnan(v) else round(float(v), 6)) for name, v in zip(class_names, iou)},
    }


@torch.no_grad()
def evaluate(model, loader, num_classes: int, ignore_index: int, device: torch.device,
             autocast_dtype: torch.dtype | None, class_names: list[str], progress=None) -> dict:
    model.eval()
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long)
    batches = loader if progress is None else progress(loader, desc="val")
    for batch in batches:
        images = batch["image"].to(device, non_blocking=True)
        masks = batch["mask"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits, _ = model(images)
        conf += confusion_matrix(logits.argmax(1), masks, num_classes, ignore_index)
    return scores(conf, class_names) | {"confusion": conf.tolist()}
