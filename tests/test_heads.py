"""Loss heads of 3.4 (paired negatives), 3.5 (bottleneck-side adapter) and 4.x (B_PR), and their adapters."""
from __future__ import annotations

import random

import pytest
import torch

from ttdl.core.io import save_torch
from ttdl.core.settings import ObjectiveSettings
from ttdl.text.adapters import AttentionPoolByText, ConcatAdapter, GapLinear
from ttdl.text.encoders import build_encoder
from ttdl.text.heads import HEADS, HeadContext, PerturbedNegatives
from ttdl.text.objectives import TextItems
from ttdl.text.textbatch import build_text_batch

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["background", "dog", "cat", "car"]
C, D = 960, 384
TEXTS = {  # (row, class) -> description
    (0, 1): "The prediction of the DOG region is incomplete on the left side.",
    (0, 2): "A spurious CAT region was hallucinated at the bottom right.",
    (1, 1): "The DOG region is over-extended at the top of the image.",
    (1, 3): "The CAR is missed entirely; only a small part in the center was found.",
}


@pytest.fixture(scope="module")
def encoder():
    enc = build_encoder().eval()
    enc.requires_grad_(False)
    return enc


@pytest.fixture(scope="module")
def batch():
    """Two 32 px images: row 0 holds dog+cat, row 1 dog+car; PR is GT with a shifted error each."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 32, 32, generator=g)
    gt = torch.zeros(2, 32, 32, dtype=torch.long)
    gt[0, 4:16, 2:14], gt[0, 18:30, 18:30] = 1, 2
    gt[1, 2:12, 8:24], gt[1, 14:28, 4:28] = 1, 3
    pr = gt.clone()
    pr[0, 4:16, 2:8] = 0
    pr[1, 20:28, 4:28] = 1
    tb = build_text_batch(["a", "b"], images, gt, pr, size=32, num_classes=len(NAMES), ignore_index=255)
    assert list(zip(tb.rows, tb.classes)) == list(TEXTS)
    items = TextItems(list(range(len(tb.keys))), [TEXTS[k] for k in zip(tb.rows, tb.classes)], [True] * 4)
    return tb, items


@pytest.fixture(scope="module")
def concat_path(tmp_path_factory):
    torch.manual_seed(0)
    adapter = ConcatAdapter(D)
    with torch.no_grad():
        adapter.linear.weight.add_(0.05 * torch.randn_like(adapter.linear.weight))
    path = tmp_path_factory.mktemp("vle2") / "concat_adapter.pt"
    adapter.save(path, encoder="minilm-vit")
    return str(path)


def shuffled(items: TextItems) -> TextItems:
    texts = items.texts[1:] + items.texts[:1]  # every text moves to another pair
    return TextItems(items.positions, texts, items.fresh)


def context(encoder, concat_path: str | None = None, class_names=NAMES) -> HeadContext:
    return HeadContext(text_dim=D, bottleneck_dim=C, encoder=encoder, class_names=class_names, negatives_seed=0,
                       concat_adapter_path=concat_path)


def make_head(name: str, encoder, concat_path: str | None = None, **cfg):
    torch.manual_seed(0)
    settings = ObjectiveSettings.from_partial({"name": name, **cfg})
    return HEADS[name](settings, context(encoder, concat_path))


def aux(head, encoder, tb, items, bottleneck):
    if hasattr(head, "negatives"):
        head.negatives.step.zero_()  # same negatives' draw for every call
    emb = encoder.encode_text(items.texts) if items.texts else torch.zeros(0, D)
    return head(tb=tb, items=items, emb=emb, bottleneck=bottleneck, pixel_ce=None, valid=None)


def bottleneck_leaf() -> torch.Tensor:
    return torch.randn(2, C, 4, 4, generator=torch.Generator().manual_seed(1)).requires_grad_(True)


SIGLIP_DEFAULTS = {"scale": 1.0, "bias": 0.0, "mask_same_group_negatives": True}

HEAD_CASES = [
    ("variable_siglip", SIGLIP_DEFAULTS, ["mlp.weight"]),
    ("grouped_siglip", SIGLIP_DEFAULTS, ["mlp.weight"]),
    ("paired_negatives", {}, ["pool.proj.weight", "pool.attn.in_proj_weight"]),
    ("paired_negatives", {"embedding_norm": "l2", "negatives": 2}, ["pool.attn.out_proj.weight"]),
    ("bottleneck_adapter", {}, ["adapter.linear.weight"]),
    ("bottleneck_adapter", {"adapter": "attn_pool", "embedding_norm": "l2"}, ["adapter.proj.weight"]),
    ("pr_fusion", {}, ["mlp.weight"]),
    ("pr_fusion_paired", {}, ["mlp.weight"]),
]


@pytest.mark.parametrize("name,cfg,trainable", HEAD_CASES)
def test_head_reacts_to_texts_and_trains_its_parts(name, cfg, trainable, encoder, batch, concat_path):
    tb, items = batch
    head = make_head(name, encoder, concat_path, **cfg)
    b = bottleneck_leaf()
    matched = aux(head, encoder, tb, items, b)
    other = aux(head, encoder, tb, shuffled(items), b)
    assert matched.ndim == 0 and torch.isfinite(matched) and matched.item() > 0
    assert abs(matched.item() - other.item()) > 1e-4 * matched.item(), (matched.item(), other.item())
    matched.backward()
    params = dict(head.named_parameters())
    for key in trainable:
        assert params[key].grad is not None and params[key].grad.abs().sum() > 0, key
    assert b.grad is not None and b.grad.abs().sum() > 0  # the aux loss reaches the segmenter


def test_bottleneck_adapter_detach_trains_only_the_adapter(encoder, batch):
    tb, items = batch
    head = make_head("bottleneck_adapter", encoder, detach_bottleneck=True)
    b = bottleneck_leaf()
    aux(head, encoder, tb, items, b).backward()
    assert b.grad is None
    assert head.adapter.linear.weight.grad.abs().sum() > 0


def test_bottleneck_adapter_l2_norm_changes_the_loss(encoder, batch):
    tb, items = batch
    b = bottleneck_leaf()
    raw = aux(make_head("bottleneck_adapter", encoder, embedding_norm="none"), encoder, tb, items, b)
    normed = aux(make_head("bottleneck_adapter", encoder, embedding_norm="l2"), encoder, tb, items, b)
    assert raw.item() != pytest.approx(normed.item(), rel=1e-3)


@pytest.mark.parametrize("name", ["paired_negatives", "bottleneck_adapter", "pr_fusion_paired"])
def test_loss_stays_float32_under_bf16_autocast(name, encoder, batch, concat_path):
    """A bf16 bottleneck (as under autocast on a GPU) must not put the SigLIP sums in bf16."""
    tb, items = batch
    head = make_head(name, encoder, concat_path)
    b = bottleneck_leaf()
    full = aux(head, encoder, tb, items, b).item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = aux(head, encoder, tb, items, b.bfloat16())
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(full, rel=2e-3)


@pytest.mark.parametrize("name", ["paired_negatives", "bottleneck_adapter", "pr_fusion", "pr_fusion_paired"])
def test_empty_items_give_zero_with_backward(name, encoder, batch, concat_path):
    tb, _ = batch
    b = bottleneck_leaf()
    loss = aux(make_head(name, encoder, concat_path), encoder, tb, TextItems(), b)
    assert loss.item() == 0.0
    loss.backward()
    assert b.grad is not None and b.grad.abs().sum() == 0


def test_pr_fusion_keeps_the_concat_adapter_frozen_and_unsaved(encoder, batch, concat_path):
    tb, items = batch
    head = make_head("pr_fusion", encoder, concat_path)
    aux(head, encoder, tb, items, bottleneck_leaf()).backward()
    concat = head.concat[0]
    assert all(not p.requires_grad and p.grad is None for p in concat.parameters())
    assert set(head.state_dict()) == {"mlp.weight", "logit.logit_scale", "logit.logit_bias"}
    assert torch.equal(concat.linear.weight, ConcatAdapter.from_file(concat_path).linear.weight)


def test_pr_fusion_without_adapter_names_vle2(encoder, tmp_path):
    for name in ("pr_fusion", "pr_fusion_paired"):
        with pytest.raises(ValueError, match="vle/2"):
            make_head(name, encoder, None)
        with pytest.raises(FileNotFoundError, match="vle/2"):
            make_head(name, encoder, str(tmp_path / "missing.pt"))
    small = tmp_path / "small.pt"
    ConcatAdapter(8).save(small)
    with pytest.raises(ValueError, match="re-run vle/2"):
        make_head("pr_fusion", encoder, str(small))


def test_config_errors_are_clear(encoder):
    with pytest.raises(ValueError, match="class names"):
        HEADS["paired_negatives"](ObjectiveSettings.from_partial({"name": "paired_negatives"}),
                                  context(encoder, class_names=[]))
    with pytest.raises(ValueError, match="adapter"):
        make_head("bottleneck_adapter", encoder, adapter="mlp")
    with pytest.raises(ValueError, match="embedding_norm"):
        make_head("bottleneck_adapter", encoder, embedding_norm="l1")


def test_negatives_differ_use_own_classes_and_are_reproducible(batch):
    tb, items = batch
    sampler = PerturbedNegatives(6, context(None))
    first = sampler.texts(tb, items, step=0)
    assert first == sampler.texts(tb, items, step=0)
    assert first != sampler.texts(tb, items, step=1)  # fresh near-misses every step
    for text, copies, row in zip(items.texts, first, tb.rows):
        assert len(copies) == 6 and text not in copies
        foreign = {"car"} if row == 0 else {"cat"}  # class swaps stay within the image's classes
        assert not any(name in copy.lower() for copy in copies for name in foreign)
    swapped = [c for copies in first[:2] for c in copies if "CAT" in c and "DOG" not in c]
    assert swapped, "a class swap within row 0 should occur among 12 copies"


def test_negatives_counter_advances_and_is_saved(encoder, batch):
    tb, items = batch
    sampler = PerturbedNegatives(3, context(None))
    emb = sampler(tb, items, encoder, torch.device("cpu"))
    assert emb.shape == (4, 3, D) and int(sampler.step) == 1
    assert "step" in sampler.state_dict()
    pos = encoder.encode_text(items.texts)
    assert (emb - pos[:, None]).abs().amax(-1).min() > 1e-4  # no negative embeds like its positive
    assert not any(encoder.is_cached(t) for copies in sampler.texts(tb, items, 0) for t in copies)


def test_attention_pool_by_text():
    torch.manual_seed(0)
    pool = AttentionPoolByText(16, 8, heads=4)
    b = torch.randn(2, 16, 3, 3)
    q = torch.randn(3, 8)
    out = pool(b, torch.tensor([0, 0, 1]), q)
    assert out.shape == (3, 8)
    assert not torch.allclose(out[0], out[1], atol=1e-5)  # same image, other query
    same_query = pool(b, torch.tensor([0, 1]), q[:1].expand(2, 8))
    assert not torch.allclose(same_query[0], same_query[1], atol=1e-5)  # same query, other image
    assert pool(b, torch.zeros(0, dtype=torch.long), q[:0]).shape == (0, 8)
    assert GapLinear(16, 8)(b).shape == (2, 8)


def test_concat_adapter_round_trip(tmp_path):
    torch.manual_seed(0)
    adapter = ConcatAdapter(6)
    a, b = torch.randn(4, 6), torch.randn(4, 6)
    assert torch.allclose(adapter(a, b), (a + b) / 2)  # starts as the mean of both embeddings
    with torch.no_grad():
        adapter.linear.weight.add_(torch.randn_like(adapter.linear.weight))
    adapter.save(tmp_path / "c.pt", encoder="x", logit_scale=1.5)
    raw = torch.load(tmp_path / "c.pt", weights_only=True)
    assert raw["dim"] == 6
    loaded = ConcatAdapter.from_file(tmp_path / "c.pt")
    assert torch.equal(loaded(a, b), adapter(a, b)) and loaded.meta == {"encoder": "x", "logit_scale": 1.5}
    save_torch(tmp_path / "other.pt", {"model": {}})
    with pytest.raises(ValueError, match="concat-adapter"):
        ConcatAdapter.from_file(tmp_path / "other.pt")


def test_existing_heads_still_registered():
    assert {"variable_siglip", "grouped_siglip", "xen_rescale", "paired_negatives", "bottleneck_adapter", "pr_fusion",
            "pr_fusion_paired"} <= set(HEADS)
    random.seed(0)  # perturbation uses its own Random; the global one is untouched
    state = random.getstate()
    PerturbedNegatives(4, context(None)).texts(
        *_one_pair_batch(), step=0)
    assert random.getstate() == state


def _one_pair_batch():
    tb = build_text_batch(["u"], torch.rand(1, 3, 8, 8), torch.ones(1, 8, 8, dtype=torch.long),
                          torch.ones(1, 8, 8, dtype=torch.long), size=8, num_classes=4, ignore_index=255)
    return tb, TextItems([0], ["The DOG region is correct."], [True])


def test_xen_rescale_moves_the_gradient_with_the_text(encoder, batch):
    """XEn's value is the plain CE whatever the text; where the gradient goes depends on it."""
    tb, items = batch
    head = make_head("xen_rescale", encoder, alpha=10.0, gamma=0.8, normalise="mean_one")
    h, w = tb.gt.shape[-2:]
    grads = []
    for texts in (items, shuffled(items)):
        pixel_ce = torch.rand(tb.gt.shape[0], h, w, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
        valid = torch.ones_like(pixel_ce, dtype=torch.bool)
        emb = encoder.encode_text(texts.texts)
        loss = head(tb=tb, items=texts, emb=emb, bottleneck=None, pixel_ce=pixel_ce, valid=valid)
        assert loss.item() == pytest.approx(pixel_ce.mean().item(), rel=1e-5)
        loss.backward()
        grads.append(pixel_ce.grad.clone())
    assert not torch.allclose(grads[0], grads[1])


# ---- the well-posed image side and logit parameters ----

def test_class_pooling_gives_each_class_of_an_image_its_own_feature():
    from ttdl.text.heads import class_pooled

    b = torch.zeros(1, 2, 2, 2)
    b[0, 0, :, 0], b[0, 1, :, 1] = 1.0, 1.0  # channel 0 lives on the left, channel 1 on the right
    probs = torch.zeros(1, 3, 8, 8)
    probs[0, 1, :, :4], probs[0, 2, :, 4:] = 1.0, 1.0  # class 1 predicted left, class 2 right
    feats = class_pooled(b, probs, torch.tensor([0, 0]), torch.tensor([1, 2]))
    assert torch.allclose(feats, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))


