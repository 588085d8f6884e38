"""Mask-text cache: IoU, percentile policy (seed vs ours), reuse, persistence."""
from __future__ import annotations

import pytest
import torch

from ttdl.core.settings import CacheSettings
from ttdl.text.cache import (
    MaskTextCache,
    PercentilePolicy,
    batch_iou,
    cache_from_settings,
)


def cache_from_config(section: dict) -> MaskTextCache:
    """The cache a config's `cache` section (defaults filled by the schema) builds."""
    return cache_from_settings(CacheSettings.from_partial(section))


def mask(*pixels: int, h: int = 4, w: int = 4) -> torch.Tensor:
    """A [h,w] bool mask with the given flat pixel indices set."""
    m = torch.zeros(h * w, dtype=torch.bool)
    m[list(pixels)] = True
    return m.reshape(h, w)


def stack(*ms: torch.Tensor) -> torch.Tensor:
    return torch.stack(ms)


def ours() -> MaskTextCache:
    return cache_from_config({"mode": "ours"})


def seed() -> MaskTextCache:
    return cache_from_config({"mode": "original"})


# ---- batch_iou -------------------------------------------------------------
def test_batch_iou_hand_values() -> None:
    old = stack(mask(0, 1), mask(0, 1), mask(0), mask(), mask())
    new = stack(mask(0), mask(0, 1), mask(5), mask(), mask(3))
    got = batch_iou(old, new, empty_vs_empty=1.0)
    assert got.shape == (5,)
    assert torch.allclose(got, torch.tensor([0.5, 1.0, 0.0, 1.0, 0.0]))
    # seed: two empty masks score 0, everything else unchanged
    assert torch.allclose(batch_iou(old, new, empty_vs_empty=0.0), torch.tensor([0.5, 1.0, 0.0, 0.0, 0.0]))


def test_batch_iou_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError):
        batch_iou(torch.zeros(2, 4, 4, dtype=torch.bool), torch.zeros(2, 4, 5, dtype=torch.bool), 1.0)


# ---- policy ----------------------------------------------------------------
def test_policy_linear_quantile() -> None:
    iou = torch.tensor([0.75, 0.0, 1.0, 0.25, 0.5])
    # sorted [0, .25, .5, .75, 1]; q=0.4 -> position 1.6 -> tau = 0.25 + 0.6*0.25 = 0.4
    assert PercentilePolicy(0.4).select(iou).tolist() == [False, True, False, True, False]
    assert PercentilePolicy(1.0, skip_unchanged=False).select(iou).all()
    assert PercentilePolicy(1.0, skip_unchanged=True).select(iou).tolist() == [True, True, False, True, True]


def test_policy_empty_input_and_bad_q() -> None:
    out = PercentilePolicy().select(torch.zeros(0))
    assert out.dtype == torch.bool and out.shape == (0,)
    with pytest.raises(ValueError):
        PercentilePolicy(1.5)


# ---- plan ------------------------------------------------------------------
def tie_batch() -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """10 keys, 7 unchanged, 3 changed (IoU 0.5)."""
    keys = [f"img{i}-1" for i in range(10)]
    before = stack(*[mask(i, i + 1) for i in range(10)])
    after = before.clone()
    for i in (2, 5, 8):
        after[i] = mask(i)
    return keys, before, after


@pytest.mark.parametrize("mode, expected", [("original", list(range(10))), ("ours", [2, 5, 8])])
def test_tie_case(mode: str, expected: list[int]) -> None:
    keys, before, after = tie_batch()
    cache = cache_from_config({"mode": mode})
    cache.record_masks(keys, before)
    plan = cache.plan(keys, after)
    assert plan.describe == expected
    assert plan.n_keys == 10 and plan.n_unseen == 0


