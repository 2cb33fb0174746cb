"""Entropic optimal transport on ragged batches: Sinkhorn and the barycentric map.

The gradient of the OT value is in tcfa/ot_grad.py; the divergence and entropic GW,
built on this solver, in tcfa/divergence.py.

Conventions (docs/architecture.md). Problem k transports the weighted rows of x
in it onto those of y. Weights are normalised to mass 1 per problem (unbalanced OT,
``reach``, keeps them as given: tcfa/ot_unbalanced.py). The plan is

    P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps),

the entropic OT value is the dual value  sum_i a_i f_i + sum_j b_j g_j  (GeomLoss /
OTT convention; POT's log-scalings are log_u_i = f_i/eps + log a_i), and the
solver alternates the log-domain updates

    g_j <- softmin_i(log a_i + (f_i - C_ij)/eps),   f_i <- softmin_j(log b_j + (g_j - C_ij)/eps)

with torch.ops.tcfa.softmin (cost on the fly) or softmin_dense (stored cost).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from . import distributed, ops
from .ot_checks import DEFAULT_OMEGA, budget as _budget, check_fits, check_inputs, check_options, check_symmetric
from .ot_grad import OTValue
from .ops.relaxation import TiedRows, relaxed_update
from .ot_unbalanced import check_reach, relax
from .ragged import Ragged, flat_rows
from .ops import _validate

@dataclass
class _Problem:
    """Validated, centred, flattened inputs of a batch of OT problems (no autograd)."""

    x: Ragged
    y: Ragged
    a: torch.Tensor  # (Nx,) normalised per problem
    b: torch.Tensor  # (Ny,)
    cost: str
    eps: float
    comm: distributed.LocalComm | distributed.ShardedComm = distributed.LOCAL  # x may be a shard
    reach: tuple | None = None  # (rho_a, rho_b) of unbalanced OT (tcfa/ot_unbalanced.py), None: balanced
    x_index: torch.Tensor = field(init=False)  # (Nx,) problem id per row
    y_index: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.x_index = self.x.problem_index()
        self.y_index = self.y.problem_index()
        self.log_a = self.a.log()
        self.log_b = self.b.log()

    @property
    def num_problems(self) -> int:
        return self.x.num_problems

    def segment_sum(self, values: torch.Tensor, side: str) -> torch.Tensor:
        """Per-problem sum of per-row values; over every rank's rows for side "x"."""
        index = self.x_index if side == "x" else self.y_index
        out = torch.zeros(self.num_problems, dtype=values.dtype, device=values.device)
        out.index_add_(0, index, values)
        return self.comm.sum(out) if side == "x" else out

    def cost_bytes(self) -> int:
        n = (self.x.sizes * self.y.sizes).sum().item()
        return int(n) * torch.finfo(self.x.rows.dtype).bits // 8

    def working_bytes(self) -> int:
        """What any mode holds besides stored costs: the kernels' copies of the rows, weights,
        potentials and per-row terms, (N + M) (d + 8) values (an upper estimate)."""
        rows = self.x.rows.shape[0] + self.y.rows.shape[0]
        return rows * (self.x.rows.shape[1] + 8) * torch.finfo(self.x.rows.dtype).bits // 8


def _prepare(x, y, a, b, eps, cost, x_offsets, y_offsets, comm=distributed.LOCAL, reach=None):
    """Validates once; returns the problem plus the normalised weights (keeping autograd).

    With a sharded comm, x is this rank's shard: the weight mass and the
    centring mean are taken over every rank's rows.
    """
    # every rank finishes its local checks before the first collective
    eps, cost, rx, ry, a_n, b_n = comm.agree(check_inputs, x, y, a, b, eps, cost, x_offsets, y_offsets, comm,
                                             reach is None)
    a_n = comm.normalise_x("a", a_n, rx)
    ct = _validate.compute_dtype(rx.rows.dtype)
    xr, yr = rx.rows.detach().to(ct), ry.rows.detach().to(ct)
    if cost == "sqeuclidean":
        xr, yr = _centred(xr, yr, rx, ry, comm)
    px = Ragged(xr.contiguous(), rx.offsets, rx.batch_shape)
    py = Ragged(yr.contiguous(), ry.offsets, ry.batch_shape)
    prob = _Problem(px, py, a_n.detach().to(ct), b_n.detach().to(ct), cost, eps, comm, reach)
    return prob, a_n, b_n


