"""tcfa.compat.pot against POT itself on POT's documented examples and on random problems."""
import numpy as np
import pytest
import torch

import tcfa.compat.pot as tot

ot = pytest.importorskip("ot")


def samples(n=20, m=30, seed=0):
    rng = np.random.default_rng(seed)
    xs, xt = rng.normal(size=(n, 2)), rng.normal(size=(m, 2)) + 1.0
    a, b = rng.random(n) + 0.1, rng.random(m) + 0.1
    return xs, xt, a / a.sum(), b / b.sum()


def test_pot_docstring_examples():
    a, b, M = [0.5, 0.5], [0.5, 0.5], [[0.0, 1.0], [1.0, 0.0]]
    for fn in ("sinkhorn", "sinkhorn2"):
        got, want = getattr(tot, fn)(a, b, M, 1), getattr(ot, fn)(a, b, M, 1)
        assert isinstance(got, np.ndarray)
        np.testing.assert_allclose(got, want, atol=1e-8)
    np.testing.assert_allclose(tot.sinkhorn(a, b, M, 1), [[0.36552929, 0.13447071], [0.13447071, 0.36552929]],
                               atol=1e-8)
    for fn in ("sinkhorn_unbalanced", "sinkhorn_unbalanced2"):
        got = getattr(tot, fn)(a, b, M, 1.0, 1.0, stopThr=1e-12)
        np.testing.assert_allclose(got, getattr(ot.unbalanced, fn)(a, b, M, 1.0, 1.0, stopThr=1e-12), atol=1e-8)


@pytest.mark.parametrize("method", ["sinkhorn", "sinkhorn_log", "sinkhorn_stabilized"])
def test_balanced_plans_losses_and_logs_match_pot(method):
    xs, xt, a, b = samples()
    M = ot.dist(xs, xt)
    P, log = tot.sinkhorn(a, b, M, 0.5, method=method, stopThr=1e-12, log=True)
    Pw, logw = ot.sinkhorn(a, b, M, 0.5, method="sinkhorn_log", stopThr=1e-12, numItermax=10000, log=True)
    np.testing.assert_allclose(P, Pw, atol=1e-10)
    # log_u and log_v are fixed up to a constant moving from one to the other: compare the plan they make
    np.testing.assert_allclose(np.exp(log["log_u"][:, None] + log["log_v"][None, :] - M / 0.5), Pw, atol=1e-10)
    assert {"err", "niter", "log_u", "log_v", "u", "v"} <= set(log)
    assert tot.sinkhorn2(a, b, M, 0.5, stopThr=1e-12) == pytest.approx(ot.sinkhorn2(a, b, M, 0.5, stopThr=1e-12,
                                                                                    numItermax=10000), abs=1e-10)
    # equal masses other than 1 scale the plan, as in POT
    np.testing.assert_allclose(tot.sinkhorn(2 * a, 2 * b, M, 0.5, stopThr=1e-12), 2 * Pw, atol=1e-9)


@pytest.mark.parametrize("metric", ["sqeuclidean", "cosine"])
def test_empirical_functions_match_pot(metric):
    xs, xt, a, b = samples(seed=1)
    kw = dict(metric=metric, stopThr=1e-12)
    np.testing.assert_allclose(tot.empirical_sinkhorn(xs, xt, 0.3, a, b, **kw),
                               ot.bregman.empirical_sinkhorn(xs, xt, 0.3, a, b, **kw), atol=1e-9)
    assert float(tot.empirical_sinkhorn2(xs, xt, 0.3, a, b, **kw)) == pytest.approx(
        float(ot.bregman.empirical_sinkhorn2(xs, xt, 0.3, a, b, **kw)), abs=1e-9)
    # at reg 0.3 the self-transport X_s -> X_s does not reach 1e-12 in 10000 iterations in either library
    assert float(tot.empirical_sinkhorn_divergence(xs, xt, 1.0, a, b, **kw)) == pytest.approx(
        float(ot.bregman.empirical_sinkhorn_divergence(xs, xt, 1.0, a, b, **kw)), abs=1e-9)


@pytest.mark.parametrize("reg_m", [0.7, (0.4, 2.0), (0.5, float("inf"))])
def test_unbalanced_matches_pot(reg_m):
    xs, xt, a, b = samples(seed=2)
    a = 1.3 * a
    if isinstance(reg_m, tuple) and reg_m[1] == float("inf"):
        b = 1.3 * b
    M = ot.dist(xs, xt)
    kw = dict(stopThr=1e-13, numItermax=20000)
    P, log = tot.sinkhorn_unbalanced(a, b, M, 0.3, reg_m, log=True, **kw)
    Pw, logw = ot.unbalanced.sinkhorn_unbalanced(a, b, M, 0.3, reg_m, log=True, **kw)
    np.testing.assert_allclose(P, Pw, atol=1e-9)
    np.testing.assert_allclose(log["logu"][:, None] + log["logv"][None, :], logw["logu"][:, None] + logw["logv"][None, :],
                               atol=1e-7)
    for cost in ("linear", "total"):
        assert float(tot.sinkhorn_unbalanced2(a, b, M, 0.3, reg_m, returnCost=cost, **kw)) == pytest.approx(
            float(ot.unbalanced.sinkhorn_unbalanced2(a, b, M, 0.3, reg_m, returnCost=cost, **kw)), abs=1e-9)


