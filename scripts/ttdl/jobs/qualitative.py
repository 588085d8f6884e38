"""Qualitative panels: a few val images with GT, the prediction before and after finetuning,
and what the run's describer writes about each prediction.

The images are fixed (the first K val uids whose GT has a non-background
class) so panels of different runs show the same scenes.
"""
from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ttdl.core.io import atomic_path
from ttdl.core.palette import voc_palette
from ttdl.core.settings import RunSettings
from ttdl.jobs.evaluation import LoadedRun, load_run
from ttdl.text.describers import describer_for_run
from ttdl.text.textbatch import build_text_batch

DPI = 120          # as the report's other figures (ttdl.report.plots.DPI; jobs do not import report)
WRAP = 46          # characters per line of describer text
FONT = 7.5         # points, describer text
LINE_INCH = FONT * 1.3 / 72


@dataclass
class PanelRow:
    """One val image: its arrays and the describer's text per described class."""

    uid: str
    image: np.ndarray                      # HxWx3 uint8
    gt: np.ndarray                         # HxW class ids (255 = void)
    before: np.ndarray                     # HxW predicted ids, init checkpoint
    after: np.ndarray                      # HxW predicted ids, finetuned checkpoint
    miou_before: float
    miou_after: float
    text_before: list[tuple[str, str]]     # (class name, text)
    text_after: list[tuple[str, str]]


def pick_samples(dataset, k: int, ignore_index: int) -> list[dict]:
    """The first `k` samples (dataset order) whose GT holds a class other than background (0) and void."""
    picked = []
    for index in range(len(dataset)):
        sample = dataset[index]
        mask = sample["mask"]
        if ((mask != 0) & (mask != ignore_index)).any():
            picked.append(sample)
            if len(picked) == k:
                break
    if not picked:
        raise ValueError(f"no val image of {getattr(dataset, 'root', dataset)} has a non-background class")
    return picked


@torch.no_grad()
def predict(loaded: LoadedRun, images: torch.Tensor) -> torch.Tensor:
    """Arg-max class ids [N,H,W] of the loaded model (eval mode)."""
    loaded.model.eval()
    x = images.to(loaded.device)
    with torch.autocast(loaded.device.type, dtype=loaded.amp_dtype, enabled=loaded.amp_dtype is not None):
        logits, _ = loaded.model(x)
    return logits.argmax(1).cpu()


def image_miou(gt: torch.Tensor, pr: torch.Tensor, ignore_index: int) -> float:
    """Mean IoU over the classes present in GT or prediction of one image (void pixels ignored)."""
    valid = gt != ignore_index
    classes = torch.unique(torch.cat([gt[valid], pr[valid]]))
    ious = []
    for c in classes.tolist():
        g, p = (gt == c) & valid, (pr == c) & valid
        ious.append((g & p).sum().item() / max(1, (g | p).sum().item()))
    return float(np.mean(ious)) if ious else float("nan")


def describe(run: RunSettings, describer, class_names: list[str], uids: list[str], images: torch.Tensor,
             gt: torch.Tensor, pr: torch.Tensor) -> list[list[tuple[str, str]]]:
    """Per image, (class name, text) for each pair the run's text objective would describe."""
    batch = build_text_batch(uids, images, gt, pr, size=run.describer.image_size,
                             num_classes=len(class_names), ignore_index=run.data.ignore_index,
                             include_predicted=run.objective.include_predicted_classes)
    texts = describer.describe(batch.requests(list(range(len(batch.keys))), class_names))
    out: list[list[tuple[str, str]]] = [[] for _ in uids]
    for row, c, text in zip(batch.rows, batch.classes, texts):
        out[row].append((class_names[c], text if text else "(no usable answer)"))
    return out


def build_rows(run: RunSettings, before: str, after: str, k: int = 4) -> tuple[list[PanelRow], list[str]]:
    """Predict the K fixed val images with both checkpoints and describe both predictions."""
    ignore = run.data.ignore_index
    loaded_before = load_run(run, before)
    loaded_after = load_run(run, after)
    class_names = loaded_after.class_names
    samples = pick_samples(loaded_after.loader("val").dataset, k, ignore)
    uids = [s["uid"] for s in samples]
    images = torch.stack([s["image"] for s in samples])
    gt = torch.stack([s["mask"] for s in samples])
    pr_before, pr_after = predict(loaded_before, images), predict(loaded_after, images)
    describer = describer_for_run(run.describer, class_names, loaded_after.loader("train").dataset)
    try:
        text_before = describe(run, describer, class_names, uids, images, gt, pr_before)
        text_after = describe(run, describer, class_names, uids, images, gt, pr_after)
    finally:
        describer.close()
    rows = []
    for i, uid in enumerate(uids):
        rows.append(PanelRow(
            uid=uid, image=(images[i].permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8),
            gt=gt[i].numpy(), before=pr_before[i].numpy(), after=pr_after[i].numpy(),
            miou_before=image_miou(gt[i], pr_before[i], ignore), miou_after=image_miou(gt[i], pr_after[i], ignore),
            text_before=text_before[i], text_after=text_after[i]))
    return rows, class_names


