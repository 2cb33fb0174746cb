"""Triton launchers of the OT ops (kernels/softmin.py, kernels/barycentric.py).

Run by the Triton interpreter on CPU tensors (TRITON_INTERPRET=1, set by
conftest.py before triton is imported). Every launcher is compared with BOTH
the C++ op (torch.ops.tcfa.*) and a naive fp64 reference that builds each
problem's cost matrix explicitly (|x - y|^2 from differences, not the affine
form the kernels use) and calls torch.logsumexp / torch.softmax.

Tolerances are (dtype, atol, rtol), for data scaled so costs are O(1):
* vs the C++ op: same affine algorithm; the differences are summation order
  and exp2 vs the C++ polynomial exp, a few ulp.
* vs the fp64 reference: adds the rounding of the affine form in fp32
  (|x|^2 + |y|^2 - 2 x.y cancels), still a few ulp of the cost scale.
The interpreter's fp32 tl.dot is an exact numpy matmul. On an H100 with the
default input_precision="ieee" expect fp32 within about (1e-5, 1e-5) (ex2.approx
and another summation order); with "tf32" dots about 1e-3 relative.
"""
import pytest
import torch

import tcfa  # noqa: F401  (loads torch.ops.tcfa)
from tcfa import ragged
from tcfa.kernels import barycentric as tb
from tcfa.kernels import softmin as tk

# The interpreter evaluates both branches of tl.where: log2 of a lane whose sum
# is 0 (masked, empty or weightless) warns, and where() then discards it.
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning")

VS_CPP = {torch.float32: (torch.float32, 1e-6, 1e-6), torch.float64: (torch.float64, 1e-14, 1e-14)}
VS_REF = {torch.float32: (torch.float32, 2e-6, 2e-6), torch.float64: (torch.float64, 1e-13, 1e-13)}
# barycentric against either: T_i averages O(1) values with weights exp(score),
# and a score of size |C|/eps (~40 here) carries ~40 ulp of rounding into the
# weights; softmin multiplies its log-sum-exp back by eps, barycentric cannot.
BARYCENTRIC = {torch.float32: (torch.float32, 1e-5, 1e-5), torch.float64: (torch.float64, 1e-13, 1e-13)}
DTYPES = (torch.float32, torch.float64)
COSTS = ("sqeuclidean", "cosine")
EPS = 0.1

# A ragged batch: a 1-row problem, a 1-column problem, primes, and sizes
# above every tile size so several row blocks / column tiles and ragged edges occur.
X_SIZES = (1, 7, 131, 2, 13)
Y_SIZES = (3, 11, 67, 1, 131)
ACTIVE = torch.tensor([True, False, True, True, False])


@pytest.mark.interpreter
def test_sizes_cover_several_tiles():
    big = max(X_SIZES), max(Y_SIZES)
    assert big[0] > max(tk.ROW_BLOCK, tk.DENSE_ROW_BLOCK, tk.DENSE_ROW_TILE)
    assert big[1] > max(tk.COL_BLOCK, tk.DENSE_COL_BLOCK, tk.DENSE_COL_TILE)


# ---------------------------------------------------------------- inputs
def offsets(sizes):
    return torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], dtype=torch.int64)


def points(sizes, d, dtype):
    """Rows with |x|^2 ~ 1, so every cost is O(1) whatever d is."""
    return (torch.randn(sum(sizes), d, dtype=torch.float64) / d**0.5).to(dtype)


def log_weights(n, dtype, zero_every=5):
    """log of positive weights with every `zero_every`-th row weightless (-inf)."""
    w = torch.rand(n, dtype=torch.float64) + 0.1
    w[::zero_every] = 0.0
    return w.log().to(dtype)


def potentials(n, dtype):
    return (0.3 * torch.randn(n, dtype=torch.float64)).to(dtype)


