"""From a batch of predictions to the (image, class) pairs that carry text.

Shared by the text objectives, the cache prefill and the encoder-adaptation
data collection, so that all three agree on keys, classes and describer views.

Keys name the *view*, not just the image: "{uid}-{c}" for the image as stored and
"{uid}~flip-{c}" for its horizontally flipped view (train.hflip). A text says
"left" and "right" about the view it was written for, so a flipped view must
never reuse a text written for the other one, and the mask-text cache keeps the
two apart by key.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ttdl.text.describers import DescribeRequest
from ttdl.text.overlays import resize_for_describer


@dataclass
class TextBatch:
    """Describer-size views of a batch and its significant (row, class) pairs."""

    images: torch.Tensor        # [N,3,s,s] in [0,1]
    gt: torch.Tensor            # [N,s,s] class ids (void kept)
    pr: torch.Tensor            # [N,s,s] predicted class ids
    rows: list[int]             # batch row of each pair
    classes: list[int]          # class of each pair
    keys: list[str]             # text_key(uid, c, flipped): "{uid}-{c}" or "{uid}~flip-{c}"

    def pr_masks(self, positions: list[int] | None = None) -> torch.Tensor:
        """Binary predicted masks [K,s,s] of the pairs (all, or those at `positions`)."""
        positions = range(len(self.keys)) if positions is None else positions
        if not positions:
            return torch.zeros((0, *self.pr.shape[-2:]), dtype=torch.bool)
        rows = torch.tensor([self.rows[p] for p in positions])
        classes = torch.tensor([self.classes[p] for p in positions])
        return self.pr[rows] == classes.view(-1, 1, 1)

    def requests(self, positions: list[int], class_names: list[str]) -> list[DescribeRequest]:
        return [DescribeRequest(key=self.keys[p], image=self.images[self.rows[p]], gt=self.gt[self.rows[p]],
                                pr=self.pr[self.rows[p]], class_index=self.classes[p],
                                class_name=class_names[self.classes[p]], class_names=class_names)
                for p in positions]


def significant_classes(gt: torch.Tensor, pr: torch.Tensor | None, num_classes: int, ignore_index: int,
                        include_predicted: bool = False) -> list[int]:
    """Classes in the GT, background (0) dropped unless alone; optionally predicted-only ones too."""
    present = torch.bincount(gt[gt != ignore_index].flatten(), minlength=num_classes) > 0
    if include_predicted and pr is not None:
        present |= torch.bincount(pr.flatten(), minlength=num_classes) > 0
    classes = present.nonzero().flatten().tolist()
    if len(classes) > 1 and 0 in classes:
        classes.remove(0)
    return classes


FLIP_MARK = "~flip"  # in a key, after the uid: the pair belongs to the horizontally flipped view


def text_key(uid: str, class_index: int, flipped: bool = False) -> str:
    """The cache key of (view, class): the flipped view of an image has keys of its own (see the module doc)."""
    return f"{uid}{FLIP_MARK if flipped else ''}-{class_index}"


def split_key(key: str) -> tuple[str, int, bool]:
    """(uid, class index, flipped) of a `text_key`; the inverse, for code that groups keys by image.

    (A uid that itself ends in "~flip" would read as flipped; dataset uids do not.)
    """
    view, _, class_index = key.rpartition("-")
    uid = view.removesuffix(FLIP_MARK)
    return uid, int(class_index), uid != view


def build_text_batch(uids: list[str], images: torch.Tensor, gt: torch.Tensor, pr: torch.Tensor, *,
                     size: int, num_classes: int, ignore_index: int,
                     include_predicted: bool = False,
                     flipped: Sequence[bool] | torch.Tensor | None = None) -> TextBatch:
    """The batch's significant pairs at describer size.

    flipped: per row, whether the row is the horizontally flipped view (the loader's
    batch["flipped"]); it puts the flipped rows under keys of their own. None: every
    row is keyed as the image as stored (callers without augmentation).
    """
    if flipped is None:
        flips = [False] * len(uids)
    else:
        flips = [bool(f) for f in (flipped.tolist() if isinstance(flipped, torch.Tensor) else flipped)]
        if len(flips) != len(uids):
            raise ValueError(f"{len(uids)} uids but {len(flips)} flipped flags")
    with torch.no_grad():  # resized where the batch is (a GPU), then only the small views move to the CPU
        small_images, small_gt, small_pr = resize_for_describer(images.detach().float(), gt, pr, size)
        small_images, small_gt, small_pr = small_images.cpu(), small_gt.cpu(), small_pr.cpu()
    rows, classes, keys = [], [], []
    for row, uid in enumerate(uids):
        for c in significant_classes(small_gt[row], small_pr[row], num_classes, ignore_index, include_predicted):
            rows.append(row)
            classes.append(c)
            keys.append(text_key(uid, c, flips[row]))
    return TextBatch(small_images, small_gt, small_pr, rows, classes, keys)