def _centred(xr, yr, rx, ry, comm):
    """x and y rows shifted by their problem's x mean, when that helps.

    |x - y|^2 is translation invariant, and the affine form
    |x|^2 + |y|^2 - 2 x.y the kernels use rounds in proportion to
    S = sum |x|^2 + sum |y|^2: centring keeps it accurate for data far from
    the origin. It costs a gather and a copy of x and y (~20% of a CPU solve of
    64 problems of 256 x 256 rows, d 256), so it is done only when it at least
    halves S (one bit or more); S and the centred S_c come from the sums.
    """
    B, ct = rx.num_problems, xr.dtype
    idx_x, idx_y = rx.problem_index(), ry.problem_index()
    zeros = lambda: torch.zeros(B, xr.shape[1], dtype=ct, device=xr.device)  # noqa: E731
    n = comm.sum(rx.sizes.to(ct))
    mean = comm.sum(zeros().index_add_(0, idx_x, xr)) / n.unsqueeze(1)
    ysum = zeros().index_add_(0, idx_y, yr)
    S = comm.sum(_sq_norm(xr)) + _sq_norm(yr)
    # sum |x - mu|^2 = sum |x|^2 - n |mu|^2;  sum |y - mu|^2 = sum |y|^2 - 2 mu.Y + m |mu|^2
    mu2 = (mean * mean).sum(1)
    S_c = S - (n * mu2).sum() - 2 * (mean * ysum).sum() + (ry.sizes.to(ct) * mu2).sum()
    if not bool(S_c < 0.5 * S):
        return xr, yr
    return xr - mean[idx_x], yr - mean[idx_y]


def _sq_norm(t: torch.Tensor) -> torch.Tensor:
    """Sum of squares of every entry: a BLAS dot, 3x faster than vector_norm(t) ** 2 (4M floats)."""
    flat = t.reshape(-1)
    return torch.dot(flat, flat)


def _eps_schedule(prob: _Problem, scaling) -> list[float]:
    """eps values of the annealing phase (GeomLoss-style), before the target eps (scaling checked)."""
    if scaling is None:
        return []
    if prob.cost == "cosine":
        top = 2.0  # the largest possible cosine cost
    else:
        both = torch.cat([prob.x.rows, prob.y.rows])  # never empty: y is whole on every rank
        hi, lo = prob.comm.max(both.amax(0)), -prob.comm.max(-both.amin(0))
        top = float(((hi - lo) ** 2).sum())  # squared diameter
    return annealing(top, prob.eps, scaling)


def annealing(top: float, eps: float, scaling: float) -> list[float]:
    """top, top * scaling, ... while above eps: the eps values run before the target eps."""
    if top <= eps:
        return []
    steps = int(math.ceil(math.log(eps / top) / math.log(scaling)))
    return [top * scaling**k for k in range(steps)]


class _HalfSteps:
    """The two soft-min updates, on a stored cost (dense) or with the cost on the fly (online)."""

    def __init__(self, prob: _Problem, dense: bool):
        self.p = prob
        self.cost = ops.cost_matrix(prob.x.rows, prob.y.rows, prob.x.offsets, prob.y.offsets, prob.cost) if dense else None
        # A stored cost runs whole loops per call (ops.sinkhorn_dense; on the
        # CPU one exp per entry per iteration instead of two, small problems
        # from cache). A sharded x needs a merge between half-steps, so it cannot.
        self.fused = dense and prob.comm is distributed.LOCAL

    def loop(self, f, g, max_iter, tol, schedule, omega, symmetric=None):
        """The whole solve in one call (fused steps only): f, g, n_iter, error."""
        p = self.p
        return ops.sinkhorn_dense(self.cost, p.x.offsets, p.y.offsets, p.log_a, p.log_b, f, g, p.eps, max_iter, tol,
                                  relax(p.reach, "x", p.eps), relax(p.reach, "y", p.eps), schedule, omega, symmetric)

    def g_update(self, f, eps, active):
        """Reduces over x rows: with x sharded, each rank's partial soft-min is merged."""
        p = self.p
        if self.cost is not None:
            out = ops.softmin_dense(self.cost, p.x.offsets, p.y.offsets, p.log_a, p.log_b, f, eps, 0, active)
        else:
            out = ops.softmin(p.y.rows, p.x.rows, p.y.offsets, p.x.offsets, f, p.log_a, eps, p.cost, active)
        return p.comm.merge_softmin(out, eps)

    def f_update(self, g, eps, active):
        p = self.p
        if self.cost is not None:
            return ops.softmin_dense(self.cost, p.x.offsets, p.y.offsets, p.log_a, p.log_b, g, eps, 1, active)
        return ops.softmin(p.x.rows, p.y.rows, p.x.offsets, p.y.offsets, g, p.log_b, eps, p.cost, active)