# ---------------------------------------------------------------- naive fp64 reference
def ref_costs(x, y, xo, yo, cost):
    """Each problem's explicit n_k x m_k cost matrix, fp64."""
    blocks = []
    for k in range(len(xo) - 1):
        xs, ys = x[xo[k] : xo[k + 1]].double(), y[yo[k] : yo[k + 1]].double()
        if cost == "sqeuclidean":
            blocks.append(((xs[:, None, :] - ys[None, :, :]) ** 2).sum(-1))
        else:
            blocks.append(1 - (xs / xs.norm(dim=1, keepdim=True)) @ (ys / ys.norm(dim=1, keepdim=True)).T)
    return blocks


def ref_softmin_blocks(blocks, xo, yo, log_w, h, eps, dim, active=None):
    """-eps log sum exp(log w + (h - C)/eps), summed over dim 1 (y rows) or 0 (x rows)."""
    out_off = xo if dim == 1 else yo
    red_off = yo if dim == 1 else xo
    out = torch.zeros(int(out_off[-1]), dtype=torch.float64)
    for k, c in enumerate(blocks):
        if active is not None and not active[k]:
            continue
        w = log_w[red_off[k] : red_off[k + 1]].double()
        hh = h[red_off[k] : red_off[k + 1]].double()
        terms = (w + (hh - c) / eps) if dim == 1 else (w[:, None] + (hh[:, None] - c) / eps)
        out[out_off[k] : out_off[k + 1]] = -eps * torch.logsumexp(terms, dim=dim)
    return out


def ref_barycentric(blocks, xo, yo, g, log_b, values, eps):
    out = torch.zeros(int(xo[-1]), values.shape[1], dtype=torch.float64)
    for k, c in enumerate(blocks):
        j = slice(yo[k], yo[k + 1])
        weights = torch.softmax(log_b[j].double() + (g[j].double() - c) / eps, dim=1)
        out[xo[k] : xo[k + 1]] = weights @ values[j].double()
    return out


def assert_close(actual, expected, tol, equal_nan=False):
    dtype, atol, rtol = tol
    assert actual.dtype == dtype, (actual.dtype, dtype)
    torch.testing.assert_close(actual, expected.to(dtype), atol=atol, rtol=rtol, equal_nan=equal_nan)


# ---------------------------------------------------------------- block table
@pytest.mark.interpreter
def test_block_table_lists_every_block_of_every_active_problem():
    off = torch.tensor([0, 0, 130, 131, 140], dtype=torch.int64)  # an empty problem first
    table = ragged.block_table(off, 64, None, "cpu")
    assert table.tolist() == [[1, 0], [1, 64], [1, 128], [2, 130], [3, 131]]
    active = torch.tensor([True, False, True, True])
    assert ragged.block_table(off, 64, active, "cpu").tolist() == [[2, 130], [3, 131]]


# ---------------------------------------------------------------- softmin
@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cost", COSTS)
@pytest.mark.parametrize("d", [5, 70])  # 70 > MAX_K_BLOCK: two masked BLOCK_K chunks of d
def test_softmin(dtype, cost, d):
    xo, yo = offsets(X_SIZES), offsets(Y_SIZES)
    x, y = points(X_SIZES, d, dtype), points(Y_SIZES, d, dtype)
    h, log_b = potentials(len(y), dtype), log_weights(len(y), dtype)
    out = tk.softmin_forward(x, y, xo, yo, h, log_b, EPS, cost)
    assert_close(out, torch.ops.tcfa.softmin(x, y, xo, yo, h, log_b, EPS, cost), VS_CPP[dtype])
    ref = ref_softmin_blocks(ref_costs(x, y, xo, yo, cost), xo, yo, log_b, h, EPS, dim=1)
    assert_close(out, ref, VS_REF[dtype])


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES)
def test_softmin_active_rows_only(dtype):
    """Rows of inactive problems are returned as exactly 0; active ones as before."""
    xo, yo = offsets(X_SIZES), offsets(Y_SIZES)
    x, y = points(X_SIZES, 5, dtype), points(Y_SIZES, 5, dtype)
    h, log_b = potentials(len(y), dtype), log_weights(len(y), dtype)
    out = tk.softmin_forward(x, y, xo, yo, h, log_b, EPS, "sqeuclidean", ACTIVE)
    assert_close(out, torch.ops.tcfa.softmin(x, y, xo, yo, h, log_b, EPS, "sqeuclidean", ACTIVE), VS_CPP[dtype])
    ref = ref_softmin_blocks(ref_costs(x, y, xo, yo, "sqeuclidean"), xo, yo, log_b, h, EPS, 1, ACTIVE)
    assert_close(out, ref, VS_REF[dtype])
    inactive_rows = (~ACTIVE).repeat_interleave(torch.tensor(X_SIZES))
    assert bool((out[inactive_rows] == 0).all()) and bool((out[~inactive_rows] != 0).all())


