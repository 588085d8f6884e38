"""Mask-text cache: IoU, percentile and budget policies (seed vs ours), the call budget, reuse, persistence."""
from __future__ import annotations

import pytest
import torch

from ttdl.core.settings import CacheSettings
from ttdl.text.cache import (
    NEVER,
    BudgetPolicy,
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


# ---- budget policy ---------------------------------------------------------
def budget(**over) -> MaskTextCache:
    return cache_from_config({"policy": "budget", **over})


def test_budget_policy_select_threshold_and_age() -> None:
    iou = torch.tensor([0.0, 0.5, 0.79, 0.8, 1.0, 1.0])
    age = torch.tensor([NEVER, 0, 0, 5, 2, 3])
    assert BudgetPolicy(0.8).select(iou, age).tolist() == [True, True, True, False, False, False]
    assert BudgetPolicy(0.8, max_age_epochs=3).select(iou, age).tolist() == [True, True, True, True, False, True]
    assert BudgetPolicy(1.0).select(iou).tolist() == [True, True, True, True, False, False]
    with pytest.raises(ValueError):
        BudgetPolicy(0.0)
    with pytest.raises(ValueError):
        BudgetPolicy(0.8, max_age_epochs=0)


def test_budget_plan_describes_moved_and_unseen_keys_only() -> None:
    cache = budget(redescribe_below_iou=0.6)
    keys = ["a-1", "b-1", "c-1", "d-1", "new-1"]
    cache.update(keys[:4], stack(mask(0, 1), mask(2, 3), mask(4, 5), mask()), ["ta", "tb", "tc", "td"])
    now = stack(mask(0, 1), mask(2), mask(6), mask(), mask(9))  # IoU 1, 0.5, 0, 1 (empty vs empty), unseen
    plan = cache.plan(keys, now)
    assert plan.describe == [1, 2, 4]
    assert plan.reuse == [0, 3] and plan.skipped == [] and plan.deferred == []
    assert plan.iou == pytest.approx([1.0, 0.5, 0.0, 1.0, 0.0]) and plan.age == [0, 0, 0, 0, NEVER]
    assert plan.n_unseen == 1
    # percentile mode flags still apply: the original's empty-vs-empty re-describes the empty key
    original = budget(mode="original", redescribe_below_iou=0.6)
    original.update(keys[:4], stack(mask(0, 1), mask(2, 3), mask(4, 5), mask()), ["ta", "tb", "tc", "td"])
    assert original.plan(keys, now).describe == [1, 2, 3, 4]


def test_budget_text_age_in_epochs() -> None:
    cache = budget(max_text_age_epochs=2)
    keys = ["a-1", "b-1"]
    masks = stack(mask(0), mask(1))
    cache.update(keys, masks, ["ta", "tb"])  # described in epoch 0
    assert cache.plan(keys, masks, epoch=1).describe == []
    plan = cache.plan(keys, masks, epoch=2)  # two epochs old: described again
    assert plan.describe == [0, 1] and plan.age == [2, 2]
    cache.update(keys, masks, ["ta2", "tb2"])
    assert cache.stamp("a-1") == 2
    assert cache.plan(keys, masks).describe == []  # epoch None: stays in epoch 2
    assert cache.plan(keys, masks, epoch=3).describe == []
    # a key recorded by the prefill (no text) ages from its recording
    fresh = budget(max_text_age_epochs=1)
    fresh.record_masks(["p-1"], stack(mask(3)))
    assert fresh.plan(["p-1"], stack(mask(3))).describe == []
    assert fresh.plan(["p-1"], stack(mask(3)), epoch=1).describe == [0]


def test_budget_spends_on_the_most_moved_keys_first() -> None:
    cache = budget(redescribe_below_iou=0.9, calls_per_epoch=2)
    keys = [f"k{i}-1" for i in range(4)]
    cache.update(keys, stack(mask(0, 1, 2, 3), mask(0, 1, 2, 3), mask(0, 1, 2, 3), mask(0, 1, 2, 3)), list("abcd"))
    now = stack(mask(0, 1, 2), mask(0), mask(0, 1, 2, 3), mask(9))  # IoU .75, .25, 1, 0
    plan = cache.plan(keys, now, epoch=1)
    assert plan.describe == [1, 3] and plan.deferred == [0]
    assert plan.reuse == [0, 2]  # deferred keys keep using their text
    assert cache.budget_left() == 0
    assert cache.plan(keys, now).describe == []  # same epoch: the budget is spent
    # a new epoch, a new budget, paced: epoch 1 planned 8 keys, so this half of the epoch gets half of it
    assert cache.plan(keys, now, epoch=2).describe == [3]
    cache.update(["k3-1"], now[3:], ["d2"])
    assert cache.plan(keys, now).describe == [1]


def test_exclude_keys_are_neither_described_nor_charged() -> None:
    cache = budget(calls_per_epoch=5)
    keys = ["a-1", "b-1", "c-1"]
    plan = cache.plan(keys, stack(mask(0), mask(1), mask(2)), exclude={"b-1"})
    assert plan.describe == [0, 2] and plan.skipped == [1]
    assert cache.epoch_calls == 2


def _random_masks(gen: torch.Generator, k: int) -> torch.Tensor:
    return torch.rand(k, 6, 6, generator=gen) > 0.5


@pytest.mark.parametrize("policy", ["budget", "percentile"])
@pytest.mark.parametrize("calls", [0, 1, 7, 40])
def test_calls_per_epoch_is_never_exceeded(policy: str, calls: int, tmp_path) -> None:
    """Random masks (most keys move every step), uneven batches, unseen keys, and a save/load mid-epoch."""
    gen = torch.Generator().manual_seed(calls)
    settings = {"policy": policy, "calls_per_epoch": calls, "redescribe_below_iou": 0.9, "max_text_age_epochs": 1}
    cache = cache_from_config(settings)
    universe = [f"img{i}-{c}" for i in range(30) for c in (1, 2)]
    cache.record_masks(universe[:40], _random_masks(gen, 40))  # a partial prefill
    for epoch in range(4):
        spent = 0
        order = torch.randperm(len(universe), generator=gen).tolist()
        start = 0
        while start < len(order):
            size = int(torch.randint(1, 9, (1,), generator=gen))
            keys = [universe[i] for i in order[start:start + size]]
            start += size
            masks = _random_masks(gen, len(keys))
            plan = cache.plan(keys, masks, epoch=epoch)
            spent += plan.n_describe
            assert spent <= calls, (epoch, spent)
            assert cache.epoch_calls == spent
            described = [keys[i] for i in plan.describe]
            cache.update(described, masks[plan.describe], [f"t{epoch}" for _ in described])
            if start > len(order) // 2 and start - size <= len(order) // 2:  # a kill and resume mid-epoch
                path = tmp_path / f"state{epoch}.pt"
                torch.save(cache.state_dict(), path)
                cache = cache_from_config(settings)
                cache.load_state_dict(torch.load(path, weights_only=True))
        if policy == "budget":  # the budget is used, not hoarded: every key moves, so every epoch spends it all
            assert spent == calls


def test_budget_is_paced_over_the_epoch() -> None:
    """With the epoch's size known (a prefill), a plan may spend only its share of the budget so far."""
    cache = budget(calls_per_epoch=10)
    keys = [f"img{i}-1" for i in range(100)]
    cache.record_masks(keys, torch.zeros(100, 4, 4, dtype=torch.bool))
    moved = torch.ones(10, 4, 4, dtype=torch.bool)  # every key moved (IoU 0)
    spent = []
    for start in range(0, 100, 10):
        plan = cache.plan(keys[start:start + 10], moved, epoch=1)
        spent.append(plan.n_describe)
    assert spent == [1] * 10


def test_budget_state_round_trip_and_old_files(tmp_path) -> None:
    cache = budget(calls_per_epoch=3, max_text_age_epochs=4)
    cache.update(["a-1"], stack(mask(0)), ["ta"])
    cache.plan(["b-1", "c-1"], stack(mask(1), mask(2)), epoch=2)
    cache.update(["b-1"], stack(mask(1)), ["tb"])
    path = tmp_path / "c.pt"
    cache.save(path)
    loaded = MaskTextCache.load(path)
    assert isinstance(loaded.policy, BudgetPolicy) and loaded.policy.max_age_epochs == 4
    assert loaded.calls_per_epoch == 3
    assert (loaded.epoch, loaded.epoch_calls, loaded.epoch_pairs) == (2, 2, 2)
    assert loaded.stamp("a-1") == 0 and loaded.stamp("b-1") == 2
    # a file written before epoch stamps and counters existed still loads: everything stamped epoch 0
    state = cache.state_dict()
    del state["stamps"], state["epoch_state"]
    old = budget()
    old.load_state_dict(state)
    assert old.stamp("b-1") == 0 and (old.epoch, old.epoch_calls) == (0, 0)


def test_cache_from_settings_budget() -> None:
    c = cache_from_config({"policy": "budget", "redescribe_below_iou": 0.7, "max_text_age_epochs": 3,
                           "calls_per_epoch": 50})
    assert isinstance(c.policy, BudgetPolicy)
    assert (c.policy.below_iou, c.policy.max_age_epochs, c.calls_per_epoch) == (0.7, 3, 50)
    default = cache_from_config({})
    assert isinstance(default.policy, PercentilePolicy) and default.calls_per_epoch is None
    with pytest.raises(ValueError):
        cache_from_config({"policy": "budget", "redescribe_below_iou": 0})


@pytest.mark.parametrize("policy", ["budget", "percentile"])
@pytest.mark.parametrize("share", [0.0, 0.15, 0.5])
def test_calls_per_pair_is_never_exceeded_at_any_step(policy: str, share: float, tmp_path) -> None:
    gen = torch.Generator().manual_seed(int(share * 100))
    settings = {"policy": policy, "calls_per_pair": share, "redescribe_below_iou": 0.9}
    cache = cache_from_config(settings)
    universe = [f"img{i}-{c}" for i in range(40) for c in (1, 2, 3)]
    for epoch in range(3):
        spent = planned = 0
        for start in range(0, len(universe), 11):
            keys = universe[start:start + 11]
            masks = _random_masks(gen, len(keys))
            plan = cache.plan(keys, masks, epoch=epoch)
            spent, planned = spent + plan.n_describe, planned + len(keys)
            assert spent <= share * planned + 1e-9, (epoch, spent, planned)
            cache.update([keys[i] for i in plan.describe], masks[plan.describe], ["t"] * plan.n_describe)
            if start == 55:  # a kill and resume mid-epoch keeps the epoch's count
                torch.save(cache.state_dict(), tmp_path / "s.pt")
                cache = cache_from_config(settings)
                cache.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
        if policy == "budget":  # all keys move, so the cap is what binds, and it is spent
            assert spent == int(share * planned + 1e-9)


def test_both_caps_the_tighter_binds() -> None:
    cache = budget(calls_per_pair=0.5, calls_per_epoch=3)
    keys = [f"k{i}-1" for i in range(10)]
    plan = cache.plan(keys, torch.ones(10, 4, 4, dtype=torch.bool))
    assert plan.n_describe == 3 and plan.n_deferred == 7
    assert cache.settings()["calls_per_pair"] == 0.5 and cache.settings()["calls_per_epoch"] == 3


# ---- reuse only while the text's mask stays close (reuse_min_iou) ----------------
def test_reuse_min_iou_default_and_range() -> None:
    assert cache_from_config({}).reuse_min_iou == 0.5
    assert cache_from_config({"reuse_min_iou": 0}).reuse_min_iou == 0.0
    with pytest.raises(ValueError):
        MaskTextCache(PercentilePolicy(), reuse_min_iou=1.5)


def _moved_but_not_selected(min_iou: float, **over) -> tuple[MaskTextCache, list[str], torch.Tensor]:
    """Key 0 moved to IoU 0.25 with its text; key 1 moved more, so a q=0 percentile describes only key 1."""
    cache = cache_from_config({"percentile": 0.0, "reuse_min_iou": min_iou, **over})
    keys = ["a-1", "b-1", "c-1"]
    cache.update(keys, stack(mask(0, 1, 2, 3), mask(4), mask(8)), ["ta", "tb", "tc"])
    return cache, keys, stack(mask(0), mask(5), mask(8))  # IoU .25, 0, 1


def test_stale_text_is_described_again_not_reused() -> None:
    cache, keys, now = _moved_but_not_selected(0.5)
    plan = cache.plan(keys, now)
    assert plan.describe == [0, 1] and plan.reuse == [2] and plan.stale == [0, 1] and plan.withheld == []
    old, _, _ = _moved_but_not_selected(0.0)  # 0: the text is reused however far its mask moved
    plan = old.plan(keys, now)
    assert plan.describe == [1] and plan.reuse == [0, 2] and plan.stale == []


def test_stale_text_without_budget_carries_no_text() -> None:
    cache, keys, now = _moved_but_not_selected(0.5, calls_per_epoch=1)
    plan = cache.plan(keys, now, epoch=1)
    assert plan.describe == [1]  # the budget goes to the key that moved most
    assert plan.reuse == [2] and plan.withheld == [0] and 0 in plan.skipped
    assert cache.epoch_calls == 1
    # keys in flight are not described either, and a stale one is still not reused
    cache2, _, _ = _moved_but_not_selected(0.5)
    plan = cache2.plan(keys, now, exclude={"a-1"})
    assert plan.describe == [1] and plan.withheld == [0] and plan.reuse == [2]


def test_stale_check_uses_the_mask_the_text_describes() -> None:
    """After a malformed answer the stored mask moved on, but the kept text still describes the old one."""
    cache = cache_from_config({"policy": "budget", "redescribe_below_iou": 0.3, "reuse_min_iou": 0.5})
    cache.update(["k-1"], stack(mask(0, 1, 2, 3)), ["about 0-3"])
    cache.update(["k-1"], stack(mask(0)), [None])  # described again, unusable answer: text kept
    assert torch.equal(cache.mask("k-1"), mask(0)) and torch.equal(cache.text_mask("k-1"), mask(0, 1, 2, 3))
    plan = cache.plan(["k-1"], stack(mask(0)))  # unchanged since the failed attempt: not asked again ...
    assert plan.describe == [] and plan.withheld == [0] and plan.reuse == []  # ... and the text is not used
    plan = cache.plan(["k-1"], stack(mask(0, 1, 2)))  # text IoU .75: usable again
    assert plan.reuse == [0] and plan.stale == []
    cache.update(["k-1"], stack(mask(5)), ["about 5"])
    assert torch.equal(cache.text_mask("k-1"), mask(5))
    # the prefill records masks over a kept text in the same way
    cache.record_masks(["k-1"], stack(mask(9)))
    assert torch.equal(cache.text_mask("k-1"), mask(5)) and cache.text_mask("none-1") is None


def test_described_masks_and_reuse_min_iou_survive_save_load(tmp_path) -> None:
    cache = cache_from_config({"reuse_min_iou": 0.7})
    cache.update(["a-1", "b-1"], stack(mask(0, 1), mask(2)), ["ta", "tb"])
    cache.update(["a-1"], stack(mask(7, h=4, w=4)), [None])
    cache.save(tmp_path / "c.pt")
    loaded = MaskTextCache.load(tmp_path / "c.pt")
    assert loaded.reuse_min_iou == 0.7
    assert torch.equal(loaded.text_mask("a-1"), mask(0, 1)) and torch.equal(loaded.mask("a-1"), mask(7))
    assert torch.equal(loaded.text_mask("b-1"), mask(2))
    state = cache.state_dict()
    del state["described"]  # an older file: every text describes its stored mask
    old = ours()
    old.load_state_dict(state)
    assert torch.equal(old.text_mask("a-1"), mask(7))


def test_without_reuse_nothing_is_stale() -> None:
    cache, keys, now = _moved_but_not_selected(0.5, mode="original")
    plan = cache.plan(keys, now)
    assert plan.stale == [] and plan.reuse == []
