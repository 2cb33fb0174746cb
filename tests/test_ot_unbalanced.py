"""Unbalanced OT (reach=...) against POT's sinkhorn_unbalanced (KL), the primal objective, finite
differences, and the balanced solver as rho grows."""
import numpy as np
import pytest
import torch

import tcfa

ot = pytest.importorskip("ot")


def masses(n=25, m=35, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 2, generator=g, dtype=dtype), torch.randn(m, 2, generator=g, dtype=dtype) + 1.0
    a, b = torch.rand(n, generator=g, dtype=dtype) + 0.1, torch.rand(m, generator=g, dtype=dtype) + 0.1
    return x, y, 1.3 * a / a.sum(), 0.8 * b / b.sum()  # unequal total masses


def generalised_kl(p, q):
    return (p * np.log(p / q) - p + q).sum()


def primal(P, M, a, b, eps, rho_a, rho_b):
    value = (P * M).sum() + eps * generalised_kl(P, np.outer(a, b))
    value += rho_a * generalised_kl(P.sum(1), a) if rho_a is not None else 0.0
    return value + (rho_b * generalised_kl(P.sum(0), b) if rho_b is not None else 0.0)


@pytest.mark.parametrize("reach", [0.7, (0.4, 2.0), (0.5, None)])
@pytest.mark.parametrize("mode", ["dense", "online"])
def test_plan_and_value_match_pot_and_the_primal(reach, mode):
    x, y, a, b = masses()
    if isinstance(reach, tuple) and reach[1] is None:
        b = b * (1.3 / 0.8)  # an exact marginal on b's side needs the masses to agree with the plan's
    eps = 0.3
    r = tcfa.sinkhorn(x, y, a, b, eps=eps, reach=reach, tol=1e-13, max_iter=5000, mode=mode)
    rho_a, rho_b = reach if isinstance(reach, tuple) else (reach, reach)
    M = (torch.cdist(x, y) ** 2).numpy()
    P, _ = ot.unbalanced.sinkhorn_unbalanced(a.numpy(), b.numpy(), M, eps,
                                             (rho_a, rho_b if rho_b is not None else float("inf")),
                                             reg_type="kl", stopThr=1e-15, numItermax=20000, log=True)
    assert bool(r.converged)
    np.testing.assert_allclose(r.plan().numpy(), P, atol=1e-9)
    assert float(r.value()) == pytest.approx(primal(P, M, a.numpy(), b.numpy(), eps, rho_a, rho_b), abs=1e-9)
    # the same problem as a given cost
    rc = tcfa.sinkhorn_cost(torch.cdist(x, y) ** 2, a, b, eps=eps, reach=reach, tol=1e-13, max_iter=5000)
    np.testing.assert_allclose(rc.plan().numpy(), P, atol=1e-9)
    assert float(rc.value()) == pytest.approx(float(r.value()), abs=1e-9)


def test_gradients_by_finite_differences():
    x, y, a, b = masses(6, 7, seed=2)
    kw = dict(eps=0.5, reach=(0.8, 1.5), tol=1e-14, max_iter=20000)
    xg, ag = x.clone().requires_grad_(), a.clone().requires_grad_()
    r = tcfa.sinkhorn(xg, y, ag, b, **kw)
    gx, ga = torch.autograd.grad(r.value(), (xg, ag))
    h = 1e-6
    for i, k in [(0, 0), (3, 1)]:
        E = torch.zeros_like(x)
        E[i, k] = h
        fd = (tcfa.sinkhorn(x + E, y, a, b, **kw).value() - tcfa.sinkhorn(x - E, y, a, b, **kw).value()) / (2 * h)
        assert float(gx[i, k]) == pytest.approx(float(fd), abs=1e-7)
    for i in (0, 5):
        E = torch.zeros_like(a)
        E[i] = h
        fd = (tcfa.sinkhorn(x, y, a + E, b, **kw).value() - tcfa.sinkhorn(x, y, a - E, b, **kw).value()) / (2 * h)
        assert float(ga[i]) == pytest.approx(float(fd), abs=1e-7)
    C = (torch.cdist(x, y) ** 2).requires_grad_()
    rc = tcfa.sinkhorn_cost(C, a, b, **kw)
    (gC,) = torch.autograd.grad(rc.value(), C)
    torch.testing.assert_close(gC, rc.plan(), atol=1e-12, rtol=0)


def test_large_reach_recovers_balanced_and_batches_equal_single_solves():
    x, y, a, b = masses(12, 9, seed=4)
    a, b = a / a.sum(), b / b.sum()
    bal = tcfa.sinkhorn(x, y, a, b, eps=0.4, tol=1e-12, max_iter=5000)
    unb = tcfa.sinkhorn(x, y, a, b, eps=0.4, reach=1e9, tol=1e-12, max_iter=5000)
    torch.testing.assert_close(unb.plan(), bal.plan(), atol=1e-8, rtol=0)
    xs = torch.cat([x, x[:5] * 2]), torch.cat([y, y[:3] - 1])
    xo, yo = torch.tensor([0, 12, 17]), torch.tensor([0, 9, 12])
    batch = tcfa.sinkhorn(*xs, eps=0.4, reach=0.6, x_offsets=xo, y_offsets=yo, tol=1e-12, max_iter=5000, scaling=0.8)
    for k in range(2):
        one = tcfa.sinkhorn(xs[0][xo[k]:xo[k + 1]], xs[1][yo[k]:yo[k + 1]], eps=0.4, reach=0.6, tol=1e-12,
                            max_iter=5000)
        torch.testing.assert_close(batch.plan()[k], one.plan(), atol=1e-9, rtol=0)
        assert float(batch.value()[k]) == pytest.approx(float(one.value()), abs=1e-9)


def test_bad_reach_names_the_argument():
    x, y, a, b = masses(5, 6)
    for bad in (0.0, -1.0, float("inf"), (1.0, 2.0, 3.0), "far"):
        with pytest.raises(ValueError, match="reach"):
            tcfa.sinkhorn(x, y, eps=1.0, reach=bad)
    with pytest.raises(ValueError, match="a is all zero in problem 0"):
        tcfa.sinkhorn(x, y, torch.zeros(5, dtype=torch.float64), eps=1.0, reach=1.0)


def test_divergence_checks_its_inputs_and_mixed_weight_dtypes():
    x, y, a, b = masses(5, 6)
    with pytest.raises(TypeError, match="y has dtype"):
        tcfa.sinkhorn_divergence(x, y.float(), eps=1.0)
    with pytest.raises(ValueError, match="x and y must have the same width"):
        tcfa.sinkhorn_divergence(x, y[:, :1], eps=1.0)
    with pytest.raises(ValueError, match=r"a must hold one weight per row \(5\), got shape \(4,\)"):
        tcfa.sinkhorn_divergence(x, y, a[:4], b, eps=1.0)
    mixed = tcfa.sinkhorn_divergence(x, y, a, b.float(), eps=1.0, reach=0.5, tol=1e-12)
    same = tcfa.sinkhorn_divergence(x, y, a, b.float().double(), eps=1.0, reach=0.5, tol=1e-12)
    torch.testing.assert_close(mixed, same)
    C = torch.cdist(x, y) ** 2
    r = tcfa.sinkhorn_cost(C.reshape(-1), eps=1.0, x_offsets=[0, 5], y_offsets=[0, 6])
    torch.testing.assert_close(r.plan(), tcfa.sinkhorn_cost(C, eps=1.0).plan())