def _iterate(prob: _Problem, steps: _HalfSteps, max_iter: int, tol: float, schedule: list[float], omega: float = 1.0,
             f=None, g=None, symmetric=None):
    """The iterations of tcfa.ops.sinkhorn_dense (its docstring states them); returns f, g, n_iter, error, converged.

    A problem stops costing work once its error is below tol; its potentials
    are those of its last update. The stored-cost path is one call to the
    fused loop. The half-step path measures the same error without another
    pass over the cost: the row part from the f-update's target, the column
    part from the g-update's. With x sharded over ranks the errors are global
    sums, so every rank stops the same problems at the same iteration and
    issues the same collectives. ``symmetric``: bool (B,) flags of the op (unsharded only).
    """
    B, dev, dt = prob.num_problems, prob.a.device, prob.a.dtype
    f = torch.zeros_like(prob.a) if f is None else f.clone()
    g = torch.zeros_like(prob.b) if g is None else g.clone()
    S = len(schedule)
    if steps.fused:
        f, g, n_iter, error = steps.loop(f, g, max_iter, tol, schedule[:max_iter], omega, symmetric)
    else:
        f, g, n_iter, error = _half_step_loop(prob, steps, f, g, max_iter, tol, schedule, omega, symmetric)
    if max_iter <= S:  # never reached the target eps: no error to report (symmetric problems run at it)
        unreached = torch.full((B,), float("inf"), dtype=dt, device=dev)
        error = unreached if symmetric is None else torch.where(symmetric.to(dev), error, unreached)
    return f, g, n_iter, error, error < tol


def _half_step_loop(prob, steps, f, g, max_iter, tol, schedule, omega, symmetric=None):
    B, dev, dt = prob.num_problems, prob.a.device, prob.a.dtype
    S = len(schedule)
    eps_at = lambda t: schedule[max(t, 1) - 1] if max(t, 1) <= S else prob.eps  # noqa: E731
    rho_a, rho_b = prob.reach if prob.reach is not None else (None, None)
    tie = TiedRows(symmetric, prob.x.offsets, prob.y.offsets, dev)
    n_iter = torch.zeros(B, dtype=torch.int64, device=dev)
    error = torch.full((B,), float("inf"), dtype=dt, device=dev)
    active = torch.ones(B, dtype=torch.bool, device=dev)
    for t in range(1, max_iter + 1):
        e_g, e_f = eps_at(t - 1), eps_at(t)
        w = omega if t > S + 1 else 1.0
        general = active & ~tie.flags
        mask = None if bool(general.all()) else general  # the kernels skip inactive problems
        g_new, _, g_gap = relaxed_update(g, steps.g_update(f, e_g, mask), e_g, rho_b, w)
        g = tie.apply(f, g_new if mask is None else torch.where(general[prob.y_index], g_new, g))
        f_new, f_T, _ = relaxed_update(f, steps.f_update(g, e_f, mask), e_f, rho_a, w)
        row = prob.a * torch.expm1((f - f_T) / e_f).abs()
        if tie.any:  # at eps from the first iteration, the averaged step (its error counts both marginals)
            tied = active & tie.flags
            s_T = relaxed_update(f, steps.f_update(g, prob.eps, tied), prob.eps, rho_a, 1.0)[1]
            on = tied[prob.x_index]
            f_new = torch.where(on, 0.5 * (f + s_T), f_new)
            row = torch.where(on, 2 * prob.a * torch.expm1((f - s_T) / prob.eps).abs(), row)
        # errors are only meaningful at the target eps, and needed only to stop or to report
        measured = tie.flags | (t > S)
        if bool(measured.any()) and (tol > 0 or t == max_iter):
            viol = prob.segment_sum(row, "x")
            if w != 1.0:  # the g-update missed its target: the columns' violation counts too
                viol = viol + prob.segment_sum(torch.where(general[prob.y_index], prob.b * torch.expm1(g_gap).abs(),
                                                           0.0), "y")
            error = torch.where(active & measured, viol, error)
        f = f_new if bool(active.all()) else torch.where(active[prob.x_index], f_new, f)
        n_iter += active
        if tol > 0:
            active &= ~((error < tol) & measured)
            if not bool(active.any()):
                break
    return f, tie.apply(f, g), n_iter, error


