"""tcfa.sinkhorn_cost: entropic OT on costs the caller supplies (the form of POT's ot.sinkhorn(a, b, M, reg)).

The problem, the potentials and the stopping rule are tcfa.sinkhorn's; only the cost comes from
the caller instead of from points. Each problem's cost block is stored once and the fused dense
loop (tcfa.ops.sinkhorn_dense) runs on it, so a batch of problems is one call per eps stage.
"""
from __future__ import annotations

import torch

from . import distributed
from .ops import _validate
from .ot import SinkhornResult, _HalfSteps, _iterate, _Problem, annealing
from .ot_checks import DEFAULT_OMEGA, check_options, weights_pair
from .ot_grad import dual_value, weight_grads
from .ot_unbalanced import check_reach, phi
from .ragged import Ragged, block_offsets

__all__ = ["sinkhorn_cost", "CostSinkhornResult"]


class CostSinkhornResult(SinkhornResult):
    """tcfa.SinkhornResult of a given cost: plan() reads the stored cost, value() is differentiable
    with respect to C (d value / d C_ij = P_ij), a and b."""

    def __init__(self, prob, f, g, n_iter, error, converged, cost, inputs):
        super().__init__(prob, f, g, n_iter, error, converged, inputs)
        self._cost = cost  # flat, compute dtype, no autograd

    def _problems(self, flat: torch.Tensor):
        """(problem, its x rows, its y rows, its (n_k, m_k) block of the flat cost) per problem."""
        p = self._prob
        n, m = p.x.sizes.tolist(), p.y.sizes.tolist()
        for k, block in enumerate(torch.split(flat, [nk * mk for nk, mk in zip(n, m)])):
            xs, ys = slice(p.x.offsets[k], p.x.offsets[k + 1]), slice(p.y.offsets[k], p.y.offsets[k + 1])
            yield k, xs, ys, block.view(n[k], m[k])

    def _blocks(self):
        """(problem, log P_k as an (n_k, m_k) tensor) per problem."""
        p = self._prob
        for k, xs, ys, block in self._problems(self._cost):
            yield k, ((p.log_a[xs] + self._f[xs] / p.eps).unsqueeze(1) + (p.log_b[ys] + self._g[ys] / p.eps)
                      - block / p.eps)

    def plan(self, memory_budget=None):
        """Dense plan(s) P_ij = a_i b_j exp((f_i + g_j - C_ij)/eps), shaped like the cost: (n, m),
        (B, n, m), or a list of (n_k, m_k) for a flat cost of several problems. They take the
        cost's memory again, so there is no budget to check; ``memory_budget`` is accepted for
        the signature's sake."""
        plans = [logp.exp() for _, logp in self._blocks()]
        if self._prob.x.batch_shape is not None:
            return torch.stack(plans)
        return plans[0] if len(plans) == 1 else plans

    def barycentric(self, values: torch.Tensor) -> torch.Tensor:
        """T_i = sum_j P_ij v_j / sum_j P_ij with the stored cost (tcfa.barycentric_map calls this)."""
        p = self._prob
        out = []
        for k, logp in self._blocks():
            w = torch.softmax(logp, dim=1)
            out.append(w @ values[p.y.offsets[k]:p.y.offsets[k + 1]])
        return torch.cat(out)

    def value(self) -> torch.Tensor:
        """Entropic OT value per problem, (B,): sum_i a_i f_i + sum_j b_j g_j (the primal
        <C, P> + eps KL(P | a b^T) at the optimum); gradients P for C, f for a, g for b."""
        cost, a, b = self._inputs
        if self._prob.reach is not None:
            return self._unbalanced_value(cost, a, b)
        return _CostValue.apply(cost, a, b, self)

    def _unbalanced_value(self, cost, a, b) -> torch.Tensor:
        """The unbalanced dual F(f, g) (tcfa/ot_unbalanced.py) as an expression in C, a and b with the
        potentials held fixed: by the envelope theorem its autograd gradients are the value's."""
        p = self._prob
        f, g, eps = self._f, self._g, p.eps
        a, b = a.to(f.dtype), b.to(f.dtype)
        out = []
        for _, xs, ys, block in self._problems(cost.reshape(-1).to(f.dtype)):
            e = torch.expm1((f[xs, None] + g[None, ys] - block) / eps)
            out.append((a[xs] * phi(f[xs], p.reach[0])).sum() + (b[ys] * phi(g[ys], p.reach[1])).sum()
                       - eps * (a[xs, None] * b[None, ys] * e).sum())
        return torch.stack(out)


class _CostValue(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cost, a, b, res: CostSinkhornResult):
        ctx.res, ctx.cost_shape = res, cost.shape
        return dual_value(res)

    @staticmethod
    def backward(ctx, grad):
        res = ctx.res
        grad = grad.to(res._prob.a.dtype)
        gc = None
        if ctx.needs_input_grad[0]:  # d value / d C_ij = P_ij
            gc = torch.cat([(logp.exp() * grad[k]).reshape(-1) for k, logp in res._blocks()]).reshape(ctx.cost_shape)
        return gc, *weight_grads(res, grad, *ctx.needs_input_grad[1:3]), None


