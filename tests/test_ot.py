"""tcfa.sinkhorn and friends against POT and the naive reference."""
import numpy as np
import ot
import pytest
import torch

import reference as ref
import tcfa

F64 = torch.float64


def cloud(n, m, d=3, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    y = torch.randn(m, d, generator=g, dtype=dtype) * 1.3 + 0.7
    a = torch.rand(n, generator=g, dtype=dtype) + 0.1
    b = torch.rand(m, generator=g, dtype=dtype) + 0.1
    return x, y, a / a.sum(), b / b.sum()


def solve_tight(x, y, a, b, eps, **kw):
    return tcfa.sinkhorn(x, y, a, b, eps=eps, tol=1e-12, max_iter=20000, **kw)


# ------------------------------------------------------------------ parity with POT (fp64, both to 1e-12)
@pytest.mark.parametrize("mode", ["dense", "online"])
@pytest.mark.parametrize("kind", ["sqeuclidean", "cosine"])
def test_plan_matches_pot_sinkhorn_log(mode, kind):
    x, y, a, b = cloud(37, 53)
    eps = 0.4 if kind == "sqeuclidean" else 0.05
    r = solve_tight(x, y, a, b, eps, mode=mode, cost=kind)
    M = ot.dist(x.numpy(), y.numpy(), metric="sqeuclidean" if kind == "sqeuclidean" else "cosine")
    P = ot.bregman.sinkhorn_log(a.numpy(), b.numpy(), M, eps, stopThr=1e-13, numItermax=100000)
    assert bool(r.converged.all())
    np.testing.assert_allclose(r.plan().numpy(), P, atol=1e-9, rtol=0)
    # POT's sinkhorn2 returns <P, C>; the value adds eps * KL(P | a b^T)
    cost_pot = ot.sinkhorn2(a.numpy(), b.numpy(), M, eps, method="sinkhorn_log", stopThr=1e-13, numItermax=100000)
    Pt = r.plan()
    assert abs(float((Pt * torch.from_numpy(M)).sum()) - float(cost_pot)) < 1e-9
    kl = (Pt * (Pt / torch.outer(a, b)).log()).sum()
    torch.testing.assert_close(r.value()[0], (Pt * torch.from_numpy(M)).sum() + eps * kl, atol=1e-9, rtol=0)


def test_barycentric_map_matches_pot_sinkhorn_transport():
    x, y, _, _ = cloud(40, 60)
    eps = 0.5
    r = tcfa.sinkhorn(x, y, eps=eps, tol=1e-12, max_iter=20000)
    da = ot.da.SinkhornTransport(reg_e=eps, max_iter=100000, tol=1e-13, log=False)
    da.fit(Xs=x.numpy(), Xt=y.numpy())
    want = da.transform(Xs=x.numpy())
    np.testing.assert_allclose(tcfa.barycentric_map(r, y).numpy(), want, atol=1e-8, rtol=0)


def test_entropic_gw_matches_pot():
    x, _, a, _ = cloud(30, 1, d=2)
    y = torch.randn(25, 4, dtype=F64, generator=torch.Generator().manual_seed(3))
    # costs scaled to at most 1, so that POT's (non-log) inner Sinkhorn does not underflow
    x = x / float(ref.cost(x, x, "sqeuclidean").max()) ** 0.5
    y = y / float(ref.cost(y, y, "sqeuclidean").max()) ** 0.5
    b = torch.full((25,), 1 / 25, dtype=F64)
    eps = 5e-2
    res = tcfa.entropic_gw(x, y, a, b, eps=eps, tol=1e-11, inner_tol=1e-13, max_iter=2000)
    C1 = ot.dist(x.numpy(), x.numpy())
    C2 = ot.dist(y.numpy(), y.numpy())
    T = ot.gromov.entropic_gromov_wasserstein(C1, C2, a.numpy(), b.numpy(), "square_loss", epsilon=eps, tol=1e-13,
                                              max_iter=2000, stopThr=1e-13, numItermax=100000)
    assert res.converged
    np.testing.assert_allclose(res.plan.numpy(), T, atol=1e-8, rtol=0)
    gw = ot.gromov.gwloss(*ot.gromov.init_matrix(C1, C2, a.numpy(), b.numpy(), "square_loss"), T)
    assert abs(float(res.value) - float(gw)) < 1e-7


def test_fp32_close_to_fp64():
    x, y, a, b = cloud(64, 80)
    r64 = tcfa.sinkhorn(x, y, a, b, eps=0.3, tol=1e-10, max_iter=5000)
    r32 = tcfa.sinkhorn(x.float(), y.float(), a.float(), b.float(), eps=0.3, tol=1e-5, max_iter=5000)
    assert r32.f.dtype == torch.float32 and bool(r32.converged.all())
    # (dtype, atol, rtol) = (fp32, 0, 1e-4) on the value, 1e-3 relative on the plan's largest entries
    torch.testing.assert_close(r32.value().double(), r64.value(), atol=0, rtol=1e-4)
    torch.testing.assert_close(r32.plan().double(), r64.plan(), atol=1e-3 * float(r64.plan().max()), rtol=0)


@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_fp32_far_from_the_origin(offset):
    # |x|^2 + |y|^2 - 2 x.y at an offset of 1e3 would lose every digit of the
    # O(1) costs in fp32; each problem is centred on its x mean when that
    # shrinks the magnitudes (and left alone at offset 0, where it would not).
    x, y, a, b = cloud(64, 80)
    shift = torch.full((x.shape[1],), offset, dtype=x.dtype)
    r64 = tcfa.sinkhorn(x, y, a, b, eps=0.3, tol=1e-10, max_iter=5000)
    r32 = tcfa.sinkhorn((x + shift).float(), (y + shift).float(), a.float(), b.float(), eps=0.3, tol=1e-5,
                        max_iter=5000)
    torch.testing.assert_close(r32.value().double(), r64.value(), atol=0, rtol=1e-4)
    torch.testing.assert_close(r32.plan().double(), r64.plan(), atol=1e-3 * float(r64.plan().max()), rtol=0)


# ------------------------------------------------------------------ batches, modes, shapes
def test_ragged_batch_equals_each_problem_alone():
    sizes = [(1, 4), (13, 7), (17, 29), (251, 263)]
    parts = [cloud(n, m, seed=k) for k, (n, m) in enumerate(sizes)]
    x = torch.cat([p[0] for p in parts])
    y = torch.cat([p[1] for p in parts])
    a = torch.cat([p[2] for p in parts])
    b = torch.cat([p[3] for p in parts])
    xo = torch.tensor([0] + np.cumsum([n for n, _ in sizes]).tolist())
    yo = torch.tensor([0] + np.cumsum([m for _, m in sizes]).tolist())
    batch = tcfa.sinkhorn(x, y, a, b, eps=0.5, x_offsets=xo, y_offsets=yo, tol=1e-11, max_iter=5000)
    assert batch.n_iter.shape == (4,) and bool(batch.converged.all())
    for k, (xk, yk, ak, bk) in enumerate(parts):
        alone = tcfa.sinkhorn(xk, yk, ak, bk, eps=0.5, tol=1e-11, max_iter=5000)
        torch.testing.assert_close(batch.f[xo[k]:xo[k + 1]], alone.f, atol=1e-8, rtol=0)
        torch.testing.assert_close(batch.g[yo[k]:yo[k + 1]], alone.g, atol=1e-8, rtol=0)
        assert int(batch.n_iter[k]) == int(alone.n_iter[0])  # a converged problem stops iterating
        torch.testing.assert_close(batch.plan()[k], alone.plan(), atol=1e-10, rtol=0)


def test_dense_input_equals_ragged_and_online_equals_dense():
    xs, ys = torch.randn(3, 20, 4, dtype=F64), torch.randn(3, 30, 4, dtype=F64)
    dense = tcfa.sinkhorn(xs, ys, eps=0.2, tol=1e-11, mode="dense")
    online = tcfa.sinkhorn(xs, ys, eps=0.2, tol=1e-11, mode="online")
    flat = tcfa.sinkhorn(xs.reshape(60, 4), ys.reshape(90, 4), eps=0.2, tol=1e-11,
                         x_offsets=torch.arange(4) * 20, y_offsets=torch.arange(4) * 30)
    assert dense.f.shape == (3, 20) and dense.g.shape == (3, 30) and flat.f.shape == (60,)
    torch.testing.assert_close(online.f, dense.f, atol=1e-10, rtol=0)
    torch.testing.assert_close(flat.f.reshape(3, 20), dense.f, atol=1e-10, rtol=0)
    assert dense.plan().shape == (3, 20, 30)
    # auto picks online when the costs do not fit the budget; same answer
    auto = tcfa.sinkhorn(xs, ys, eps=0.2, tol=1e-11, memory_budget=100)
    torch.testing.assert_close(auto.f, dense.f, atol=1e-10, rtol=0)


def test_tol_zero_runs_exactly_max_iter_and_converged_problems_stop():
    xs, ys = torch.randn(2, 30, 2, dtype=F64), torch.randn(2, 30, 2, dtype=F64)
    ys[1] *= 2  # a harder problem
    r = tcfa.sinkhorn(xs, ys, eps=0.5, tol=0, max_iter=37)
    assert r.n_iter.tolist() == [37, 37]
    r = tcfa.sinkhorn(xs, ys, eps=0.5, tol=1e-6, max_iter=100000)
    assert bool(r.converged.all()) and int(r.n_iter[0]) != int(r.n_iter[1])
    assert bool((r.error < 1e-6).all())
    # the reported error is the true L1 violation of the returned plan's marginals
    P = r.plan()
    viol = (P.sum(2) - 1 / 30).abs().sum(1) + (P.sum(1) - 1 / 30).abs().sum(1)
    assert bool((viol < 2e-6).all())


def test_single_row_problems_and_many_problems():
    nx = [1 + (k * 7) % 5 for k in range(257)]
    ny = [1 + (k * 3) % 6 for k in range(257)]
    x, y = torch.randn(sum(nx), 2, dtype=F64), torch.randn(sum(ny), 2, dtype=F64)
    xo = torch.tensor([0] + np.cumsum(nx).tolist())
    yo = torch.tensor([0] + np.cumsum(ny).tolist())
    # eps = 1: some of these tiny problems have costs ~30, where eps = 0.3
    # needs > 1e5 iterations (POT's sinkhorn_log too)
    r = tcfa.sinkhorn(x, y, eps=1.0, x_offsets=xo, y_offsets=yo, tol=1e-11, max_iter=20000)
    assert r.n_iter.shape == (257,) and bool(r.converged.all())
    plans = r.plan()
    for k in (0, 1, 100, 256):
        C = ref.cost(x[xo[k]:xo[k + 1]], y[yo[k]:yo[k + 1]], "sqeuclidean")
        want = ref.sinkhorn_plan(torch.full((nx[k],), 1 / nx[k], dtype=F64), torch.full((ny[k],), 1 / ny[k], dtype=F64), C, 1.0)
        torch.testing.assert_close(plans[k], want, atol=1e-9, rtol=0)


def test_zero_weight_rows_get_no_mass():
    x, y, a, b = cloud(20, 25)
    b = b.clone()
    b[3] = 0
    r = solve_tight(x, y, a, b / b.sum(), 0.3)
    assert bool(torch.isfinite(r.f).all())
    assert float(r.plan()[:, 3].abs().max()) == 0.0


def test_half_precision_inputs_solve_in_fp32():
    x, y, _, _ = cloud(30, 40, dtype=torch.float32)
    r = tcfa.sinkhorn(x.half(), y.half(), eps=0.3, tol=1e-5)
    r32 = tcfa.sinkhorn(x.half().float(), y.half().float(), eps=0.3, tol=1e-5)
    assert r.f.dtype == torch.float32
    torch.testing.assert_close(r.f, r32.f)


# ------------------------------------------------------------------ gradients
@pytest.mark.parametrize("kind", ["sqeuclidean", "cosine"])
def test_value_gradients_match_finite_differences(kind):
    x, y, a, b = cloud(9, 11)
    eps = 0.5 if kind == "sqeuclidean" else 0.1
    x, y, a, b = (t.clone().requires_grad_(True) for t in (x, y, a, b))

    def value(x, y, a, b):
        return tcfa.sinkhorn(x, y, a, b, eps=eps, cost=kind, tol=1e-14, max_iter=100000).value().sum()

    value(x, y, a, b).backward()
    h = 1e-6
    for t in (x, y, a, b):
        for idx in [(0,) + (() if t.dim() == 1 else (1,)), (t.shape[0] - 1,) + (() if t.dim() == 1 else (0,))]:
            with torch.no_grad():
                t[idx] += h
                up = value(x, y, a, b)
                t[idx] -= 2 * h
                down = value(x, y, a, b)
                t[idx] += h
            fd = (up - down) / (2 * h)
            # weights are normalised inside, so the fd derivative is the projected gradient
            assert abs(float(t.grad[idx]) - float(fd)) < 1e-6, (t.shape, idx, float(t.grad[idx]), float(fd))


def _pot_entropic_value(x, y, eps):
    """<P, C> + eps KL(P | a b^T) from POT's plan: the value in tcfa's convention."""
    n, m = x.shape[0], y.shape[0]
    M = ot.dist(x.numpy(), y.numpy())
    P = ot.bregman.sinkhorn_log(np.full(n, 1 / n), np.full(m, 1 / m), M, eps, stopThr=1e-13, numItermax=100000)
    return float((P * M).sum() + eps * (P * np.log(P * n * m)).sum())


def test_divergence_matches_pot_values_and_vanishes_on_identical_inputs():
    x, y, _, _ = cloud(30, 25)
    eps = 1.0
    same = tcfa.sinkhorn_divergence(x, x.clone(), eps=eps, tol=1e-12)
    assert abs(float(same)) < 1e-10
    div = tcfa.sinkhorn_divergence(x, y, eps=eps, tol=1e-12, max_iter=20000)
    want = _pot_entropic_value(x, y, eps) - 0.5 * (_pot_entropic_value(x, x, eps) + _pot_entropic_value(y, y, eps))
    assert div.shape == (1,) and want > 0.1
    assert abs(float(div) - want) < 1e-9


# ------------------------------------------------------------------ stability
def test_tiny_eps_with_large_costs_converges_with_scaling():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(300, 2, generator=g) * 70  # costs up to ~1e4
    y = torch.rand(280, 2, generator=g) * 70
    cmax = float(((x[:, None] - y[None]) ** 2).sum(-1).max())
    assert 5e3 < cmax < 1e4
    r = tcfa.sinkhorn(x, y, eps=1e-4 * cmax, tol=1e-3, scaling=0.8, max_iter=20000)
    assert bool(torch.isfinite(r.f).all()) and bool(torch.isfinite(r.g).all())
    assert bool(r.converged.all()), r.error


# ------------------------------------------------------------------ bad input
def _args():
    x, y, a, b = cloud(10, 12)
    return dict(x=x, y=y, a=a, b=b, eps=0.1)


@pytest.mark.parametrize("change, err, match", [
    (dict(x=torch.full((10, 3), float("nan"), dtype=F64)), ValueError, "x must be finite"),
    (dict(y=torch.full((12, 3), float("inf"), dtype=F64)), ValueError, "y must be finite"),
    (dict(y=torch.zeros(12, 4, dtype=F64)), ValueError, "same width"),
    (dict(eps=0.0), ValueError, "eps must be > 0"),
    (dict(eps=-1.0), ValueError, "eps must be > 0"),
    (dict(x_offsets=torch.tensor([0, 6, 4, 10]), y_offsets=torch.tensor([0, 4, 8, 12])), ValueError, "x_offsets must be non-decreasing"),
    (dict(x_offsets=torch.tensor([0, 9])), ValueError, "x_offsets must end at the number of rows"),
    (dict(x_offsets=torch.tensor([0, 5, 10]), y_offsets=torch.tensor([0, 12, 12])), ValueError, "y_offsets describes an empty problem"),
    (dict(a=-torch.ones(10, dtype=F64)), ValueError, "a must be non-negative"),
    (dict(b=torch.zeros(12, dtype=F64)), ValueError, "b is all zero in problem 0"),
    (dict(a=torch.ones(9, dtype=F64)), ValueError, "a must hold one weight per row"),
    (dict(cost="l1"), ValueError, "cost must be one of"),
    (dict(mode="fast"), ValueError, "mode must be one of"),
    (dict(scaling=1.5), ValueError, "scaling must be in"),
    (dict(y=torch.zeros(12, 3, dtype=torch.float32)), TypeError, "y has dtype"),
    (dict(x=torch.zeros(10, 3, dtype=torch.int64)), TypeError, "x must have dtype"),
    (dict(x=torch.zeros(10, 3, dtype=F64, device="meta")), ValueError, "is on meta"),
    (dict(x_offsets=torch.tensor([0, 10], dtype=torch.int32)), TypeError, "x_offsets must be int64"),
])
def test_bad_input_raises_named_error(change, err, match):
    args = _args()
    args.update(change)
    x, y, a, b = args.pop("x"), args.pop("y"), args.pop("a"), args.pop("b")
    with pytest.raises(err, match=match):
        tcfa.sinkhorn(x, y, a, b, **args)


def test_plan_too_large_raises_clear_error():
    x, y, _, _ = cloud(50, 60)
    r = tcfa.sinkhorn(x, y, eps=0.5)
    with pytest.raises(ValueError, match="plan\\(\\) needs"):
        r.plan(memory_budget=1000)


def test_readme_api_example_runs():
    """The README's ten-line example is real code: run it as written."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["out"].shape == (2000, 96)
    assert namespace["rb"].f.shape == (64, 256)


@pytest.mark.parametrize("reach", [None, 0.8, (0.8, 0.5)])  # the last: (x, x), (y, y) solved as general problems
def test_divergence_of_a_ragged_batch_equals_three_solves_per_problem(reach):
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(23, 3, generator=g, dtype=torch.float64), torch.randn(19, 3, generator=g, dtype=torch.float64)
    a, b = torch.rand(23, generator=g, dtype=torch.float64) + 0.1, torch.rand(19, generator=g, dtype=torch.float64) + 0.1
    xo, yo = torch.tensor([0, 10, 23]), torch.tensor([0, 12, 19])
    # the general solve of (x, x) crawls (24,399 iterations to 1e-12 for problem 0); the divergence's
    # symmetric update needs few
    kw = dict(eps=0.7, reach=reach, tol=1e-12, max_iter=50000)
    xg = x.clone().requires_grad_()
    div = tcfa.sinkhorn_divergence(xg, y, a, b, x_offsets=xo, y_offsets=yo, **kw)
    (grad,) = torch.autograd.grad(div.sum(), xg)
    for k in range(2):
        xs, ys = slice(int(xo[k]), int(xo[k + 1])), slice(int(yo[k]), int(yo[k + 1]))
        xk = x[xs].clone().requires_grad_()
        want = (tcfa.sinkhorn(xk, y[ys], a[xs], b[ys], **kw).value()
                - 0.5 * (tcfa.sinkhorn(xk, xk, a[xs], a[xs], **kw).value()
                         + tcfa.sinkhorn(y[ys], y[ys], b[ys], b[ys], **kw).value()))
        if reach is not None:
            want = want + 0.35 * (a[xs].sum() - b[ys].sum()) ** 2
        assert float(div[k]) == pytest.approx(float(want), abs=1e-10)
        torch.testing.assert_close(grad[xs], torch.autograd.grad(want.sum(), xk)[0], atol=1e-9, rtol=0)


@pytest.mark.parametrize("reach", [None, 0.5])
def test_symmetric_problems_dense_and_online_agree_with_the_general_solve(reach):
    g = torch.Generator().manual_seed(3)
    x = torch.rand(70, 2, generator=g, dtype=torch.float64)
    y = torch.rand(40, 2, generator=g, dtype=torch.float64)
    xo = torch.tensor([0, 30, 70])
    yo = torch.tensor([0, 30, 70])  # problem 0 is x[:30] against itself
    kw = dict(eps=0.01, x_offsets=xo, y_offsets=yo, reach=reach, tol=1e-10, max_iter=20000)
    sym = torch.tensor([True, False])
    general = tcfa.sinkhorn(torch.cat([x[:30], x[30:70]]), torch.cat([x[:30], y]), **kw)
    for mode in ("dense", "online"):
        res = tcfa.sinkhorn(torch.cat([x[:30], x[30:70]]), torch.cat([x[:30], y]), symmetric=sym, mode=mode, **kw)
        assert bool(res.converged.all()) and int(res.n_iter[0]) * 5 < int(general.n_iter[0])
        torch.testing.assert_close(res.value(), general.value(), atol=1e-9, rtol=0)
        torch.testing.assert_close(res.f[:30], res.g[:30], atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"symmetric\[1\] is set but problem 1 is not one measure against itself"):
        tcfa.sinkhorn(torch.cat([x[:30], x[30:70]]), torch.cat([x[:30], y]), symmetric=torch.tensor([True, True]), **kw)
    with pytest.raises(ValueError, match=r"symmetric must be a bool tensor of shape \(2,\)"):
        tcfa.sinkhorn(torch.cat([x[:30], x[30:70]]), torch.cat([x[:30], y]), symmetric=[True, False], **kw)