class SinkhornResult:
    """Potentials and diagnostics of a batch of entropic OT problems.

    ``f``, ``g`` are shaped like the rows of x / y ((N,) for flat input,
    (B, n) for dense input); ``n_iter``, ``error`` (L1 marginal violation)
    and ``converged`` have shape (B,).
    """

    def __init__(self, prob, f, g, n_iter, error, converged, inputs):
        self._prob = prob
        self._f, self._g = f, g
        self.f, self.g = prob.x.unflatten(f), prob.y.unflatten(g)
        self.n_iter, self.error, self.converged = n_iter, error, converged
        self._inputs = inputs  # the caller's x, y and normalised a, b (with autograd)

    @property
    def eps(self) -> float:
        return self._prob.eps

    def plan(self, memory_budget=None):
        """Dense plan(s) P_ij = a_i b_j exp((f_i + g_j - C_ij)/eps).

        (B, n, m) for dense input, (n, m) for a single flat problem, else a
        list of (n_k, m_k) tensors. Raises ValueError when the plans would not
        fit ``memory_budget`` bytes (default: a quarter of the device's free memory).
        """
        p = self._prob
        need, budget = p.cost_bytes(), _budget(memory_budget, p.x.rows.device)
        if need > budget:
            raise ValueError(
                f"plan() needs {need / 2**30:.2f} GiB for {p.num_problems} dense plan(s) but memory_budget is "
                f"{budget / 2**30:.2f} GiB; use barycentric_map() or value(), which stream the plan"
            )
        C = ops.cost_matrix(p.x.rows, p.y.rows, p.x.offsets, p.y.offsets, p.cost)
        n, m = p.x.sizes.tolist(), p.y.sizes.tolist()
        plans = []
        for k, block in enumerate(torch.split(C, [nk * mk for nk, mk in zip(n, m)])):
            xs, ys = slice(p.x.offsets[k], p.x.offsets[k + 1]), slice(p.y.offsets[k], p.y.offsets[k + 1])
            logp = (p.log_a[xs] + self._f[xs] / p.eps).unsqueeze(1) + (p.log_b[ys] + self._g[ys] / p.eps) - block.view(n[k], m[k]) / p.eps
            plans.append(logp.exp())
        if p.x.batch_shape is not None:
            return torch.stack(plans)
        return plans[0] if len(plans) == 1 else plans

    def barycentric(self, values: torch.Tensor) -> torch.Tensor:
        """sum_j P_ij v_j / sum_j P_ij for flat rows v (M, dv), streamed (tcfa.barycentric_map checks v)."""
        p = self._prob
        return ops.barycentric(p.x.rows, p.y.rows, p.x.offsets, p.y.offsets, self._g, p.log_b, values, p.eps, p.cost)

    def value(self) -> torch.Tensor:
        """Entropic OT value per problem, (B,): sum_i a_i f_i + sum_j b_j g_j.

        Differentiable w.r.t. x, y, a and b by the envelope theorem (the
        potentials are optimal, so no backpropagation through the iterations):
        d/da_i = f_i, d/db_j = g_j, d/dx_i = sum_j P_ij dC(x_i, y_j)/dx_i.

        Sharded (process_group given): the value is global on every rank;
        backward is then a collective (every rank must call it): each rank
        gets the gradient of its own shard of x and a (including the
        cross-rank weight normalisation) and the full gradient of y and b.
        """
        x, y, a, b = self._inputs
        if self._prob.reach is not None:
            from .ot_unbalanced import UnbalancedValue

            return UnbalancedValue.apply(x, y, a, b, self)
        return OTValue.apply(x, y, a, b, self)