def _layout(C, x_offsets, y_offsets):
    """(flat cost, x offsets, y offsets, batch shapes of x and y) from a (n, m), (B, n, m) or flat cost."""
    C = _validate.tensor("C", C, dim=(1, 2, 3))
    if C.dim() == 1:
        if x_offsets is None or y_offsets is None:
            raise ValueError("a flat (1-D) C needs x_offsets and y_offsets: problem k is the row-major "
                             "(n_k, m_k) block at its place in C")
        # the offsets say how many rows there are: they are checked for shape, start and order
        x_offsets, y_offsets = torch.as_tensor(x_offsets), torch.as_tensor(y_offsets)
        end = lambda off: int(off[-1]) if off.dim() == 1 and off.numel() else 0  # noqa: E731
        xo = _validate.offsets("x_offsets", x_offsets, end(x_offsets), C.device)
        yo = _validate.offsets("y_offsets", y_offsets, end(y_offsets), C.device)
        if xo.numel() != yo.numel():
            raise ValueError(f"x_offsets and y_offsets must describe the same number of problems, got "
                             f"{xo.numel() - 1} and {yo.numel() - 1}")
        need = int(block_offsets(xo, yo)[-1])
        if C.numel() != need:
            raise ValueError(f"C must hold sum_k n_k * m_k = {need} entries for these offsets, got {C.numel()}")
        return C, xo, yo, None, None
    if x_offsets is not None or y_offsets is not None:
        raise ValueError("x_offsets and y_offsets are for a flat (1-D) C; a (n, m) or (B, n, m) C says its sizes")
    B, n, m = (1, *C.shape) if C.dim() == 2 else C.shape
    if n == 0 or m == 0 or B == 0:
        raise ValueError(f"C must not be empty, got shape {tuple(C.shape)}")
    ar = torch.arange(B + 1, dtype=torch.int64, device=C.device)
    shapes = ((B, n), (B, m)) if C.dim() == 3 else (None, None)
    return C.reshape(-1), ar * n, ar * m, *shapes


def sinkhorn_cost(C, a=None, b=None, *, eps, x_offsets=None, y_offsets=None, max_iter: int = 1000, tol=1e-6,
                  scaling=None, reach=None, omega=DEFAULT_OMEGA) -> CostSinkhornResult:
    """Entropic OT with a given cost matrix, for one problem or a batch in one call.

    The problem of tcfa.sinkhorn (math and stopping rule there) with C_ij given: C is (n, m) for
    one problem, (B, n, m) for a batch, or flat -- every problem's row-major (n_k, m_k) block
    concatenated -- with x_offsets and y_offsets (B+1) giving n_k and m_k. a, b: non-negative
    weights shaped like C's rows / columns ((n,), (B, n), or flat (sum n_k,)), None for uniform;
    normalised to mass 1 per problem. eps > 0 is in cost units. ``scaling`` in (0, 1) anneals
    eps from the largest cost range of the batch (max C - min C) down to eps by that factor per
    iteration. f and g are shaped like a and b. fp16/bf16 costs are solved in fp32. ``reach``:
    unbalanced OT as in tcfa.sinkhorn (weights then used as given; tcfa/ot_unbalanced.py).
    ``omega``: over-relaxation as in tcfa.sinkhorn.
    """
    reach = check_reach(reach)
    _, _, omega, _ = check_options("dense", max_iter, tol, scaling, None, omega)
    eps = _validate.positive("eps", eps)
    flat, xo, yo, shape_x, shape_y = _layout(C, x_offsets, y_offsets)
    ct = _validate.compute_dtype(flat.dtype)
    rx = Ragged(flat.new_empty(int(xo[-1]), 0), xo, shape_x)  # rows without features: C is given
    ry = Ragged(flat.new_empty(int(yo[-1]), 0), yo, shape_y)
    if bool((rx.sizes == 0).any()) or bool((ry.sizes == 0).any()):
        raise ValueError("every problem needs at least one row and one column (x_offsets / y_offsets "
                         "may not repeat a value)")
    a_n, b_n = weights_pair(a, b, rx, ry, balanced=reach is None)
    _validate.same_device(C=flat, a=a_n, b=b_n)
    prob = _Problem(Ragged(rx.rows.to(ct), xo, shape_x), Ragged(ry.rows.to(ct), yo, shape_y),
                    a_n.detach().to(ct), b_n.detach().to(ct), "given", eps, distributed.LOCAL, reach)
    cost = flat.detach().to(ct).contiguous()
    schedule = [] if scaling is None else annealing(float(cost.max() - cost.min()), eps, scaling)
    with torch.no_grad():
        steps = _HalfSteps(prob, dense=False)
        steps.cost, steps.fused = cost, True  # the fused dense loop on the caller's cost
        f, g, n_iter, error, converged = _iterate(prob, steps, max_iter, float(tol), schedule, omega)
    return CostSinkhornResult(prob, f, g, n_iter, error, converged, cost, (C, a_n, b_n))