@pytest.mark.interpreter
def test_softmin_degenerate_problems_like_the_cpp_op():
    """An empty x side, an empty y side (+inf: empty sum) and an all-zero-weight problem (+inf)."""
    x_sizes, y_sizes = (0, 3, 4, 2), (5, 0, 3, 6)
    xo, yo = offsets(x_sizes), offsets(y_sizes)
    x, y = points(x_sizes, 5, torch.float64), points(y_sizes, 5, torch.float64)
    h, log_b = potentials(len(y), torch.float64), log_weights(len(y), torch.float64)
    log_b[yo[2] : yo[3]] = float("-inf")
    out = tk.softmin_forward(x, y, xo, yo, h, log_b, EPS, "sqeuclidean")
    assert_close(out, torch.ops.tcfa.softmin(x, y, xo, yo, h, log_b, EPS, "sqeuclidean"), VS_CPP[torch.float64])
    ref = ref_softmin_blocks(ref_costs(x, y, xo, yo, "sqeuclidean"), xo, yo, log_b, h, EPS, dim=1)
    assert_close(out, ref, VS_REF[torch.float64])
    assert torch.isinf(out[xo[1] : xo[3]]).all() and torch.isfinite(out[xo[3] :]).all()


# ---------------------------------------------------------------- cost
@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cost", COSTS)
@pytest.mark.parametrize("d", [5, 70])
def test_cost(dtype, cost, d):
    xo, yo = offsets(X_SIZES), offsets(Y_SIZES)
    x, y = points(X_SIZES, d, dtype), points(Y_SIZES, d, dtype)
    out = tk.cost_forward(x, y, xo, yo, cost)
    assert_close(out, torch.ops.tcfa.cost(x, y, xo, yo, cost), VS_CPP[dtype])
    assert_close(out, torch.cat([c.reshape(-1) for c in ref_costs(x, y, xo, yo, cost)]), VS_REF[dtype])


@pytest.mark.interpreter
def test_cost_clamps_rounding_below_zero():
    """Identical points: |x|^2 + |y|^2 - 2 x.y may round below 0 and must be clamped."""
    x = (torch.randn(37, 9) * 10).float()
    off = offsets((37,))
    norms = (x * x).sum(1)
    unclamped = norms[:, None] + norms[None, :] - 2 * (x @ x.T)
    assert bool((unclamped < 0).any())  # the data does exercise the clamp
    out = tk.cost_forward(x, x, off, off, "sqeuclidean").reshape(37, 37)
    assert bool((out >= 0).all())
    # the diagonal is 0 up to a few ulp of |x|^2 + |y|^2 ~ 1800 (ulp 1.2e-4)
    assert_close(out.diagonal(), torch.zeros(37), (torch.float32, 1e-3, 0.0))


