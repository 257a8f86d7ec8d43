"""Analytic properties of specdistill.losses (zero at equality, symmetry, limits, brute force)."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from specdistill import losses


@pytest.fixture
def pq():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 11, generator=g) * 2, torch.randn(6, 11, generator=g) * 2


def test_kl_family_zero_on_identical(pq):
    s, _ = pq
    lp = F.log_softmax(s, -1)
    for fn in (losses.forward_kl, losses.reverse_kl, losses.tvd):
        assert fn(s, lp).abs().item() < 1e-5, fn.__name__
    assert losses.jsd(s, lp, beta=0.5).abs().item() < 1e-5


def test_kl_positive_and_matches_torch(pq):
    s, t = pq
    lp = F.log_softmax(t, -1)
    fkl = losses.forward_kl(s, lp, reduction="none")
    ref = F.kl_div(F.log_softmax(s, -1), lp, log_target=True, reduction="none").sum(-1)
    assert torch.allclose(fkl, ref, atol=1e-5) and (fkl > 0).all()
    rkl = losses.reverse_kl(s, lp, reduction="none")
    ref_r = F.kl_div(lp, F.log_softmax(s, -1), log_target=True, reduction="none").sum(-1)
    assert torch.allclose(rkl, ref_r, atol=1e-5)


def test_soft_ce_is_forward_kl_plus_entropy(pq):
    s, t = pq
    lp = F.log_softmax(t, -1)
    ent = -(lp.exp() * lp).sum(-1)
    assert torch.allclose(losses.soft_cross_entropy(s, lp, reduction="none"),
                          losses.forward_kl(s, lp, reduction="none") + ent, atol=1e-5)


def test_jsd_symmetric_at_half_and_bounded(pq):
    s, t = pq
    a = losses.jsd(s, F.log_softmax(t, -1), beta=0.5, reduction="none")
    b = losses.jsd(t, F.log_softmax(s, -1), beta=0.5, reduction="none")
    assert torch.allclose(a, b, atol=1e-5)
    assert (a >= 0).all() and (a <= math.log(2) + 1e-6).all()
    with pytest.raises(ValueError):
        losses.jsd(s, F.log_softmax(t, -1), beta=1.5)


def test_tvd_bounds_and_formula(pq):
    s, t = pq
    v = losses.tvd(s, F.log_softmax(t, -1), reduction="none")
    ref = 0.5 * (F.softmax(s, -1) - F.softmax(t, -1)).abs().sum(-1)
    assert torch.allclose(v, ref, atol=1e-6) and (v <= 1).all()


def test_topk_kd_equals_full_kd_at_k_equals_v(pq):
    s, t = pq
    lp = F.log_softmax(t, -1)
    full = losses.soft_cross_entropy(s, lp)
    assert torch.allclose(losses.topk_kd(s, lp, k=s.shape[-1]), full, atol=1e-5)
    assert losses.topk_kd(s, lp, k=3) < full  # a partial sum of non-negative terms


def test_topk_kd_gradient_only_through_topk(pq):
    s, t = pq
    s = s.clone().requires_grad_(True)
    losses.topk_kd(s, F.log_softmax(t, -1), k=1).backward()
    assert s.grad.abs().sum() > 0


def test_feature_regression_zero_at_equality_and_smooth_l1():
    x = torch.randn(4, 8)
    assert losses.feature_regression(x, x).item() == 0.0
    y = x + 0.1
    # |d| < beta=1: 0.5 d^2 per unit, mean over 8 units, sum over 4 rows.
    assert abs(losses.feature_regression(x, y).item() - 4 * 0.5 * 0.01) < 1e-5
    z = x + 3.0
    assert abs(losses.feature_regression(x, z).item() - 4 * 2.5) < 1e-4


def test_cross_entropy_ignores_minus_100():
    s = torch.randn(3, 5)
    y = torch.tensor([1, -100, 4])
    assert torch.allclose(losses.cross_entropy(s, y), F.cross_entropy(s[[0, 2]], y[[0, 2]], reduction="sum"))


def test_reductions():
    s, t = torch.randn(5, 7), F.log_softmax(torch.randn(5, 7), -1)
    per = losses.forward_kl(s, t, reduction="none")
    assert per.shape == (5,)
    assert torch.allclose(losses.forward_kl(s, t, reduction="mean"), per.mean())
    with pytest.raises(ValueError):
        losses.forward_kl(s, t, reduction="avg")


def test_forward_kl_handles_renormalised_zeros():
    lp = torch.log(torch.tensor([[0.5, 0.5, 0.0]]))
    v = losses.forward_kl(torch.tensor([[0.0, 0.0, 5.0]]), lp)
    assert torch.isfinite(v)


def test_ctc_matches_brute_force():
    # 3 frames, classes {blank=0, 1, 2}, target "1 2": sum over all alignments that collapse to it.
    g = torch.Generator().manual_seed(1)
    lp = F.log_softmax(torch.randn(3, 1, 3, generator=g), -1)
    total = 0.0
    for path in itertools.product(range(3), repeat=3):
        collapsed = [c for i, c in enumerate(path) if c != 0 and (i == 0 or c != path[i - 1])]
        if collapsed == [1, 2]:
            total += math.exp(sum(lp[i, 0, c].item() for i, c in enumerate(path)))
    got = losses.ctc(lp, torch.tensor([[1, 2]]), torch.tensor([3]), torch.tensor([2]))
    assert abs(got.item() - (-math.log(total))) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_forward_kl_matches_value_and_gradient(dtype):
    g = torch.Generator().manual_seed(3)
    z = (torch.randn(37, 50, generator=g) * 3).to(dtype)
    lp = F.log_softmax(torch.randn(37, 50, generator=g) * 2, -1)
    w = torch.rand(37, generator=g)
    a = z.clone().requires_grad_(True)
    ref = losses.forward_kl(a.float(), lp, reduction="none")
    (ref * w).sum().backward()
    b = z.clone().requires_grad_(True)
    got, top = losses.forward_kl_chunked(b, lp.exp(), chunk_rows=8)
    (got * w).sum().backward()
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4)
    assert torch.equal(top, z.float().argmax(-1))
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    assert b.grad.dtype == dtype and torch.allclose(b.grad.float(), a.grad.float(), atol=tol)


def test_jsd_endpoints_are_forward_and_reverse_kl_as_in_trl(pq):
    """TRL GKD semantics: beta=0 -> KL(teacher || student), beta=1 -> KL(student || teacher) (not 0)."""
    s, t = pq
    lp = F.log_softmax(t, -1)
    assert torch.allclose(losses.jsd(s, lp, beta=0.0, reduction="none"),
                          losses.forward_kl(s, lp, reduction="none"), atol=1e-6)
    assert torch.allclose(losses.jsd(s, lp, beta=1.0, reduction="none"),
                          losses.reverse_kl(s, lp, reduction="none"), atol=1e-6)
    assert losses.jsd(s, lp, beta=0.0).item() > 0.1 and losses.jsd(s, lp, beta=1.0).item() > 0.1
    # gradients flow at the endpoints too (a constant 0 would give none)
    z = s.clone().requires_grad_(True)
    losses.jsd(z, lp, beta=1.0).backward()
    assert z.grad.abs().sum() > 0


def test_fkl_rkl_swap_under_argument_swap_and_divergences_zero_at_equality(pq):
    s, t = pq
    ls, lt = F.log_softmax(s, -1), F.log_softmax(t, -1)
    assert torch.allclose(losses.forward_kl(s, lt, reduction="none"), losses.reverse_kl(t, ls, reduction="none"),
                          atol=1e-5)
    assert torch.allclose(losses.tvd(s, lt, reduction="none"), losses.tvd(t, ls, reduction="none"), atol=1e-6)
    for beta in (0.0, 0.1, 0.5, 0.9, 1.0):
        assert losses.jsd(s, ls, beta=beta).abs().item() < 1e-5, beta
        assert (losses.jsd(s, lt, beta=beta, reduction="none") >= -1e-6).all(), beta
