"""torch.ops.tcfa.sinkhorn_dense (whole loops on stored costs) against the naive loop."""
import pytest
import torch

import reference as ref
from tcfa import ops

# parity with the reference at every compiled CPU level (conftest.cpu_level)
pytestmark = pytest.mark.usefixtures("cpu_level")

# fp32: the one-exp path sums shifted terms in fp32; f and g drift from the
# fp64 reference by rounding accumulated over the iterations.
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (5e-4, 1e-4)}


def offsets(sizes):
    return torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], dtype=torch.int64)


def problem(nx, ny, dtype, d=4, scale=1.0, zero_weights=True, seed=0):
    """Cost, offsets, log weights (normalised per problem, some zero) and zero potentials."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(nx), d, generator=gen, dtype=torch.float64) * scale
    y = torch.randn(sum(ny), d, generator=gen, dtype=torch.float64) * scale + 0.5
    xo, yo = offsets(nx), offsets(ny)
    C = ref.cost_flat(x, y, xo, yo)

    def log_weights(sizes, off):
        w = torch.rand(sum(sizes), generator=gen, dtype=torch.float64) + 0.1
        if zero_weights:
            w[off[:-1][torch.tensor(sizes) > 2] + 1] = 0  # a zero-weight row in every problem with > 2 rows
        mass = torch.zeros(len(sizes), dtype=torch.float64).index_add_(0, torch.repeat_interleave(torch.tensor(sizes)), w)
        return (w / mass[torch.repeat_interleave(torch.tensor(sizes))]).log()

    la, lb = log_weights(nx, xo), log_weights(ny, yo)

    def cast(t):
        return t.to(dtype)

    return cast(C), xo, yo, cast(la), cast(lb), torch.zeros(sum(nx), dtype=dtype), torch.zeros(sum(ny), dtype=dtype)


def check(args, eps, max_iter, tol, dtype, taus=(1.0, 1.0), schedule=(), omega=1.0):
    C, xo, yo, la, lb, f, g = args
    got = ops.sinkhorn_dense(C, xo, yo, la, lb, f, g, eps, max_iter, tol, *taus, schedule, omega)
    want = ref.sinkhorn_loop(*(t.double() if t.is_floating_point() else t for t in args), eps, max_iter, tol, *taus,
                             schedule, omega)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got[2], want[2])  # n_iter
    for a, b in zip((got[0], got[1], got[3]), (want[0], want[1], want[3])):
        torch.testing.assert_close(a.double(), b, atol=atol, rtol=rtol)


SHAPES = {  # which path of the kernel each batch takes
    "resident": ([1, 19, 17, 7, 257], [17, 1, 35, 11, 131]),  # small problems: whole loops per task
    "lockstep": ([600], [500]),  # one problem above the 512 KB resident size: row chunks on all threads
    "mixed": ([300, 5, 2, 9], [301, 3, 8, 13]),  # fp64: one big problem in lockstep beside resident ones
    "alone": ([30], [41]),  # fewer small problems than threads: lockstep too
}


@pytest.mark.parametrize("taus", [(1.0, 1.0), (0.6, 0.85), (1.0, 0.7)], ids=["balanced", "unbalanced", "semi"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_matches_naive_loop(dtype, shape, taus):
    nx, ny = SHAPES[shape]
    args = problem(nx, ny, dtype)
    check(args, eps=0.5, max_iter=25, tol=0.0, dtype=dtype, taus=taus)


@pytest.mark.parametrize("taus", [(1.0, 1.0), (0.6, 0.85)], ids=["balanced", "unbalanced"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_annealing_and_over_relaxation_match_naive_loop(dtype, shape, taus):
    # the stages run in the same call (each g-update at the previous stage's eps), then
    # over-relaxed target iterations with the per-problem fallback
    nx, ny = SHAPES[shape]
    args = problem(nx, ny, dtype, seed=4)
    check(args, eps=0.2, max_iter=30, tol=0.0, dtype=dtype, taus=taus, schedule=(6.4, 1.6, 0.4), omega=1.6)


def symmetric_problem(sizes, flags, dtype, seed=5):
    """Problems whose flagged members are one point set (and weights) against itself; others general."""
    C, xo, yo, la, lb, f, g = problem(sizes, [n + 3 * (not s) for n, s in zip(sizes, flags)], torch.float64,
                                      seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(int(xo[-1]), 3, generator=gen, dtype=torch.float64)
    y = torch.randn(int(yo[-1]), 3, generator=gen, dtype=torch.float64)
    for k, s in enumerate(flags):
        if s:
            y[yo[k]:yo[k + 1]] = x[xo[k]:xo[k + 1]]
            lb[yo[k]:yo[k + 1]] = la[xo[k]:xo[k + 1]]
    C = ref.cost_flat(x, y, xo, yo)
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in (C, xo, yo, la, lb, f, g))


@pytest.mark.parametrize("taus", [(1.0, 1.0), (0.7, 0.7)], ids=["balanced", "unbalanced"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("sizes, flags", [([19, 7, 257, 1], [True, False, True, True]),  # resident
                                          ([600, 30], [True, False]),  # lockstep beside a resident one
                                          ([600], [True])])  # lockstep alone
def test_symmetric_problems_match_naive_loop(dtype, sizes, flags, taus):
    # averaged one-potential updates at eps for the flagged problems (schedule and omega are the
    # general problems'), in the same call as the general ones; each stops at its own tolerance
    args = symmetric_problem(sizes, flags, dtype)
    sym = torch.tensor(flags)
    C, xo, yo, la, lb, f, g = args
    for max_iter, tol in ((9, 0.0), (400, 1e-6 if dtype == torch.float64 else 1e-4)):
        kw = dict(schedule=(6.4, 1.6), omega=1.5)
        got = ops.sinkhorn_dense(*args, 0.3, max_iter, tol, *taus, **kw, symmetric=sym)
        want = ref.sinkhorn_loop(*(t.double() if t.is_floating_point() else t for t in args), 0.3, max_iter, tol,
                                 *taus, **kw, symmetric=sym)
        atol, rtol = TOL[dtype]
        torch.testing.assert_close(got[2], want[2])
        for a, b in zip((got[0], got[1], got[3]), (want[0], want[1], want[3])):
            torch.testing.assert_close(a.double(), b, atol=atol, rtol=rtol)
    for k, s in enumerate(flags):  # g is f on the symmetric problems
        if s:
            torch.testing.assert_close(got[1][yo[k]:yo[k + 1]], got[0][xo[k]:xo[k + 1]], atol=0, rtol=0)


def test_symmetric_update_reaches_the_general_solution_in_far_fewer_iterations():
    # one point set against itself at a small eps: plain Sinkhorn crawls (its potentials drift along
    # a nearly flat direction), the averaged symmetric update converges in tens of iterations
    C, xo, yo, la, lb, f, g = args = symmetric_problem([400], [True], torch.float64, seed=9)
    fast = ops.sinkhorn_dense(*args, 0.05, 5000, 1e-9, symmetric=torch.tensor([True]))
    slow = ops.sinkhorn_dense(*args, 0.05, 20000, 1e-9)
    assert int(fast[2]) * 100 < int(slow[2])
    value = [float((la.exp() * r[0]).sum() + (lb.exp() * r[1]).sum()) for r in (fast, slow)]
    assert abs(value[0] - value[1]) < 1e-7 * abs(value[1])


@pytest.mark.parametrize("shape", ["resident", "lockstep"])
def test_over_relaxed_problems_stop_at_their_tolerance_in_fewer_iterations(shape):
    nx, ny = SHAPES[shape]
    args = problem(nx, ny, torch.float64, seed=5)
    plain = ops.sinkhorn_dense(*args, 0.3, 3000, 1e-10)
    fast = ops.sinkhorn_dense(*args, 0.3, 3000, 1e-10, omega=1.5)
    assert (fast[3] < 1e-10).all() and (plain[3] < 1e-10).all()
    assert fast[2].sum() < plain[2].sum()
    check(args, eps=0.3, max_iter=3000, tol=1e-8, dtype=torch.float64, omega=1.5)  # n_iter: away from rounding
    # the error is the L1 marginal violation of the plan (f^{t-1}, g^t): with both
    # updates over-relaxed it counts the columns too; the solutions agree up to
    # the constant (f + c, g - c) that leaves every balanced plan unchanged
    assert_same_plans(args, fast, plain, atol=1e-6)


def assert_same_plans(args, got, want, atol):
    """Potentials equal up to the constant (f + c, g - c) of each problem (same balanced plan)."""
    xo, yo = args[1], args[2]
    for k in range(len(xo) - 1):
        fx, fy = slice(xo[k], xo[k + 1]), slice(yo[k], yo[k + 1])
        shift = (want[0][fx] - got[0][fx]).mean()
        torch.testing.assert_close(got[0][fx] + shift, want[0][fx], atol=atol, rtol=0)
        torch.testing.assert_close(got[1][fy] - shift, want[1][fy], atol=atol, rtol=0)


def test_too_much_over_relaxation_falls_back():
    # omega close to 2 overshoots: the guard takes the plain update wherever the relaxed one
    # would lower the dual objective, and the solve still converges
    args = problem([40, 7], [35, 9], torch.float64, seed=6)
    # (near omega = 2 most relaxed steps sit close to the guard's boundary, where rounding
    # picks a side: the trajectory is compared through its limit, not step by step)
    out = ops.sinkhorn_dense(*args, 0.1, 3000, 1e-11, omega=1.99)
    plain = ops.sinkhorn_dense(*args, 0.1, 3000, 1e-11)
    assert (out[3] < 1e-11).all() and (plain[3] < 1e-11).all()
    assert_same_plans(args, out, plain, atol=1e-7)


def test_a_schedule_longer_than_max_iter_stops_inside_it():
    args = problem([9, 4], [6, 8], torch.float64, seed=7)
    out = ops.sinkhorn_dense(*args, 0.5, 2, 1e-3, schedule=[8.0, 4.0, 2.0])
    assert out[2].tolist() == [2, 2]  # no stopping test before the target eps
    check(args, eps=0.5, max_iter=2, tol=1e-3, dtype=torch.float64, schedule=(8.0, 4.0, 2.0))


@pytest.mark.parametrize("shape", list(SHAPES))
def test_each_problem_stops_at_its_tolerance(shape):
    nx, ny = SHAPES[shape]
    args = problem(nx, ny, torch.float64, seed=1)
    _, _, n_iter, error = ops.sinkhorn_dense(*args, 0.5, 500, 1e-6)
    assert (error < 1e-6).all() and n_iter.max() < 500
    assert len(nx) == 1 or n_iter.min() < n_iter.max()  # problems stop at different iterations
    check(args, eps=0.5, max_iter=500, tol=1e-6, dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("taus", [(1.0, 1.0), (0.9, 0.95)], ids=["balanced", "unbalanced"])
def test_tiny_eps_and_huge_costs_take_the_exact_fallback(dtype, taus):
    # costs up to ~1e4, eps 1e-4 of the mean cost, from zero potentials: the
    # shifted exponents under- and overflow in the first iterations, so rows
    # and columns must fall back to the online max and still agree.
    args = problem([40, 33], [50, 29], dtype, scale=30.0, zero_weights=False, seed=2)
    eps = 1e-4 * float(args[0].double().mean())
    C, xo, yo, la, lb, f, g = args
    got = ops.sinkhorn_dense(*args, eps, 30, 0.0, *taus)
    assert all(torch.isfinite(t).all() for t in got)
    want = ref.sinkhorn_loop(*(t.double() if t.is_floating_point() else t for t in args), eps, 30, 0.0, *taus)
    # potentials are ~1e3-1e4 here: compare relative to that scale in fp32
    atol = 1e-8 if dtype == torch.float64 else 1e-5 * float(C.double().max())
    torch.testing.assert_close(got[0].double(), want[0], atol=atol, rtol=0)
    torch.testing.assert_close(got[1].double(), want[1], atol=atol, rtol=0)


def test_warm_start_g_only_shifts():
    # g enters only as the shift of the first g-update: any g gives the same result
    args = problem([30, 12], [25, 40], torch.float64, seed=3)
    C, xo, yo, la, lb, f, g = args
    base = ops.sinkhorn_dense(*args, 0.3, 10, 0.0)
    shifted = ops.sinkhorn_dense(C, xo, yo, la, lb, f, torch.randn_like(g) * 50, 0.3, 10, 0.0)
    for a, b in zip(base, shifted):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_opcheck():
    args = problem([5, 9], [7, 4], torch.float64)
    torch.library.opcheck(torch.ops.tcfa.sinkhorn_dense.default, (*args, 0.5, 5, 1e-3))
    torch.library.opcheck(torch.ops.tcfa.sinkhorn_dense.default, (*args, 0.5, 5, 1e-3, 0.7, 0.8))
    torch.library.opcheck(torch.ops.tcfa.sinkhorn_dense.default, (*args, 0.5, 5, 1e-3, 0.7, 0.8, [2.0, 1.0], 1.5))
    sym = symmetric_problem([5, 6], [False, True], torch.float64)
    torch.library.opcheck(torch.ops.tcfa.sinkhorn_dense.default,
                          (*sym, 0.5, 5, 1e-3, 0.7, 0.7, [2.0], 1.5, torch.tensor([False, True])))


@pytest.mark.parametrize("bad, match", [
    (dict(max_iter=0), "max_iter must be >= 1"),
    (dict(tol=-1.0), "tol must be >= 0"),
    (dict(eps=0.0), "eps must be > 0"),
    (dict(f=torch.zeros(3, dtype=torch.float64)), "f must have shape"),
    (dict(g=torch.zeros(3, dtype=torch.float64)), "g must have shape"),
    (dict(cost=torch.zeros(5, dtype=torch.float64)), "cost must hold"),
    (dict(tau_a=1.5), "tau_a and tau_b must lie in"),
    (dict(omega=2.0), "omega must lie in"),
    (dict(schedule=[1.0, -1.0]), "eps must be > 0"),
])
def test_direct_calls_are_bounds_checked(bad, match):
    C, xo, yo, la, lb, f, g = problem([5, 9], [7, 4], torch.float64)
    args = dict(cost=C, x_offsets=xo, y_offsets=yo, log_a=la, log_b=lb, f=f, g=g, eps=0.5, max_iter=5, tol=0.0)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        ops.sinkhorn_dense(**args)


@pytest.mark.parametrize("change, match", [
    (dict(symmetric=torch.tensor([True, True])), "symmetric problem 0 must be square"),
    (dict(symmetric=torch.tensor([False, True]), tau_a=0.5), "symmetric problems need tau_a == tau_b"),
    (dict(symmetric=torch.tensor([1, 0])), "symmetric must be bool"),
    (dict(symmetric=torch.tensor([True])), r"symmetric must have shape \(2,\)"),
])
def test_bad_symmetric_flags_are_named(change, match):
    C, xo, yo, la, lb, f, g = symmetric_problem([5, 6], [False, True], torch.float64)
    args = dict(cost=C, x_offsets=xo, y_offsets=yo, log_a=la, log_b=lb, f=f, g=g, eps=0.5, max_iter=5, tol=0.0)
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=match):
        ops.sinkhorn_dense(**args)
    lb_other = lb.clone()
    lb_other[-1] -= 0.1
    with pytest.raises(ValueError, match="symmetric problem 1 must have log_a equal to log_b"):
        ops.sinkhorn_dense(C, xo, yo, la, lb_other, f, g, 0.5, 5, 0.0, symmetric=torch.tensor([False, True]))