def sinkhorn(x, y, a=None, b=None, *, eps, cost="sqeuclidean", x_offsets=None, y_offsets=None, max_iter=1000,
             tol=1e-6, scaling=None, mode="auto", memory_budget=None, process_group=None, reach=None,
             omega=DEFAULT_OMEGA, symmetric=None) -> SinkhornResult:
    """Entropic OT between the rows of x and y for a batch of problems in one call.

    x, y: (N, d) rows with int64 offsets (B+1,) (None: one problem), or dense
    (B, n, d) batches. a, b: non-negative row weights (None: uniform),
    normalised to mass 1 per problem. eps > 0: entropic regularisation in
    cost units. cost: "sqeuclidean" (|x - y|^2) or "cosine" (1 - cos).

    Stops each problem when its L1 marginal error is below ``tol`` (tol=0
    runs exactly ``max_iter`` iterations; ε-scaling iterations count).
    ``scaling`` in (0, 1) anneals eps from the squared diameter down to
    ``eps`` by that factor per iteration (GeomLoss-style); None runs at eps.
    ``omega`` in (0, 2) over-relaxes the iterations at the target eps
    (1: plain Sinkhorn); each relaxed step is kept only where it does not
    lower the dual objective. Iterations and errors: tcfa.ops.sinkhorn_dense.
    ``mode``: "dense" stores every problem's cost, "online" recomputes it in
    tiles each half-step (memory O(N + M)), "auto" stores it when all costs
    (and the rows' working memory) fit ``memory_budget`` bytes (default: a
    quarter of the free memory of the tensors' device: host memory for CPU
    tensors, free CUDA memory for CUDA ones); ``result.mode`` says which ran.
    A solve that cannot fit the free memory in the chosen mode raises
    MemoryError with the sizes before anything is allocated.
    fp16/bf16 inputs are solved in fp32 and give fp32 potentials.

    ``process_group`` (a torch.distributed group, e.g. ``dist.group.WORLD``)
    solves one batch sharded over its ranks: x, a and x_offsets are this
    rank's contiguous shard of every problem's rows (a shard may hold 0 rows
    of a problem), y, b and y_offsets are whole and the same on every rank.
    Every rank returns its shard of f, the full g, and the global n_iter,
    error, converged and value(); every rank must make the call. plan() and
    barycentric_map() give this shard's rows. See tcfa/distributed.py.

    ``reach``: unbalanced OT, the marginals relaxed by rho * KL (rho in cost units, POT's reg_m;
    one rho, or (rho_a, rho_b) with None keeping that side exact); the weights are then used as
    given, not normalised. Math and the peers' conventions: tcfa/ot_unbalanced.py.

    ``symmetric``: bool (B,) flags of problems that are one measure against itself (x rows equal
    to y rows, a equal to b; checked). Their solution has f = g, reached by GeomLoss's averaged
    one-potential update at eps from the first iteration, without annealing or omega (math and
    measurement: tcfa.ops.sinkhorn_dense): how :func:`tcfa.sinkhorn_divergence` solves OT(x, x).
    """
    comm = distributed.communicator(process_group)
    mode, budget, omega = comm.agree(check_options, mode, max_iter, tol, scaling, memory_budget, omega)
    reach = check_reach(reach, comm.sharded)
    prob, a_n, b_n = _prepare(x, y, a, b, eps, cost, x_offsets, y_offsets, comm, reach)
    # a shard decides for itself whether its own costs fit: ranks may differ in mode
    device = prob.x.rows.device
    cost_bytes, working = prob.cost_bytes(), prob.working_bytes()
    dense = mode == "dense" or (mode == "auto" and cost_bytes + working <= _budget(budget, device))
    check_fits(cost_bytes, working, dense, device)
    symmetric = check_symmetric(symmetric, prob, comm.sharded)
    schedule = _eps_schedule(prob, scaling)
    with torch.no_grad():
        steps = _HalfSteps(prob, dense)
        f, g, n_iter, error, converged = _iterate(prob, steps, max_iter, float(tol), schedule, omega,
                                                  symmetric=symmetric)
    result = SinkhornResult(prob, f, g, n_iter, error, converged, (flat_rows(x), flat_rows(y), a_n, b_n))
    result.mode = "dense" if dense else "online"
    return result


def barycentric_map(result: SinkhornResult, values: torch.Tensor) -> torch.Tensor:
    """T(x_i) = sum_j P_ij v_j / sum_j P_ij for every x row, streamed (no plan in memory).

    values: one row per row of y, (M, dv) or (M,) for flat input, (B, m, dv)
    or (B, m) for dense input. Returns (N, dv) / (N,) / (B, n, dv) / (B, n).
    """
    if not isinstance(result, SinkhornResult):
        raise TypeError(f"result must be a tcfa.SinkhornResult (what tcfa.sinkhorn returns), got {type(result).__name__}")
    p = result._prob
    values = _validate.tensor("values", values, dim=(1, 2, 3))
    squeeze = values.dim() == (1 if p.y.batch_shape is None else 2)
    v = values.unsqueeze(-1) if squeeze else values
    v = v.reshape(-1, v.shape[-1])
    if v.shape[0] != p.y.rows.shape[0]:
        raise ValueError(f"values must have one row per row of y ({p.y.rows.shape[0]}), got shape {tuple(values.shape)}")
    _validate.same_device(values=values, x=p.x.rows)
    T = p.x.unflatten(result.barycentric(v.to(p.x.rows.dtype)).to(values.dtype))
    return T.squeeze(-1) if squeeze else T