def colourise(mask: np.ndarray) -> np.ndarray:
    """Class ids -> HxWx3 uint8 in the VOC palette (void 255 in its usual cream)."""
    palette = np.asarray(voc_palette(), dtype=np.uint8).reshape(256, 3)
    return palette[np.clip(mask, 0, 255).astype(np.int64)]


def _wrap(entries: list[tuple[str, str]]) -> str:
    blocks = [textwrap.fill(f"[{name}] {text}", WRAP) for name, text in entries]
    return "\n\n".join(blocks) if blocks else "(nothing described)"


def render_panel(rows: list[PanelRow], class_names: list[str], out_png: str | Path, title: str,
                 before_label: str = "PR before", after_label: str = "PR after") -> None:
    """Draw the rows (image | GT | PR before | PR after | text before | text after) into one PNG."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    if not rows:
        raise ValueError("render_panel: no rows")
    image_w, text_w = 1.8, 3.4
    texts = [(_wrap(r.text_before), _wrap(r.text_after)) for r in rows]
    heights = [max(image_w + 0.35, LINE_INCH * max(a.count("\n"), b.count("\n")) + 0.5) for a, b in texts]
    header, footer = 0.75, 0.65
    width = 4 * image_w + 2 * text_w + 0.6
    height = sum(heights) + header + footer
    fig = Figure(figsize=(width, height))
    grid = fig.add_gridspec(len(rows), 6, width_ratios=[image_w] * 4 + [text_w] * 2, height_ratios=heights,
                            left=0.35 / width, right=1 - 0.1 / width, top=1 - header / height,
                            bottom=footer / height, wspace=0.06, hspace=0.12)
    columns = ["image", "ground truth", before_label, after_label, "describer on PR before",
               "describer on PR after"]
    for r, (row, (tb, ta)) in enumerate(zip(rows, texts)):
        pictures = [row.image, colourise(row.gt), colourise(row.before), colourise(row.after)]
        notes = ["", "", f"image mIoU {row.miou_before:.2f}", f"image mIoU {row.miou_after:.2f}"]
        for c, (picture, note) in enumerate(zip(pictures, notes)):
            ax = fig.add_subplot(grid[r, c])
            ax.imshow(picture, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(note, fontsize=8)
            if c == 0:
                ax.set_ylabel(row.uid, fontsize=8)
            if r == 0:
                ax.set_title(columns[c], fontsize=9)
        for c, text in ((4, tb), (5, ta)):
            ax = fig.add_subplot(grid[r, c])
            ax.axis("off")
            ax.text(0.03, 1.0, text, va="top", ha="left", fontsize=FONT, family="sans-serif",
                    transform=ax.transAxes)
            if r == 0:
                ax.set_title(columns[c], fontsize=9)
    handles = [Patch(facecolor=colourise(np.array([i]))[0] / 255, edgecolor="0.5", label=name)
               for i, name in enumerate(class_names)]
    handles.append(Patch(facecolor=colourise(np.array([255]))[0] / 255, edgecolor="0.5", label="void (ignored)"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 0.05 / height))
    fig.suptitle(title, fontsize=11, y=1 - 0.12 / height, va="top")
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)


def qualitative_panel(run: RunSettings, before: str, after: str, out_png: str | Path, k: int = 4) -> list[PanelRow]:
    """Build and draw the panel of `run`: `before` = its init checkpoint, `after` = its finetuned one."""
    rows, class_names = build_rows(run, before, after, k)
    init = run.init or "init"
    title = (f"Run {run.run_id}: predictions of the init checkpoint ({init}) and of the finetuned run, "
             f"with the {run.describer.backend} describer's text on each")
    render_panel(rows, class_names, out_png, title, before_label=f"PR before ({init})",
                 after_label=f"PR after ({run.run_id})")
    return rows
