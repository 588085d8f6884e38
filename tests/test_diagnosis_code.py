"""The one-hot diagnosis code says what the rules describer says, as exact one-hots per factor."""
from __future__ import annotations

import pytest
import torch

from ttdl.core.settings import DescriberSettings
from ttdl.text.describers import DescribeRequest, build_describer
from ttdl.text.describers.rules import erode
from ttdl.text.diagnosis_code import (
    DIAGNOSIS_KINDS,
    LOCATIONS,
    code_dim,
    code_embedding,
    diagnosis_code,
    parse_code,
)

NAMES = ["background", "circle", "square", "triangle"]
SIZE = 96
CFG = DescriberSettings.from_partial({"backend": "rules"})
yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")


def disk(cy: int, cx: int, r: int = 20, c: int = 1) -> torch.Tensor:
    return torch.where(((yy - cy) ** 2 + (xx - cx) ** 2) <= r**2, c, 0)


GT = disk(48, 48)


def code(pr: torch.Tensor, gt: torch.Tensor = GT, c: int = 1) -> str:
    return diagnosis_code(DescribeRequest(f"k-{c}", torch.zeros(3, SIZE, SIZE), gt, pr, c, NAMES[c], NAMES), CFG)


def test_codes_of_hand_built_masks() -> None:
    assert code(GT.clone()) == "kind=none|loc=whole|cls=1"
    assert code(torch.where(xx < 48, 0, GT)) == "kind=incomplete|loc=left|cls=1"
    assert code(torch.where((GT == 1) & (yy < 40), 3, GT)) == "kind=confused|loc=top|cls=1"
    assert code(disk(48, 51)) == "kind=shifted|loc=right|cls=1"  # 3 px: the direction of the move
    assert code(disk(28, 48)) == "kind=shifted|loc=top|cls=1"
    assert code(disk(51, 45)) == "kind=shifted|loc=bottom_left|cls=1"
    ring = torch.from_numpy(erode(GT.numpy().astype(bool), 4)).long()
    assert code(ring) == "kind=incomplete|loc=whole|cls=1"
    assert code(disk(48, 48, 24)) == "kind=over|loc=whole|cls=1"
    blob = GT.clone()
    blob[80:92, 4:16] = 1
    assert code(blob) == "kind=hallucinated|loc=bottom_left|cls=1"
    assert code(GT.clone(), torch.zeros_like(GT)) == "kind=hallucinated|loc=center|cls=1"  # class absent in GT
    square = torch.zeros(SIZE, SIZE, dtype=torch.long)
    square[5:30, 60:90] = 2
    assert code(torch.zeros_like(square), square, c=2) == "kind=missed|loc=top_right|cls=2"
    assert code(torch.where(square == 2, 3, 0), square, c=2) == "kind=confused|loc=top_right|cls=2"
    loose = torch.where(torch.nn.functional.max_pool2d(GT[None, None].float(), 3, 1, 1)[0, 0] > 0, 1, 0)
    assert code(loose) == "kind=boundary|loc=whole|cls=1"


def test_code_agrees_with_the_describer_text() -> None:
    """Same measurement, so the code's kind and the text's key word agree."""
    describer = build_describer(CFG, NAMES)
    key_word = {"incomplete": "incomplete", "shifted": "shifted", "over": "over-extend", "none": "no significant",
                "hallucinated": "hallucinated"}
    blob = GT.clone()
    blob[80:92, 4:16] = 1
    for pr in (torch.where(xx < 48, 0, GT), disk(48, 68), disk(48, 48, 24), GT.clone(), blob):
        req = DescribeRequest("k-1", torch.zeros(3, SIZE, SIZE), GT, pr, 1, "circle", NAMES)
        kind, _, _ = parse_code(diagnosis_code(req, CFG))
        assert key_word[kind] in describer.describe([req])[0].lower()


def test_large_requests_are_analysed_at_analysis_size() -> None:
    big_gt = torch.nn.functional.interpolate(GT[None, None].float(), size=(400, 400), mode="nearest")[0, 0].long()
    pr = torch.roll(big_gt, 40, 1)  # 40 px of 400 is 12 px at 112: a shift to the right
    req = DescribeRequest("k-1", torch.zeros(3, 400, 400), big_gt, pr, 1, "circle", NAMES)
    assert diagnosis_code(req, CFG) == "kind=shifted|loc=right|cls=1"


def test_code_embedding_is_one_hot_per_factor() -> None:
    num_classes = 4
    codes = ["kind=none|loc=whole|cls=0", "kind=shifted|loc=top_left|cls=3", "kind=incomplete|loc=left|cls=1",
             code(torch.where(xx < 48, 0, GT))]
    emb = code_embedding(codes, num_classes)
    k, n = len(DIAGNOSIS_KINDS), len(LOCATIONS)
    assert emb.shape == (4, code_dim(num_classes)) == (4, k + n + num_classes) and emb.dtype == torch.float32
    assert code_dim(num_classes) == 8 + 10 + 4
    for block in (emb[:, :k], emb[:, k:k + n], emb[:, k + n:]):
        assert torch.equal(block.sum(1), torch.ones(4)) and set(block.unique().tolist()) == {0.0, 1.0}
    assert emb[1, DIAGNOSIS_KINDS.index("shifted")] == 1 and emb[1, k + LOCATIONS.index("top_left")] == 1
    assert emb[1, k + n + 3] == 1
    assert torch.equal(emb[2], emb[3])  # the same diagnosis, computed or written by hand
    assert code_embedding([], num_classes).shape == (0, code_dim(num_classes))


@pytest.mark.parametrize("bad", ["kind=nope|loc=left|cls=1", "kind=none|loc=middle|cls=1", "kind=none|loc=left",
                                 "kind=none|loc=left|cls=x", "loc=left|cls=1|kind=none|extra=1", "free text"])
def test_malformed_codes_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="not a diagnosis code"):
        code_embedding([bad], 4)


def test_class_outside_the_embedding_is_refused() -> None:
    with pytest.raises(ValueError, match="outside"):
        code_embedding(["kind=none|loc=whole|cls=4"], 4)
