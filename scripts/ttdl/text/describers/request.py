"""One (image, class) for a describer: the type every describer and the prompt builder share."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class DescribeRequest:
    key: str  # "{uid}-{c}", also seeds the rules describer's wording
    image: Tensor  # [3,H,W] float in [0,1]
    gt: Tensor  # [H,W] long class ids, 255 = void
    pr: Tensor  # [H,W] long class ids
    class_index: int
    class_name: str
    class_names: list[str]
