"""The aux/CE gradient balance on the shared parameters (ttdl.text.grad_balance)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ttdl.text.grad_balance import GradLog, GradStats, grad_stats, lambda_for_ratio, weighted_ratio


def tiny_losses(seed: int = 0):
    """A shared 'backbone' feeding a CE-like head and an aux-like head, as in the segmenter."""
    torch.manual_seed(seed)
    shared, ce_head, aux_head = nn.Linear(6, 5), nn.Linear(5, 3), nn.Linear(5, 4)
    x = torch.randn(8, 6)
    feats = torch.tanh(shared(x))
    ce = nn.functional.cross_entropy(ce_head(feats), torch.randint(0, 3, (8,)))
    aux = 7.0 * (aux_head(feats) ** 2).mean()  # deliberately on another scale than CE
    return shared, ce, aux


def norm_of(loss, params):
    grads = torch.autograd.grad(loss, params, retain_graph=True)
    return torch.cat([g.flatten() for g in grads]).norm().item()


@pytest.mark.parametrize("mix", ["convex", "additive"])
@pytest.mark.parametrize("target", [0.05, 0.3, 1.0])
def test_lambda_from_the_ratio_hits_its_target(mix, target):
    shared, ce, aux = tiny_losses()
    params = list(shared.parameters())
    stats = grad_stats(ce, aux, params)
    lam = lambda_for_ratio(stats, target, mix, max_lambda=100.0 if mix == "additive" else 0.999)
    w_ce, w_aux = (1 - lam, lam) if mix == "convex" else (1.0, lam)
    measured = norm_of(w_aux * aux, params) / norm_of(w_ce * ce, params)  # independent autograd
    assert measured == pytest.approx(target, rel=1e-4)
    assert weighted_ratio(stats, lam, mix) == pytest.approx(target, rel=1e-5)


def test_stats_match_autograd_and_keep_the_graph():
    shared, ce, aux = tiny_losses(1)
    params = list(shared.parameters())
    stats = grad_stats(ce, aux, params)
    assert stats.ce_norm == pytest.approx(norm_of(ce, params), rel=1e-5)
    assert stats.aux_norm == pytest.approx(norm_of(aux, params), rel=1e-5)
    assert -1.0 <= stats.cosine <= 1.0
    (ce + aux).backward()  # the graph survived the measurement
    assert shared.weight.grad is not None


def test_identical_gradients_have_cosine_one_and_a_cap_holds():
    shared, ce, _ = tiny_losses(3)
    params = list(shared.parameters())
    stats = grad_stats(ce, 2 * ce, params)
    assert stats.cosine == pytest.approx(1.0, abs=1e-5)
    assert stats.aux_norm == pytest.approx(2 * stats.ce_norm, rel=1e-5)
    assert lambda_for_ratio(stats, 1000.0, "convex", max_lambda=0.9) == 0.9


def test_no_aux_gradient_leaves_lambda_alone():
    assert lambda_for_ratio(GradStats(1.0, 0.0, 0.0), 0.1, "convex", 0.9) is None


def test_grad_log_means_and_state_round_trip():
    log = GradLog()
    assert log.as_logs() == {}
    log.add(0.2, 0.1, 0.3)
    log.add(0.4, -0.1, 0.5)
    assert log.as_logs() == {"grad_ratio_aux_ce": 0.3, "grad_cos_aux_ce": 0.0, "lambda": 0.4}
    assert GradLog(**log.state()).as_logs() == log.as_logs()