def test_unseen_keys_always_described() -> None:
    cache = MaskTextCache(PercentilePolicy(q=0.0))
    seen = [f"a{i}-3" for i in range(5)]
    cache.record_masks(seen, stack(*[mask(i) for i in range(5)]))
    keys = seen + ["new-3", "new-4"]
    masks = stack(*[mask(i) for i in range(5)], mask(1), mask())
    plan = cache.plan(keys, masks)
    assert plan.describe == [5, 6]
    assert plan.n_unseen == 2
    # a fresh cache describes everything, even at q=0
    assert MaskTextCache(PercentilePolicy(q=0.0)).plan(keys, masks).describe == list(range(7))


def test_changed_mask_size_counts_as_unseen() -> None:
    cache = ours()
    cache.record_masks(["k-1"], stack(mask(0)))
    plan = cache.plan(["k-1"], stack(mask(0, h=8, w=8)))
    assert plan.describe == [0] and plan.n_unseen == 1


@pytest.mark.parametrize("mode, described", [("ours", []), ("original", [0])])
def test_empty_vs_empty_in_cache(mode: str, described: list[int]) -> None:
    cache = cache_from_config({"mode": mode})
    cache.record_masks(["k-1", "k-2"], stack(mask(), mask(3)))
    plan = cache.plan(["k-1", "k-2"], stack(mask(), mask(3)))
    assert plan.describe == described


def test_reuse_semantics_and_stats() -> None:
    keys = ["a-1", "b-1", "c-1", "d-1"]
    masks = stack(mask(0), mask(1), mask(2), mask(3))
    for mode, reuse in (("ours", [0, 1]), ("original", [])):
        # q=0 so the original's tie flaw does not describe everything here
        cache = cache_from_config({"mode": mode, "percentile": 0.0})
        cache.update(keys[:2], masks[:2], ["text a", "text b"])
        cache.record_masks(keys[2:], masks[2:])  # masks without text
        changed = masks.clone()
        changed[3] = mask(3, 4)  # IoU 0.5, the only changed key
        plan = cache.plan(keys, changed)
        assert plan.describe == [3]
        assert plan.reuse == reuse
        assert plan.skipped == [i for i in (0, 1, 2) if i not in reuse]
        assert (plan.n_describe, plan.n_reuse, plan.n_skipped) == (1, len(reuse), 3 - len(reuse))
        assert cache.stats() == {"keys": 4, "texts": 2}


def test_update_none_text_keeps_previous_text_but_stores_mask() -> None:
    cache = ours()
    cache.update(["k-1", "n-1"], stack(mask(0), mask(1)), ["old text", None])
    assert cache.text("k-1") == "old text" and cache.text("n-1") is None
    assert "n-1" in cache and "zzz" not in cache and len(cache) == 2
    cache.update(["k-1"], stack(mask(5, 6)), [None])
    assert cache.text("k-1") == "old text"
    assert torch.equal(cache.mask("k-1"), mask(5, 6))
    cache.update(["k-1"], stack(mask(5)), ["new text"])
    assert cache.text("k-1") == "new text"


def test_record_masks_keeps_text_then_plan() -> None:
    cache = ours()
    cache.update(["k-1"], stack(mask(0)), ["a text"])
    cache.record_masks(["k-1", "p-2"], stack(mask(0, 1), mask(7)))
    assert cache.text("k-1") == "a text" and cache.text("p-2") is None
    assert torch.equal(cache.mask("k-1"), mask(0, 1))
    plan = cache.plan(["k-1", "p-2"], stack(mask(0, 1), mask(7)))
    assert plan.describe == [] and plan.reuse == [0] and plan.skipped == [1]


def test_plan_rejects_non_bool_masks() -> None:
    with pytest.raises(TypeError):
        ours().plan(["k-1"], torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError):
        ours().plan(["k-1", "k-2"], torch.zeros(1, 4, 4, dtype=torch.bool))