# ---------------------------------------------------------------- softmin_dense
@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("active", [None, ACTIVE], ids=["all", "masked"])
def test_softmin_dense(dtype, dim, active):
    xo, yo = offsets(X_SIZES), offsets(Y_SIZES)
    blocks = ref_costs(points(X_SIZES, 5, dtype), points(Y_SIZES, 5, dtype), xo, yo, "sqeuclidean")
    cost = torch.cat([c.reshape(-1) for c in blocks]).to(dtype)
    log_a, log_b = log_weights(int(xo[-1]), dtype, zero_every=3), log_weights(int(yo[-1]), dtype)
    h = potentials(int((yo if dim == 1 else xo)[-1]), dtype)
    out = tk.softmin_dense_forward(cost, xo, yo, log_a, log_b, h, EPS, dim, active)
    assert_close(out, torch.ops.tcfa.softmin_dense(cost, xo, yo, log_a, log_b, h, EPS, dim, active), VS_CPP[dtype])
    stored = [c.to(dtype) for c in blocks]  # the reference reads the same (rounded) stored cost
    ref = ref_softmin_blocks(stored, xo, yo, log_b if dim == 1 else log_a, h, EPS, dim, active)
    assert_close(out, ref, VS_REF[dtype])


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tol", [0.0, 1e-3])
@pytest.mark.parametrize("taus", [(1.0, 1.0), (0.6, 0.85)], ids=["balanced", "unbalanced"])
@pytest.mark.parametrize("schedule, omega", [((), 1.0), ((8.0, 4.0, 2.0), 1.6)], ids=["plain", "annealed-relaxed"])
@pytest.mark.filterwarnings("ignore:invalid value encountered in subtract:RuntimeWarning")  # problem 0, below
def test_sinkhorn_dense(dtype, tol, taus, schedule, omega):
    xo, yo = offsets(X_SIZES), offsets(Y_SIZES)
    blocks = ref_costs(points(X_SIZES, 5, dtype), points(Y_SIZES, 5, dtype), xo, yo, "sqeuclidean")
    cost = torch.cat([c.reshape(-1) for c in blocks]).to(dtype)
    log_a, log_b = log_weights(int(xo[-1]), dtype, zero_every=3), log_weights(int(yo[-1]), dtype)
    f, g = torch.zeros(int(xo[-1]), dtype=dtype), torch.zeros(int(yo[-1]), dtype=dtype)
    args = (cost, xo, yo, log_a, log_b, f, g, 1.0, 8 + len(schedule), tol, *taus, list(schedule), omega)
    out = tk.sinkhorn_dense_forward(*args)
    want = torch.ops.tcfa.sinkhorn_dense(*args)
    torch.testing.assert_close(out[2], want[2])  # n_iter: the same stopping iteration per problem
    # potentials after 8 iterations carry the half-step tolerance of each iteration;
    # problem 0's only x row is weightless (no mass): its error is 0/0 = NaN in both
    for a, b in zip((out[0], out[1]), (want[0], want[1])):
        assert_close(a, b, VS_REF[dtype], equal_nan=True)
    # the error is a residual f - f_T of potentials up to ~50 here: the launcher forms it in fp32
    # (ulp(50) = 4e-6), the C++ loop in fp64 from the same fp32 potentials
    err_tol = (dtype, 1e-5, 1e-5) if dtype == torch.float32 else VS_REF[dtype]
    assert_close(out[3], want[3], err_tol, equal_nan=True)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("taus", [(1.0, 1.0), (0.7, 0.7)], ids=["balanced", "unbalanced"])