def _grads(fn, tensors, *args, **kw):
    leaves = [t.clone().requires_grad_() for t in tensors]
    return torch.autograd.grad(fn(*leaves, *args, **kw), leaves)


@pytest.mark.parametrize("n, m, reg, mass", [(20, 30, 0.5, 1.0), (9, 4, 0.05, 1.0), (1, 5, 0.3, 1.0), (12, 12, 1.0, 2.5)])
def test_loss_gradients_for_M_a_and_b_equal_pots_unrolled_ones(n, m, reg, mass):
    # POT differentiates through its iterations; tcfa through the converged plan (implicit): the same
    # gradient, including its gauge for a and b (defined only up to a shared constant on sum a = sum b)
    xs, xt, a, b = samples(n, m, seed=n)
    M, a, b = torch.tensor(ot.dist(xs, xt)), torch.tensor(a) * mass, torch.tensor(b) * mass
    kw = dict(stopThr=1e-14, numItermax=100000)
    got = _grads(lambda a, b, M: tot.sinkhorn2(a, b, M, reg, **kw), (a, b, M))
    want = _grads(lambda a, b, M: ot.sinkhorn2(a, b, M, reg, method="sinkhorn_log", **kw), (a, b, M))
    for g, w, name in zip(got, want, "abM"):
        np.testing.assert_allclose(g.numpy(), w.numpy(), atol=1e-9 * max(1.0, float(w.abs().max())), err_msg=name)
    # the plan alone (P held fixed) is not the gradient: it misses P's own dependence on M (none with one
    # row, where P = a b^T whatever M, and little at small reg, where P sits near a vertex)
    if min(n, m) > 1 and reg >= 0.5:
        assert float((got[2] - tot.sinkhorn(a, b, M, reg, **kw)).abs().max()) > 1e-3


@pytest.mark.parametrize("metric", ["sqeuclidean", "cosine"])
def test_empirical_loss_gradients_for_the_samples_equal_pots(metric):
    xs, xt, a, b = (torch.tensor(v) for v in samples(7, 11, seed=4))
    kw = dict(metric=metric, stopThr=1e-14)
    got = _grads(lambda *t: tot.empirical_sinkhorn2(*t[:2], 0.2, *t[2:], **kw), (xs, xt, a, b))
    want = _grads(lambda *t: ot.bregman.empirical_sinkhorn2(*t[:2], 0.2, *t[2:], method="sinkhorn_log",
                                                             numIterMax=100000, **kw), (xs, xt, a, b))
    for g, w, name in zip(got, want, ("X_s", "X_t", "a", "b")):
        np.testing.assert_allclose(g.numpy(), w.numpy(), atol=1e-9 * max(1.0, float(w.abs().max())), err_msg=name)


