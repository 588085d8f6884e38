"""Overlays (exact blend formula, void handling, resizing, PNG) and prompt assembly."""
from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
import torch
from PIL import Image

from ttdl.text.describers import DescribeRequest, build_messages, load_template, make_support_example
from ttdl.text.describers.prompt import DEFAULT_TEMPLATE, synthetic_support
from ttdl.text.overlays import (
    difference_overlay,
    mask_overlay,
    resize_for_describer,
    to_data_url,
    to_png_bytes,
)

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / DEFAULT_TEMPLATE
NAMES = ["background", "circle", "square", "triangle", "ring", "star", "cross"]


def test_mask_overlay_formula() -> None:
    image = torch.full((3, 4, 4), 0.5)
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[0, 0] = True
    out = mask_overlay(image, mask, alpha=0.6)
    assert torch.allclose(out[:, 0, 0], torch.full((3,), 0.6 * 0.5 + 0.4))
    assert torch.allclose(out[:, 1, 1], torch.full((3,), 0.6 * 0.5))
    assert out.shape == image.shape


def test_difference_overlay_xor_and_void() -> None:
    image = torch.zeros(3, 2, 3)
    gt = torch.tensor([[1, 1, 255], [0, 0, 255]])
    pr = torch.tensor([[1, 0, 1], [1, 0, 0]])
    out = difference_overlay(image, gt, pr, class_index=1, alpha=0.6)
    white = out[0] > 0
    # (0,1) missed, (1,0) spurious; (0,2) is void and ignored even though PR says 1
    assert white.tolist() == [[False, True, False], [True, False, False]]


def test_batched_overlay_matches_single() -> None:
    images = torch.rand(2, 3, 5, 5)
    gt = torch.randint(0, 3, (2, 5, 5))
    pr = torch.randint(0, 3, (2, 5, 5))
    batched = difference_overlay(images, gt, pr, 2)
    for i in range(2):
        assert torch.allclose(batched[i], difference_overlay(images[i], gt[i], pr[i], 2))


def test_resize_keeps_label_values_and_batches() -> None:
    gt = torch.zeros(64, 64, dtype=torch.long)
    gt[:, 32:] = 255
    gt[10:30, 10:30] = 3
    image = torch.rand(3, 64, 64)
    img, g, p = resize_for_describer(image, gt, gt.clone(), 16)
    assert img.shape == (3, 16, 16) and g.shape == (16, 16) and g.dtype == torch.long
    assert set(g.unique().tolist()) == {0, 3, 255}  # nearest: no blended ids
    assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0
    imgs, gs, ps = resize_for_describer(image[None].repeat(2, 1, 1, 1), gt[None].repeat(2, 1, 1),
                                        gt[None].repeat(2, 1, 1), (8, 12))
    assert imgs.shape == (2, 3, 8, 12) and gs.shape == (2, 8, 12) and ps.shape == (2, 8, 12)


def test_png_and_data_url_round_trip() -> None:
    image = torch.zeros(3, 6, 7)
    image[0] = 1.0
    png = to_png_bytes(image)
    decoded = Image.open(io.BytesIO(png))
    assert decoded.size == (7, 6) and decoded.getpixel((0, 0)) == (255, 0, 0)
    url = to_data_url(image)
    assert url.startswith("data:image/png;base64,")
    assert base64.b64decode(url.split(",", 1)[1]) == png


# --- prompt template -------------------------------------------------------------

def _scene(size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    gt = torch.zeros(size, size, dtype=torch.long)
    gt[((yy - 28) ** 2 + (xx - 26) ** 2) <= 12**2] = 2
    return torch.rand(3, size, size), gt


def test_template_loads_with_all_sections() -> None:
    t = load_template(TEMPLATE)
    for key in ("context", "colour_map", "input_format", "task", "output_format", "query"):
        assert isinstance(t[key], str) and t[key].strip()
    assert "{CLASS_NAME}" in t["query"] or "{class_name}" in t["query"]


def test_template_missing_key_names_file_and_key(tmp_path: Path) -> None:
    data = TEMPLATE.read_text().replace("colour_map:", "colour_mop:")
    bad = tmp_path / "bad.yaml"
    bad.write_text(data)
    with pytest.raises(ValueError, match=r"bad\.yaml.*colour_map"):
        load_template(bad)


def test_template_bad_placeholder_is_reported(tmp_path: Path) -> None:
    bad = tmp_path / "typo.yaml"
    bad.write_text(TEMPLATE.read_text().replace("for the class {CLASS_NAME}. First", "for {klass}. First"))
    with pytest.raises(ValueError, match=r"typo\.yaml.*klass"):
        load_template(bad)


def test_build_messages_structure() -> None:
    template = load_template(TEMPLATE)
    image, gt = _scene()
    support = make_support_example(image, gt, 2, "square", template)
    pr = gt.clone()
    pr[:, :20] = 0
    req = DescribeRequest("u1-2", image, gt, pr, 2, "square", NAMES)
    msgs = build_messages(template, req, support, image_size=32)
    roles = [m["role"] for m in msgs]
    assert roles == ["system", "user", "assistant", "user"]
    assert [len(m["images"]) for m in msgs] == [0, 2, 0, 2]  # support images come before the query images
    assert msgs[2]["text"] == support.answer
    assert "SQUARE" in msgs[-1]["text"] and "{" not in "".join(m["text"] for m in msgs)
    for m in msgs:
        for im in m["images"]:
            assert im.shape == (3, 32, 32)
    # query overlays: GT first, then PR; the PR lacks the left part so it has fewer white pixels
    gt_ov, pr_ov = msgs[-1]["images"]
    assert float(gt_ov.sum()) > float(pr_ov.sum())


def test_build_messages_zero_shot_without_support() -> None:
    template = load_template(TEMPLATE)
    image, gt = _scene()
    req = DescribeRequest("u1-2", image, gt, gt, 2, "square", NAMES)
    msgs = build_messages(template, req, None, image_size=16)
    assert [m["role"] for m in msgs] == ["system", "user"]


def test_support_example_matches_its_answer_geometry() -> None:
    template = load_template(TEMPLATE)
    image, gt = _scene()
    s = make_support_example(image, gt, 2, "square", template)
    obj = gt == 2
    cols = torch.nonzero(obj.any(0)).flatten()
    mid = (int(cols.min()) + int(cols.max()) + 1) // 2
    assert not bool((s.pr_mask & obj)[:, :mid].any()) and bool((s.pr_mask & obj)[:, mid:].any())
    spurious = s.pr_mask & ~obj
    ys, xs = torch.nonzero(spurious, as_tuple=True)
    assert ys.min() >= 64 * 2 / 3 and xs.min() >= 64 * 2 / 3  # bottom-right cell
    assert "SQUARE" in s.answer and "left" in s.answer and "bottom right" in s.answer
    synth = synthetic_support(template, 48)
    assert synth.image.shape == (3, 48, 48) and bool(synth.gt_mask.any())


def test_support_example_refuses_object_in_corner() -> None:
    template = load_template(TEMPLATE)
    gt = torch.zeros(32, 32, dtype=torch.long)
    gt[16:, 16:] = 1
    with pytest.raises(ValueError, match="bottom-right"):
        make_support_example(torch.rand(3, 32, 32), gt, 1, "circle", template)