def test_sinkhorn_dense_symmetric_problems(dtype, taus):
    # problems 1 and 3 are one point set against itself (averaged updates at eps); 0 and 2 general
    # and annealed, in the same call; each stops at its own tolerance
    sizes = [7, 12, 9, 20]
    xo = offsets(sizes)
    yo = offsets([n + (k % 2 == 0) for k, n in enumerate(sizes)])
    x, y = points(sizes, 3, dtype), points([int(yo[k + 1] - yo[k]) for k in range(4)], 3, dtype)
    log_a, log_b = log_weights(int(xo[-1]), dtype), log_weights(int(yo[-1]), dtype)
    for k in (1, 3):
        y[yo[k]:yo[k + 1]], log_b[yo[k]:yo[k + 1]] = x[xo[k]:xo[k + 1]], log_a[xo[k]:xo[k + 1]]
    cost = torch.cat([c.reshape(-1) for c in ref_costs(x, y, xo, yo, "sqeuclidean")]).to(dtype)
    f, g = torch.zeros(int(xo[-1]), dtype=dtype), torch.zeros(int(yo[-1]), dtype=dtype)
    sym = torch.tensor([False, True, False, True])
    args = (cost, xo, yo, log_a, log_b, f, g, 0.5, 20, 1e-4, *taus, [4.0, 2.0], 1.0, sym)
    out = tk.sinkhorn_dense_forward(*args)
    want = torch.ops.tcfa.sinkhorn_dense(*args)
    torch.testing.assert_close(out[2], want[2])
    for i in (0, 1, 3):
        assert_close(out[i], want[i], VS_REF[dtype])
    with pytest.raises(ValueError, match="symmetric problem 0 must be square"):
        tk.sinkhorn_dense_forward(*args[:-1], torch.tensor([True, False, False, False]))


@pytest.mark.interpreter
@pytest.mark.parametrize("dim", [0, 1])
def test_softmin_dense_empty_side_is_an_empty_sum(dim):
    """A problem with no rows on the reduced side gives +inf (-eps log 0), in both directions.

    Checked against the reference only: the C++ op returns +inf for dim=1 but 0
    for dim=0 when n_k = 0 (its column sweep skips problems without rows).
    """
    xo, yo = offsets((3, 0, 4)), offsets((0, 5, 2))
    cost = torch.rand(int(((xo[1:] - xo[:-1]) * (yo[1:] - yo[:-1])).sum()), dtype=torch.float64)
    log_a, log_b = log_weights(7, torch.float64), log_weights(7, torch.float64)
    h = potentials(7, torch.float64)
    out = tk.softmin_dense_forward(cost, xo, yo, log_a, log_b, h, EPS, dim)
    blocks, start = [], 0
    for n, m in zip((3, 0, 4), (0, 5, 2)):
        blocks.append(cost[start : start + n * m].reshape(n, m))
        start += n * m
    ref = ref_softmin_blocks(blocks, xo, yo, log_b if dim == 1 else log_a, h, EPS, dim)
    assert_close(out, ref, VS_REF[torch.float64])
    assert torch.isinf(out).sum() == (3 if dim == 1 else 5)


# ---------------------------------------------------------------- barycentric
@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cost", COSTS)
@pytest.mark.parametrize("dv", [1, 7, 131])  # 131 > MAX_DV_BLOCK: two chunks on the second grid axis
def test_barycentric(dtype, cost, dv):
    xo, yo = offsets(X_SIZES), offsets(Y_SIZES)
    x, y = points(X_SIZES, 5, dtype), points(Y_SIZES, 5, dtype)
    g, log_b = potentials(len(y), dtype), log_weights(len(y), dtype)
    log_b[yo[3]] = 0.0  # the 1-row y problem must keep its only weight
    values = torch.randn(len(y), dv, dtype=torch.float64).to(dtype)
    out = tb.barycentric_forward(x, y, xo, yo, g, log_b, values, EPS, cost)
    assert_close(out, torch.ops.tcfa.barycentric(x, y, xo, yo, g, log_b, values, EPS, cost), BARYCENTRIC[dtype])
    ref = ref_barycentric(ref_costs(x, y, xo, yo, cost), xo, yo, g, log_b, values, EPS)
    assert_close(out, ref, BARYCENTRIC[dtype])


@pytest.mark.interpreter
@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")  # the 0/0 under test
def test_barycentric_weightless_problem_like_the_cpp_op():
    """All-zero weights in a problem with x rows: 0/0, refused by name by both backends."""
    xo, yo = offsets((3, 4)), offsets((5, 2))
    x, y = points((3, 4), 5, torch.float64), points((5, 2), 5, torch.float64)
    g, log_b = potentials(7, torch.float64), log_weights(7, torch.float64)
    log_b[5:] = float("-inf")
    values = torch.randn(7, 3, dtype=torch.float64)
    message = "log_b: problem 1 has x rows but no y row of positive weight"
    with pytest.raises(ValueError, match=message):
        tb.barycentric_forward(x, y, xo, yo, g, log_b, values, EPS, "sqeuclidean")
    with pytest.raises(ValueError, match=message):
        torch.ops.tcfa.barycentric(x, y, xo, yo, g, log_b, values, EPS, "sqeuclidean")


