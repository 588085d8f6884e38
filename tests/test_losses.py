"""Each loss against a hand computation on 2-3 rows of 2-d features."""
import math

import pytest
import torch
import torch.nn.functional as F

from ttdl.core.losses import (
    SIGLIP_INIT_LOGIT_BIAS,
    SIGLIP_INIT_LOGIT_SCALE,
    grouped_siglip,
    mix_losses,
    paired_negatives_siglip,
    pixel_weight_maps,
    siglip_pair_loss,
    variable_text_siglip,
    xen_rescale_loss,
)


def sp(u: float) -> float:
    """softplus: -log sigmoid(z) = sp(-z), -log sigmoid(-z) = sp(z)."""
    return math.log1p(math.exp(u))


def t(rows, grad=True):
    return torch.tensor(rows, dtype=torch.float32, requires_grad=grad)


def assert_close(value: torch.Tensor, expected: float) -> None:
    assert value.dim() == 0
    assert value.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


# -- 3g: standard SigLIP ----------------------------------------------------

def test_siglip_pair_loss_hand_value_and_grads():
    img = t([[1.0, 0.0], [0.0, 1.0]])
    txt = t([[0.6, 0.8], [0.0, 1.0]])
    scale = torch.tensor(math.log(2.0), requires_grad=True)
    bias = torch.tensor(-1.0, requires_grad=True)
    # logits = 2*<img_i, txt_j> - 1: dots [[0.6, 0], [0.8, 1]] -> [[0.2, -1], [0.6, 1]]
    expected = (sp(-0.2) + sp(-1.0) + sp(-1.0) + sp(0.6)) / 2
    loss = siglip_pair_loss(img, txt, scale, bias)
    assert_close(loss, expected)
    loss.backward()
    assert scale.grad is not None and bias.grad is not None and img.grad is not None


def test_siglip_init_constants():
    assert math.exp(SIGLIP_INIT_LOGIT_SCALE) == pytest.approx(10.0)
    assert SIGLIP_INIT_LOGIT_BIAS == -10.0


# -- 3b: VariableText SigLIP ----------------------------------------------------