@pytest.mark.parametrize("name", ["grouped_siglip", "bottleneck_adapter"])
def test_masked_image_side_differs_from_gap(name, encoder, batch):
    tb, items = batch
    b = bottleneck_leaf()
    masked = aux(make_head(name, encoder), encoder, tb, items, b)
    whole = aux(make_head(name, encoder, image_side="gap"), encoder, tb, items, b)
    assert masked.item() != pytest.approx(whole.item(), rel=1e-4)


def test_learned_logit_scale_and_bias_start_at_the_init_and_train(encoder, batch):
    tb, items = batch
    head = make_head("grouped_siglip", encoder)
    scale, bias = head.logit()
    assert scale.item() == pytest.approx(10.0) and bias.item() == pytest.approx(-10.0)
    aux(head, encoder, tb, items, bottleneck_leaf()).backward()
    assert head.logit.logit_scale.grad.abs() > 0 and head.logit.logit_bias.grad.abs() > 0


def test_original_preset_fixes_scale_and_bias_and_uses_gap(encoder, batch):
    tb, items = batch
    head = make_head("grouped_siglip", encoder, preset="original")
    assert head.cfg.image_side == "gap" and head.cfg.negatives_reduction == "sum"
    assert dict(head.named_parameters()).keys() == {"mlp.weight"}  # scale and bias are buffers
    assert tuple(float(v) for v in head.logit()) == (1.0, 0.0)
    b = bottleneck_leaf()
    expected_loss = aux(make_head("grouped_siglip", encoder, image_side="gap", embedding_norm="none",
                                  learn_scale_bias=False, scale=1.0, bias=0.0, negatives_reduction="sum",
                                  grouping="original", mask_same_group_negatives=False), encoder, tb, items, b)
    assert aux(head, encoder, tb, items, b).item() == pytest.approx(expected_loss.item(), rel=1e-6)


def test_logit_parameters_escape_weight_decay(encoder):
    from torch import nn

    from ttdl.jobs.train import parameter_groups

    head = make_head("grouped_siglip", encoder)
    groups = parameter_groups(nn.Linear(2, 2), head, lr=1e-3, weight_decay=0.3, head_lr_scale=10.0)
    no_decay = [g for g in groups if g["weight_decay"] == 0.0]
    assert len(no_decay) == 1 and no_decay[0]["lr"] == pytest.approx(0.1)
    assert {id(p) for p in no_decay[0]["params"]} == {id(head.logit.logit_scale), id(head.logit.logit_bias)}
    head_group = [g for g in groups if g["lr"] == pytest.approx(1e-2)]
    assert [id(p) for p in head_group[0]["params"]] == [id(head.mlp.weight)]