@pytest.mark.parametrize("reg_m", [1.0, (0.5, 2.0), (float("inf"), 0.7), float("inf")])
def test_unbalanced_plans_and_losses_have_pots_gradients(reg_m):
    xs, xt, a, b = samples(6, 5, seed=7)
    M, a = torch.tensor(ot.dist(xs, xt)) / 4, torch.tensor(a) * 1.3
    # reg_m = inf on both sides is balanced: equal masses (POT's plan is NaN otherwise, tcfa's an error)
    b = torch.tensor(b) * (1.3 if reg_m == float("inf") else 0.8)
    kw = dict(stopThr=1e-15, numItermax=200000)
    upstream = torch.randn(6, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cases = [(lambda m, *ab: (upstream * m.sinkhorn_unbalanced(*ab, 0.3, reg_m, **kw)).sum(), "plan")]
    cases += [(lambda m, *ab, c=c: m.sinkhorn_unbalanced2(*ab, 0.3, reg_m, returnCost=c, **kw), c)
              for c in ("linear", "total")]
    for loss, what in cases:
        got = _grads(lambda a, b, M: loss(tot, a, b, M), (a, b, M))
        want = _grads(lambda a, b, M: loss(ot.unbalanced, a, b, M), (a, b, M))
        for g, w, name in zip(got, want, "abM"):
            np.testing.assert_allclose(g.numpy(), w.numpy(), atol=1e-9 * max(1.0, float(w.abs().max())),
                                       err_msg=f"{what}: {name}")
    if reg_m == float("inf"):
        np.testing.assert_allclose(tot.sinkhorn_unbalanced(a, b, M, 0.3, reg_m, **kw),
                                   ot.sinkhorn(a, b, M, 0.3, **kw), atol=1e-12)
        with pytest.raises(ValueError, match="same total mass"):
            tot.sinkhorn_unbalanced(a, b * 2, M, 0.3, reg_m)


def test_balanced_plan_has_pots_gradient():
    xs, xt, a, b = samples(8, 6, seed=11)
    M, a, b = torch.tensor(ot.dist(xs, xt)), torch.tensor(a), torch.tensor(b)
    upstream = torch.randn(8, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    kw = dict(stopThr=1e-15, numItermax=100000)
    got = _grads(lambda a, b, M: (upstream * tot.sinkhorn(a, b, M, 0.4, **kw)).sum(), (a, b, M))
    want = _grads(lambda a, b, M: (upstream * ot.sinkhorn(a, b, M, 0.4, method="sinkhorn_log", **kw)).sum(), (a, b, M))
    for g, w, name in zip(got, want, "abM"):
        np.testing.assert_allclose(g.numpy(), w.numpy(), atol=1e-9 * max(1.0, float(w.abs().max())), err_msg=name)


def test_unsupported_arguments_raise_naming_them():
    xs, xt, a, b = samples(5, 6)
    M = ot.dist(xs, xt)
    with pytest.raises(ValueError, match="warmstart"):
        tot.sinkhorn(a, b, M, 1.0, warmstart=(np.zeros(5), np.zeros(6)))
    with pytest.raises(ValueError, match="method 'greenkhorn'"):
        tot.sinkhorn(a, b, M, 1.0, method="greenkhorn")
    with pytest.raises(ValueError, match="isLazy"):
        tot.empirical_sinkhorn(xs, xt, 1.0, isLazy=True)
    with pytest.raises(ValueError, match="metric 'cityblock'"):
        tot.empirical_sinkhorn(xs, xt, 1.0, metric="cityblock")
    with pytest.raises(ValueError, match="reg_type 'entropy'"):
        tot.sinkhorn_unbalanced(a, b, M, 1.0, 1.0, reg_type="entropy")
    with pytest.raises(ValueError, match="several histograms"):
        tot.sinkhorn(a, np.stack([b, b], 1), M, 1.0)
    with pytest.raises(ValueError, match="same total mass"):
        tot.sinkhorn(a, 2 * b, M, 1.0)
    with pytest.raises(ValueError, match=r"keyword\(s\) \['tau'\]"):
        tot.sinkhorn(a, b, M, 1.0, tau=3)


def test_pot_scalars_dtypes_and_named_errors():
    xs, xt, a, b = samples(6, 7, seed=4)
    M = ot.dist(xs, xt)
    np.testing.assert_allclose(tot.sinkhorn(a, b, M, np.float32(0.5)), ot.sinkhorn(a, b, M, 0.5), atol=1e-8)
    P32 = tot.sinkhorn(a.astype(np.float32), b.astype(np.float32), M.astype(np.float32), 0.5)
    assert P32.dtype == np.float32
    np.testing.assert_allclose(tot.sinkhorn_unbalanced(a, b, M, 0.5, np.array(1.0)),
                               ot.unbalanced.sinkhorn_unbalanced(a, b, M, 0.5, 1.0), atol=1e-7)
    with pytest.raises(ValueError, match="numItermax must be a positive int"):
        tot.sinkhorn(a, b, M, 0.5, numItermax=0)
    with pytest.raises(ValueError, match="reg must be > 0"):
        tot.sinkhorn(a, b, M, 0.0)
    with pytest.raises(ValueError, match="reg_m must be > 0"):
        tot.sinkhorn_unbalanced(a, b, M, 0.5, 0.0)
    bad = M.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="M must be finite"):
        tot.sinkhorn(a, b, bad, 0.5)


@pytest.mark.parametrize("reg_m", [None, 1.0])
def test_zero_weights_have_finite_cost_gradients_and_nan_weight_gradients(reg_m):
    # a row or column without mass holds no plan: the adjoint system is solved on the support (it was
    # singular, and backward raised); dL/dM matches finite differences, a zero weight's gradient is NaN
    g = torch.Generator().manual_seed(2)
    M = torch.rand(3, 4, generator=g, dtype=torch.float64)
    a = torch.tensor([0.5, 0.0, 0.5], dtype=torch.float64)
    b = torch.tensor([0.3, 0.0, 0.3, 0.4], dtype=torch.float64)
    kw = dict(stopThr=1e-14, numItermax=100000)
    loss = (lambda a, b, M: tot.sinkhorn2(a, b, M, 0.5, **kw)) if reg_m is None else (
        lambda a, b, M: tot.sinkhorn_unbalanced2(a, b, M, 0.5, reg_m, **kw))
    ga, gb, gM = _grads(loss, (a, b, M))
    fd = torch.zeros_like(M)
    for i in range(3):
        for j in range(4):
            E = torch.zeros_like(M)
            E[i, j] = 1e-6
            fd[i, j] = (loss(a, b, M + E) - loss(a, b, M - E)) / 2e-6
    torch.testing.assert_close(gM, fd, atol=1e-8, rtol=0)
    assert bool(ga.isnan()[1]) and bool(gb.isnan()[1])
    assert bool(ga[[0, 2]].isfinite().all()) and bool(gb[[0, 2, 3]].isfinite().all())