# ---- persistence -----------------------------------------------------------
def filled_cache() -> MaskTextCache:
    cache = MaskTextCache(PercentilePolicy(0.3, skip_unchanged=False), reuse_cached_text=False, empty_vs_empty=0.0)
    gen = torch.Generator().manual_seed(0)
    cache.update(["a-1", "b-2"], torch.rand(2, 5, 3, generator=gen) > 0.5, ["alpha", None])
    cache.record_masks(["c-3"], torch.rand(1, 7, 9, generator=gen) > 0.5)  # another, odd shape
    cache.plan(["a-1"], torch.rand(1, 5, 3, generator=gen) > 0.5)
    return cache


def assert_same(a: MaskTextCache, b: MaskTextCache) -> None:
    assert len(a) == len(b) == 3
    for key in ("a-1", "b-2", "c-3"):
        assert torch.equal(a.mask(key), b.mask(key))
        assert a.text(key) == b.text(key)
    assert a.stats() == b.stats()


def test_save_load_round_trip(tmp_path) -> None:
    cache = filled_cache()
    path = tmp_path / "cache" / "cache.pt"
    cache.save(path)
    loaded = MaskTextCache.load(path)
    assert_same(cache, loaded)
    assert loaded.text("b-2") is None and loaded.mask("c-3").shape == (7, 9)
    # stored settings become the defaults, kwargs override them
    assert loaded.policy.q == pytest.approx(0.3) and not loaded.policy.skip_unchanged
    assert not loaded.reuse_cached_text and loaded.empty_vs_empty == 0.0
    assert MaskTextCache.load(path, reuse_cached_text=True).reuse_cached_text


def test_empty_cache_round_trip(tmp_path) -> None:
    ours().save(tmp_path / "empty.pt")
    assert len(MaskTextCache.load(tmp_path / "empty.pt")) == 0


def test_state_dict_readable_with_weights_only(tmp_path) -> None:
    cache = filled_cache()
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {}, "cache": cache.state_dict()}, path)
    ckpt = torch.load(path, weights_only=True)
    restored = ours()
    restored.load_state_dict(ckpt["cache"])
    assert_same(cache, restored)
    # load_state_dict keeps the current run's settings
    assert restored.reuse_cached_text and restored.policy.skip_unchanged


def test_save_is_atomic(tmp_path, monkeypatch) -> None:
    path = tmp_path / "cache.pt"
    filled_cache().save(path)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        ours().save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.pt"]


def test_unknown_version_rejected_naming_file(tmp_path) -> None:
    state = filled_cache().state_dict()
    state["version"] = 99
    path = tmp_path / "future.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match="future.pt.*version 99"):
        MaskTextCache.load(path)
    with pytest.raises(ValueError, match="my.ckpt"):
        ours().load_state_dict(state, source="my.ckpt")


def test_inconsistent_state_rejected() -> None:
    state = filled_cache().state_dict()
    state["packed"] = state["packed"][:-1]
    with pytest.raises(ValueError, match="inconsistent"):
        ours().load_state_dict(state)


# ---- config ----------------------------------------------------------------
def test_cache_from_settings_modes_and_overrides() -> None:
    s = seed()
    assert (s.policy.q, s.policy.skip_unchanged, s.empty_vs_empty, s.reuse_cached_text) == (0.4, False, 0.0, False)
    o = cache_from_config({})
    assert (o.policy.q, o.policy.skip_unchanged, o.empty_vs_empty, o.reuse_cached_text) == (0.4, True, 1.0, True)
    mixed = cache_from_config(
        {"mode": "original", "percentile": 0.25, "skip_unchanged": True, "empty_vs_empty": None,
         "reuse_cached_text": True}
    )
    assert (mixed.policy.q, mixed.policy.skip_unchanged, mixed.empty_vs_empty, mixed.reuse_cached_text) == (
        0.25, True, 0.0, True,
    )
    with pytest.raises(ValueError, match="mode"):
        cache_from_config({"mode": "fancy"})