# ---------------------------------------------------------------- fp16 / bf16 inputs
@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_computed_in_fp32(dtype):
    """Output dtypes follow the C++ op: softmin -> x's dtype, cost -> fp32, softmin_dense -> h's dtype.

    Both backends compute in fp32 and round once to `dtype`, so half outputs
    agree to one ulp of `dtype` (two fp32 results a few fp32 ulp apart can
    round to neighbouring half values).
    """
    one_ulp = (dtype, torch.finfo(dtype).eps, torch.finfo(dtype).eps)
    xo, yo = offsets(X_SIZES), offsets(Y_SIZES)
    x, y = points(X_SIZES, 5, dtype), points(Y_SIZES, 5, dtype)
    h, log_b = potentials(len(y), dtype), log_weights(len(y), dtype)
    out = tk.softmin_forward(x, y, xo, yo, h, log_b, EPS, "cosine")
    assert_close(out, torch.ops.tcfa.softmin(x, y, xo, yo, h, log_b, EPS, "cosine"), one_ulp)
    cost = tk.cost_forward(x, y, xo, yo, "sqeuclidean")
    assert_close(cost, torch.ops.tcfa.cost(x, y, xo, yo, "sqeuclidean"), VS_CPP[torch.float32])
    log_a = torch.zeros(len(x), dtype=dtype)
    dense = tk.softmin_dense_forward(cost.to(dtype), xo, yo, log_a, log_b, h, EPS, 1)
    assert_close(dense, torch.ops.tcfa.softmin_dense(cost.to(dtype), xo, yo, log_a, log_b, h, EPS, 1), one_ulp)


# ---------------------------------------------------------------- bounds checks
@pytest.mark.interpreter
def test_launchers_reject_out_of_bounds_input_naming_the_argument():
    x, y = torch.randn(5, 3), torch.randn(4, 3)
    h = torch.zeros(4)
    good = torch.tensor([0, 2, 5])
    yo = torch.tensor([0, 1, 4])
    cases = [
        (ValueError, "x_offsets must end", dict(x_offsets=torch.tensor([0, 2, 6]))),
        (ValueError, "x_offsets must start", dict(x_offsets=torch.tensor([1, 2, 5]))),
        (ValueError, "y_offsets must be non-decreasing", dict(y_offsets=torch.tensor([0, 3, 1, 4]))),
        (TypeError, "x_offsets must be int64", dict(x_offsets=good.int())),
        (ValueError, "same number of problems", dict(y_offsets=torch.tensor([0, 4]))),
        (ValueError, "same width", dict(y=torch.randn(4, 2))),
        (ValueError, "h must have shape", dict(h=torch.zeros(3))),
        (ValueError, "active must have shape", dict(active=torch.tensor([True]))),
        (ValueError, "eps must be > 0", dict(eps=0.0)),
        (ValueError, "cost must be", dict(cost="l1")),
    ]
    for error, message, change in cases:
        args = dict(x=x, y=y, x_offsets=good, y_offsets=yo, h=h, log_b=h, eps=1.0, cost="sqeuclidean", active=None)
        args.update(change)
        with pytest.raises(error, match=message):
            tk.softmin_forward(**args)
    with pytest.raises(ValueError, match="cost must hold"):
        tk.softmin_dense_forward(torch.zeros(9), good, yo, torch.zeros(5), h, h, 1.0, 1)
    with pytest.raises(ValueError, match="values must be 2-D"):
        tb.barycentric_forward(x, y, good, yo, h, h, torch.zeros(3, 2), 1.0)
