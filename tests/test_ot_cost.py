"""tcfa.sinkhorn_cost (a given cost matrix) against POT, against tcfa.sinkhorn on points, and its gradients."""
import numpy as np
import pytest
import torch

import tcfa


def problem(n=30, m=40, d=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, d, generator=g, dtype=dtype), torch.randn(m, d, generator=g, dtype=dtype) + 0.5
    a = torch.rand(n, generator=g, dtype=dtype) + 0.1
    b = torch.rand(m, generator=g, dtype=dtype) + 0.1
    return x, y, a / a.sum(), b / b.sum()


def test_plan_and_value_match_pot_sinkhorn_log():
    ot = pytest.importorskip("ot")
    x, y, a, b = problem()
    C = torch.cdist(x, y) ** 2
    eps = 0.5
    r = tcfa.sinkhorn_cost(C, a, b, eps=eps, tol=1e-13, max_iter=5000)
    P, log = ot.sinkhorn(a.numpy(), b.numpy(), C.numpy(), eps, method="sinkhorn_log", stopThr=1e-14,
                         numItermax=20000, log=True)
    np.testing.assert_allclose(r.plan().numpy(), P, atol=1e-10)
    # POT's log_u = f / eps + log a: equal up to the constant that moves from f to g
    shift = (r.f / eps + a.log()).numpy() - log["log_u"]
    np.testing.assert_allclose(shift, shift.mean(), atol=1e-8)
    primal = float((P * C.numpy()).sum() + eps * (P * (np.log(P) - np.log(np.outer(a, b)))).sum())
    assert float(r.value()) == pytest.approx(primal, abs=1e-9)
    assert bool(r.converged) and r.f.shape == (30,) and r.g.shape == (40,)


def test_equals_sinkhorn_on_points_and_batches_are_one_call():
    xs, ys = [], []
    for k, (n, m) in enumerate([(7, 11), (13, 5), (1, 9)]):
        x, y, _, _ = problem(n, m, seed=k)
        xs.append(x)
        ys.append(y)
    x, y = torch.cat(xs), torch.cat(ys)
    xo = torch.tensor([0, 7, 20, 21])
    yo = torch.tensor([0, 11, 16, 25])
    ref = tcfa.sinkhorn(x, y, eps=0.3, x_offsets=xo, y_offsets=yo, tol=1e-12, max_iter=3000)
    flat = torch.cat([(torch.cdist(u, v) ** 2).reshape(-1) for u, v in zip(xs, ys)])
    got = tcfa.sinkhorn_cost(flat, eps=0.3, x_offsets=xo, y_offsets=yo, tol=1e-12, max_iter=3000)
    for p_ref, p_got in zip(ref.plan(), got.plan()):
        torch.testing.assert_close(p_got, p_ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(got.value(), ref.value(), atol=1e-10, rtol=0)
    values = torch.randn(25, 2, dtype=torch.float64)
    torch.testing.assert_close(tcfa.barycentric_map(got, values), tcfa.barycentric_map(ref, values), atol=1e-9, rtol=0)
    # a dense (B, n, m) batch gives (B, n) potentials and equals its problems solved one by one
    Cb = torch.stack([torch.cdist(*problem(6, 8, seed=s)[:2]) ** 2 for s in range(4)])
    rb = tcfa.sinkhorn_cost(Cb, eps=0.5, tol=1e-12, scaling=0.7, max_iter=5000)
    assert bool(rb.converged.all())
    assert rb.f.shape == (4, 6) and rb.g.shape == (4, 8) and rb.plan().shape == (4, 6, 8)
    for k in range(4):
        one = tcfa.sinkhorn_cost(Cb[k], eps=0.5, tol=1e-12, max_iter=5000)
        torch.testing.assert_close(rb.plan()[k], one.plan(), atol=1e-10, rtol=0)


def test_value_gradients_by_finite_differences():
    x, y, a, b = problem(5, 6, seed=3)
    C = (torch.cdist(x, y) ** 2).requires_grad_()
    a_, b_ = a.clone().requires_grad_(), b.clone().requires_grad_()
    kw = dict(eps=0.4, tol=1e-14, max_iter=10000)
    r = tcfa.sinkhorn_cost(C, a_, b_, **kw)
    gC, ga, gb = torch.autograd.grad(r.value(), (C, a_, b_))
    torch.testing.assert_close(gC, r.plan(), atol=1e-12, rtol=0)
    h = 1e-6
    for i, j in [(0, 0), (2, 5), (4, 1)]:
        E = torch.zeros_like(C)
        E[i, j] = h
        fd = (tcfa.sinkhorn_cost(C.detach() + E, a, b, **kw).value() - tcfa.sinkhorn_cost(C.detach() - E, a, b, **kw).value()) / (2 * h)
        assert float(gC[i, j]) == pytest.approx(float(fd), abs=1e-7)
    # a and b are normalised inside: the gradient of the value along a direction that keeps the mass
    direction = torch.tensor([1.0, -1.0, 0.5, -0.5, 0.0], dtype=torch.float64) * 1e-6
    fd = (tcfa.sinkhorn_cost(C.detach(), a + direction, b, **kw).value()
          - tcfa.sinkhorn_cost(C.detach(), a - direction, b, **kw).value()) / 2
    assert float((ga * direction).sum()) == pytest.approx(float(fd), abs=1e-12)


def test_half_precision_cost_is_solved_in_fp32():
    x, y, a, b = problem(8, 9, dtype=torch.float32)
    C = torch.cdist(x, y) ** 2
    got = tcfa.sinkhorn_cost(C.half(), eps=0.5, tol=1e-6)
    want = tcfa.sinkhorn_cost(C.half().float(), eps=0.5, tol=1e-6)
    assert got.f.dtype == torch.float32
    torch.testing.assert_close(got.plan(), want.plan())


def test_bad_inputs_name_the_argument():
    C = torch.rand(4, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="eps must be > 0"):
        tcfa.sinkhorn_cost(C, eps=0.0)
    with pytest.raises(ValueError, match="needs x_offsets and y_offsets"):
        tcfa.sinkhorn_cost(C.reshape(-1), eps=1.0)
    with pytest.raises(ValueError, match="C must hold sum_k n_k \\* m_k = 21 entries"):
        tcfa.sinkhorn_cost(C.reshape(-1), eps=1.0, x_offsets=torch.tensor([0, 3]), y_offsets=torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="x_offsets and y_offsets are for a flat"):
        tcfa.sinkhorn_cost(C, eps=1.0, x_offsets=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="at least one row and one column"):
        tcfa.sinkhorn_cost(C.reshape(-1), eps=1.0, x_offsets=torch.tensor([0, 4, 4]), y_offsets=torch.tensor([0, 5, 5]))
    bad = C.clone()
    bad[1, 2] = float("inf")
    with pytest.raises(ValueError, match="C must be finite"):
        tcfa.sinkhorn_cost(bad, eps=1.0)
    with pytest.raises(ValueError, match="a must be non-negative"):
        tcfa.sinkhorn_cost(C, -torch.ones(4, dtype=torch.float64), eps=1.0)
    with pytest.raises(ValueError, match=r"b must hold one weight per row \(5\)"):
        tcfa.sinkhorn_cost(C, None, torch.ones(4, dtype=torch.float64), eps=1.0)
    with pytest.raises(ValueError, match="C must not be empty"):
        tcfa.sinkhorn_cost(torch.zeros(0, 3), eps=1.0)
    with pytest.raises(ValueError, match="scaling must be in"):
        tcfa.sinkhorn_cost(C, eps=1.0, scaling=1.5)