def test_variable_text_siglip_hand_value():
    img = t([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    txt = t([[1.0, 1.0], [0.5, -1.0], [-1.0, 1.0]])
    owner = torch.tensor([0, 0, 1])
    # z = 2*<x, t> - 0.5
    # row 0: dots 1, 0.5, -1 -> z 1.5, 0.5, -2.5; own texts 0,1; negative text 2
    row0 = (sp(-1.5) + sp(-0.5)) / 2 + sp(-2.5)
    # row 1: dots 2, -2, 2 -> z 3.5, -4.5, 3.5; own text 2; negatives 0,1
    row1 = sp(-3.5) + sp(3.5) + sp(-4.5)
    # row 2 has no text: contributes 0 but counts in the mean over 3 rows
    loss = variable_text_siglip(img, txt, owner, scale=2.0, bias=-0.5)
    assert_close(loss, (row0 + row1 + 0.0) / 3)
    loss.backward()
    assert torch.all(img.grad[2] == 0)  # the text-less row gets no gradient
    assert torch.all(torch.isfinite(txt.grad))


def test_variable_text_siglip_text_order_irrelevant():
    img = t([[1.0, 0.0], [0.0, 2.0]], grad=False)
    txt = t([[1.0, 1.0], [0.5, -1.0], [-1.0, 1.0]], grad=False)
    a = variable_text_siglip(img, txt, torch.tensor([0, 0, 1]))
    b = variable_text_siglip(img, txt[[2, 0, 1]], torch.tensor([1, 0, 0]))
    assert a.item() == pytest.approx(b.item())


def test_variable_text_siglip_no_text_is_zero_with_graph():
    img = t([[1.0, 2.0]])
    loss = variable_text_siglip(img, torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))
    assert loss.item() == 0.0 and loss.dim() == 0
    loss.backward()
    assert torch.all(img.grad == 0)


# -- 3c: Grouped SigLIP ---------------------------------------------------------

GROUP_IMG = [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]  # rows 0,1: same image, two classes
GROUP_TXT = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
GROUPS = torch.tensor([7, 7, 3])
# z = <x_i, t_j>: [[1, 0, 1], [1, 0, 1], [0, 1, 1]]


def test_grouped_siglip_masked_hand_value():
    row0 = sp(-1.0) + sp(1.0)  # negative (0,1) masked: same group
    row1 = sp(-0.0) + sp(1.0)  # negative (1,0) masked
    row2 = sp(-1.0) + sp(0.0) + sp(1.0)
    expected = ((row0 + row1) / 2 + row2 / 1) / 2
    loss = grouped_siglip(t(GROUP_IMG), t(GROUP_TXT), GROUPS)
    assert_close(loss, expected)


def test_grouped_siglip_seed_hand_value():
    row0 = sp(-1.0) + sp(0.0) + sp(1.0)
    row1 = sp(-0.0) + sp(1.0) + sp(1.0)
    row2 = sp(-1.0) + sp(0.0) + sp(1.0)
    expected = ((row0 + row1) / 2 + row2) / 2
    img = t(GROUP_IMG)
    loss = grouped_siglip(img, t(GROUP_TXT), GROUPS, mask_same_group_negatives=False)
    assert_close(loss, expected)
    loss.backward()
    assert torch.all(torch.isfinite(img.grad))


def test_grouped_siglip_scale_bias():
    # single row: only the positive; z = 3*1 + 0.5
    loss = grouped_siglip(t([[1.0, 0.0]]), t([[1.0, 0.0]]), torch.tensor([0]), scale=3.0, bias=0.5)
    assert_close(loss, sp(-3.5))


# -- 3d: paired synthetic negatives ---------------------------------------------

def test_paired_negatives_hand_value():
    img = t([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    pos = t([[2.0, 0.0], [0.0, 1.0], [1.0, -1.0]])
    neg = t([[[1.0, 0.0], [0.0, 1.0]], [[0.0, -1.0], [1.0, 1.0]], [[1.0, 1.0], [-1.0, 0.0]]])
    groups = torch.tensor([0, 0, 1])
    # z = 1.5*dot + 0.25; pos dots 2, 1, 0; neg dots row0 (1, 0), row1 (-1, 1), row2 (2, -1)
    r0 = sp(-3.25) + sp(1.75) + sp(0.25)
    r1 = sp(-1.75) + sp(-1.25) + sp(1.75)
    r2 = sp(-0.25) + sp(3.25) + sp(-1.25)
    expected = ((r0 + r1) / 2 + r2) / 2
    loss = paired_negatives_siglip(img, pos, neg, groups, scale=1.5, bias=0.25)
    assert_close(loss, expected)
    loss.backward()
    assert neg.grad is not None and torch.all(torch.isfinite(neg.grad))


def test_paired_negatives_ignore_other_rows_texts():
    img = t([[1.0, 0.0], [0.0, 1.0]], grad=False)
    pos = t([[1.0, 0.0], [0.0, 1.0]], grad=False)
    neg = t([[[0.0, 1.0]], [[1.0, 0.0]]], grad=False)
    groups = torch.tensor([0, 1])
    base = paired_negatives_siglip(img, pos, neg, groups)
    pos2 = pos.clone()
    pos2[1] = torch.tensor([5.0, -5.0])  # row 1 changes; row 0's part must not
    changed = paired_negatives_siglip(img, pos2, neg, groups)
    row0 = sp(-1.0) + sp(0.0)
    assert_close(base, (row0 + sp(-1.0) + sp(0.0)) / 2)
    assert_close(changed, (row0 + sp(5.0) + sp(0.0)) / 2)


def test_empty_inputs_keep_graph():
    img = t([[1.0, 2.0]])
    empty = torch.zeros(0, 2, requires_grad=True)
    g = torch.zeros(0, dtype=torch.long)
    for loss in (
        grouped_siglip(empty, empty, g),
        paired_negatives_siglip(empty, empty, torch.zeros(0, 3, 2), g),
        siglip_pair_loss(empty, empty, torch.tensor(1.0), torch.tensor(0.0)),
        variable_text_siglip(img, empty, g),
    ):
        assert loss.dim() == 0 and loss.item() == 0.0
        loss.backward()


# -- 3a: XEn rescale --------------------------------------------------------------

def test_pixel_weight_maps_mean_one():
    att = torch.tensor([[1.0, 3.0], [0.0, 0.0]])  # mean 1 already
    w = pixel_weight_maps([att, None], size=(2, 2), gamma=0.5)
    assert w.shape == (2, 2, 2)
    assert torch.allclose(w[0], torch.tensor([[1.0, math.sqrt(3.0)], [0.0, 0.0]]))
    assert torch.allclose(w[1], torch.ones(2, 2))
    w2 = pixel_weight_maps([att * 7], size=(2, 2), gamma=1.0)  # scale is removed
    assert torch.allclose(w2[0], att)


def test_pixel_weight_maps_seed_scales_differ():
    att = torch.tensor([[0.1, 0.2], [0.3, 0.4]])  # softmax over 4 patches
    w = pixel_weight_maps([att, None], size=(4, 4), gamma=1.0, normalise="original")
    # bilinear x2, align_corners=False: out col 1 sits at source x=0.25
    assert w[0, 0, 0].item() == pytest.approx(0.1)
    assert w[0, 0, 1].item() == pytest.approx(0.75 * 0.1 + 0.25 * 0.2)
    assert torch.allclose(w[1], torch.full((4, 4), 1 / 16))
    # the seed flaw: attention mean 1/4 (per patch) vs uniform mean 1/16 (per pixel)
    assert w[0].mean().item() == pytest.approx(0.25)
    gamma = pixel_weight_maps([att], size=(2, 2), gamma=0.8, normalise="original")
    assert torch.allclose(gamma[0], att**0.8)


def test_pixel_weight_maps_bad_mode():
    with pytest.raises(ValueError, match="mean_one"):
        pixel_weight_maps([None], size=(2, 2), normalise="max")


def test_xen_rescale_value_and_gradient_hand():
    ce = t([[[2.0, 2.0], [1.0, 5.0]]])
    w = torch.tensor([[[1.0, 0.0], [0.5, 0.0]]])
    valid = torch.tensor([[[True, True], [True, False]]])
    loss = xen_rescale_loss(ce, w, valid, alpha=10.0)
    assert_close(loss, (2 + 2 + 1) / 3)  # plain mean CE over valid pixels
    loss.backward()
    # grad = (1 + 10 w)/n * sg(sum l / sum l(1+10w)) = (1+10w)/3 * 5/30
    expected = torch.tensor([[[11 / 18, 1 / 18], [6 / 18, 0.0]]])
    assert torch.allclose(ce.grad, expected)
    assert ce.grad[0, 0, 0] / ce.grad[0, 0, 1] == pytest.approx(11.0)


def test_xen_rescale_equals_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 5, requires_grad=True)
    target = torch.randint(0, 3, (2, 4, 5))
    target[0, 0, :] = 255
    ce = F.cross_entropy(logits, target, ignore_index=255, reduction="none")
    w = pixel_weight_maps([torch.rand(2, 2), None], size=(4, 5))
    loss = xen_rescale_loss(ce, w, target != 255)
    assert loss.item() == pytest.approx(F.cross_entropy(logits, target, ignore_index=255).item(), rel=1e-5)


def test_xen_rescale_degenerate_cases():
    ce = t([[[0.0, 0.0]]])
    assert xen_rescale_loss(ce, torch.ones(1, 1, 2), torch.ones(1, 1, 2, dtype=torch.bool)).item() == 0.0
    none_valid = xen_rescale_loss(ce, torch.ones(1, 1, 2), torch.zeros(1, 1, 2, dtype=torch.bool))
    assert none_valid.item() == 0.0
    none_valid.backward()
    assert torch.all(ce.grad == 0)


# -- mixing -------------------------------------------------------------------------

def test_mix_losses():
    ce, aux = torch.tensor(2.0), torch.tensor(4.0)
    assert mix_losses(ce, aux, 0.25, "convex").item() == pytest.approx(0.75 * 2 + 0.25 * 4)
    assert mix_losses(ce, aux, 0.5, "additive").item() == pytest.approx(2 + 0.5 * 4)
    with pytest.raises(ValueError, match="convex.*additive"):
        mix_losses(ce, aux, 0.5, "sum")


# ---- the well-posed options: mean of negatives, the original's grouping ----

def test_grouped_siglip_mean_of_negatives_hand_value():
    img = t([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    txt = t([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    groups = torch.tensor([0, 1, 2])
    z = (img @ txt.T).detach()  # scale 1, bias 0
    pos = [math.log1p(math.exp(-float(z[i, i]))) for i in range(3)]
    neg = [sum(math.log1p(math.exp(float(z[i, j]))) for j in range(3) if j != i) / 2 for i in range(3)]
    expected = sum(p + n for p, n in zip(pos, neg)) / 3
    loss = grouped_siglip(img, txt, groups, negatives="mean")
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    summed = grouped_siglip(img, txt, groups, negatives="sum")
    assert summed.item() > loss.item()


def test_grouped_siglip_original_grouping_counts_textless_rows_as_zero():
    # rows of images 0 and 3 carry text; the original divides by 4 groups (0..3), not 2
    img, txt = t([[1.0, 0.0], [0.0, 1.0]]), t([[1.0, 0.0], [0.0, 1.0]])
    groups = torch.tensor([0, 3])
    present = grouped_siglip(img, txt, groups, grouping="present")
    original = grouped_siglip(img, txt, groups, grouping="original")
    assert original.item() == pytest.approx(present.item() * 2 / 4, rel=1e-6)


def test_unknown_reductions_are_errors():
    img = t([[1.0, 0.0], [0.0, 1.0]])
    with pytest.raises(ValueError, match="negatives"):
        grouped_siglip(img, img, torch.tensor([0, 1]), negatives="max")
    with pytest.raises(ValueError, match="grouping"):
        grouped_siglip(img, img, torch.tensor([0, 1]), grouping="all")
