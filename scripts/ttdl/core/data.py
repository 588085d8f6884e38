"""Datasets in Pascal VOC's folder layout, and their loaders.

The embedded synthetic set and real VOC share one loader: images under
JPEGImages/, palette-PNG label maps under SegmentationClass/ (pixel value =
class index, 255 = void), and split lists under ImageSets/Segmentation/.
Missing, undecodable or corrupt files fail with the offending path in the
message, and so does a label value that is neither a class nor the ignore index
(instead of an anonymous "Target 7 is out of bounds" later, or a device-side
assert on CUDA).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ttdl.core.degrade import degrade_label
from ttdl.core.settings import DataSettings, DegradeLabels, TrainSettings


class DatasetError(RuntimeError):
    """Raised for missing or unreadable dataset files; the message names the file."""


def read_split(root: str | Path, split: str) -> list[str]:
    path = Path(root) / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not path.is_file():
        raise DatasetError(
            f"split list not found: {path}. Generate the default data with "
            f"`snakemake --cores 1 resources/data/synthetic/classes.txt`, or point data.root at a VOC-layout folder."
        )
    uids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not uids:
        raise DatasetError(f"split list is empty: {path}")
    return uids


def _flip_for(seed: int, epoch: int, uid: str) -> bool:
    """A reproducible coin per (seed, epoch, image), independent of worker and order."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{uid}".encode(), digest_size=1).digest()
    return digest[0] & 1 == 1


class SegmentationFolder(Dataset):
    """(uid, image in [0,1], label map) samples of one split of a VOC-layout folder.

    Images are resized so the shorter side is `resize`, then center-cropped to
    `crop` (the original's 520/520 for VOC; the synthetic set is already square).
    With `num_classes`, every label map is checked to hold only 0..num_classes-1
    and `ignore_index` (one torch.unique per sample).

    With an active `degrade` (privileged information), "mask" is the degraded
    label CE trains on and "clean_mask" the clean one the describer sees, both
    flipped with the image; without it there is no "clean_mask" key.
    """

    def __init__(self, root: str | Path, split: str, *, resize: int, crop: int,
                 hflip: bool = False, seed: int = 0, image_ext: str = ".jpg",
                 num_classes: int | None = None, ignore_index: int = 255,
                 degrade: DegradeLabels | None = None):
        self.root = Path(root)
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.split = split
        self.uids = read_split(self.root, split)
        self.resize, self.crop = resize, crop
        self.hflip, self.seed, self.epoch = hflip, seed, 0
        self.image_ext = image_ext
        self.degrade = degrade if degrade is not None and degrade.active else None
        missing = [p for uid in self.uids for p in self._paths(uid) if not p.is_file()]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise DatasetError(f"dataset file missing: {missing[0]}{more}; listed in {split}.txt of {self.root}")

    def _paths(self, uid: str) -> tuple[Path, Path]:
        return (self.root / "JPEGImages" / f"{uid}{self.image_ext}",
                self.root / "SegmentationClass" / f"{uid}.png")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.uids)

    def _open(self, path: Path, mode: str | None) -> np.ndarray:
        try:
            with Image.open(path) as img:
                img.load()
                if mode is not None:
                    img = img.convert(mode)
                elif img.mode not in ("P", "L"):
                    raise DatasetError(f"label map {path} has mode {img.mode}; expected a palette (P) or grey (L) "
                                       "PNG of class indices")
                return np.array(img)
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise DatasetError(f"cannot read dataset file {path}: {exc}") from exc

    def _check_label_values(self, label: torch.Tensor, path: Path) -> None:
        if self.num_classes is None:
            return
        values = torch.unique(label)
        bad = values[(values >= self.num_classes) & (values != self.ignore_index)].tolist()
        if bad:
            raise DatasetError(f"label map {path} holds values {bad[:10]} outside the classes "
                               f"0..{self.num_classes - 1} and the ignore index {self.ignore_index}; fix the file, "
                               f"or data.class_names / data.ignore_index if they are wrong")

    def __getitem__(self, index: int) -> dict:
        uid = self.uids[index]
        image_path, label_path = self._paths(uid)
        image = torch.from_numpy(self._open(image_path, "RGB")).permute(2, 0, 1).float() / 255.0
        label = torch.from_numpy(self._open(label_path, None).astype(np.int64))
        self._check_label_values(label, label_path)
        if image.shape[1:] != label.shape:
            raise DatasetError(f"size mismatch: {image_path} is {tuple(image.shape[1:])}, "
                               f"{label_path} is {tuple(label.shape)}")
        image, label = resize_and_crop(image, label, self.resize, self.crop)
        clean = None
        if self.degrade is not None:
            clean, label = label, self._degraded(uid, label)
        if self.hflip and _flip_for(self.seed, self.epoch, uid):
            image, label = image.flip(-1), label.flip(-1)
            clean = None if clean is None else clean.flip(-1)
        sample = {"uid": uid, "image": image.contiguous(), "mask": label.contiguous(),
                  "flipped": bool(self.hflip and _flip_for(self.seed, self.epoch, uid))}  # keys the view's texts
        if clean is not None:
            sample["clean_mask"] = clean.contiguous()
        return sample

    def _degraded(self, uid: str, label: torch.Tensor) -> torch.Tensor:
        """The fixed degraded label of `uid`: made after resize and crop and before the flip, so every epoch
        trains on the same noisy label."""
        d = self.degrade
        return torch.from_numpy(degrade_label(label.numpy(), d.kind, fraction=d.fraction, seed=d.seed, uid=uid,
                                              ignore_index=self.ignore_index))


def split_of(data: DataSettings, split: str, train: TrainSettings | None = None) -> SegmentationFolder:
    """One split of the run's dataset; with `train`, the train split flips as train.hflip says (seed train.seed)
    and its labels are degraded as data.degrade_labels says (the clean ones in "clean_mask").

    Label values are checked against the run's classes when it has any (data.class_names or classes.txt).
    """
    augment = {} if train is None else {"hflip": train.hflip and split == "train", "seed": train.seed}
    if train is not None and split == "train":  # degraded labels: only what a training run trains on
        augment["degrade"] = data.degrade_labels
    return SegmentationFolder(data.root, split, resize=data.resize, crop=data.crop, image_ext=data.image_ext,
                              num_classes=class_count_of(data), ignore_index=data.ignore_index, **augment)


def class_count_of(data: DataSettings) -> int | None:
    """The run's number of classes, or None when neither data.class_names nor classes.txt names them."""
    try:
        return len(class_names_of(data))
    except DatasetError:
        return None


def class_names_of(data: DataSettings) -> list[str]:
    """The run's class names: data.class_names, else the dataset's classes.txt."""
    return read_class_names(data.root, data.class_names)


def resize_and_crop(image: torch.Tensor, label: torch.Tensor, resize: int, crop: int):
    """Shorter side to `resize` (bilinear image, nearest labels), then a centred `crop` square."""
    h, w = label.shape
    if min(h, w) != resize or min(h, w) < crop:
        scale = resize / min(h, w)
        size = (max(crop, round(h * scale)), max(crop, round(w * scale)))
        image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        label = F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].long()
        h, w = size
    top, left = (h - crop) // 2, (w - crop) // 2
    return image[:, top:top + crop, left:left + crop], label[top:top + crop, left:left + crop]


def read_class_names(root: str | Path, configured: list[str] | None) -> list[str]:
    """Class names from config, else from the dataset's classes.txt."""
    if configured:
        return list(configured)
    path = Path(root) / "classes.txt"
    if not path.is_file():
        raise DatasetError(f"no class names: set data.class_names in the config or provide {path}")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]
