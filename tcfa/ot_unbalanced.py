"""Unbalanced entropic OT: marginals relaxed by KL (tcfa.sinkhorn(..., reach=...)).

    OT(a, b) = min_P <C, P> + eps KL(P | a b^T) + rho_a KL(P 1 | a) + rho_b KL(P^T 1 | b)

with the generalised KL(p | q) = sum p log(p/q) - p + q. ``reach`` is rho in cost units, one
value for both sides or (rho_a, rho_b); None on a side keeps that marginal exact (rho = inf).
The weights are used as given (None: uniform 1/n): the masses are part of the problem. The
Sinkhorn updates are the balanced ones scaled by tau = rho / (rho + eps) (Chizat et al. 2018):

    f_i <- tau_a softmin_j(log b_j + (g_j - C_ij)/eps),   g_j <- tau_b softmin_i(log a_i + (f_i - C_ij)/eps),

and the plan keeps the form P_ij = a_i b_j exp((f_i + g_j - C_ij)/eps). The value is the dual
objective at the optimum (Sejourne et al. 2019; GeomLoss):

    F(f, g) = sum_i a_i phi_a(f_i) + sum_j b_j phi_b(g_j) - eps sum_ij a_i b_j (exp((f_i + g_j - C_ij)/eps) - 1),

phi(f) = rho (1 - exp(-f/rho)) (phi(f) = f where rho = inf). The peers' conventions:
- POT ``ot.unbalanced.sinkhorn_unbalanced(a, b, M, reg, reg_m, reg_type="kl")``: reg = eps, reg_m = rho;
  its scalings are u = exp(f/eps), v = exp(g/eps).
- GeomLoss ``SamplesLoss("sinkhorn", p=2, blur=s, reach=r)`` has the cost |x - y|^2 / 2, eps = s^2 and
  rho = r^2: tcfa with cost "sqeuclidean", eps = 2 s^2 and reach = 2 r^2 solves the same problem
  with every term doubled.
- OTT ``tau_a = rho_a / (rho_a + eps)``.
"""
from __future__ import annotations

import math

import torch

from . import ops
from .ot_grad import _cost_grad

__all__ = ["check_reach", "relax", "UnbalancedValue"]


def check_reach(reach, sharded: bool = False):
    """None (balanced) or (rho_a, rho_b), each a positive float or None (that side exact)."""
    if reach is None:
        return None
    pair = tuple(reach) if isinstance(reach, (tuple, list)) else (reach, reach)
    if len(pair) != 2:
        raise ValueError(f"reach must be a number or a pair (rho_a, rho_b), got {reach!r}")
    for side, rho in zip("ab", pair):
        if rho is not None and (isinstance(rho, bool) or not isinstance(rho, (int, float)) or not rho > 0
                                or not math.isfinite(rho)):
            raise ValueError(f"reach must be positive and finite (None: an exact marginal), got rho_{side}={rho!r}")
    if pair == (None, None):
        return None
    if sharded:
        raise ValueError("reach (unbalanced OT) is not supported with a process_group")
    return tuple(None if rho is None else float(rho) for rho in pair)


def relax(reach, side: str, eps: float) -> float:
    """tau = rho / (rho + eps) of the potential on ``side`` ("x": f, "y": g); 1 when balanced there."""
    rho = None if reach is None else reach[0 if side == "x" else 1]
    return 1.0 if rho is None else rho / (rho + eps)


def phi(f: torch.Tensor, rho) -> torch.Tensor:
    """rho (1 - exp(-f/rho)), or f where rho is None (an exact marginal)."""
    return f if rho is None else -rho * torch.expm1(-f / rho)


def _row_sums(res):
    """r_i = sum_j b_j exp((f_i + g_j - C_ij)/eps) = exp((f_i - s_i)/eps), s the balanced soft-min
    of g, and the same c_j for the columns (one streamed pass each): the plan's row masses are a r."""
    p = res._prob
    s = ops.softmin(p.x.rows, p.y.rows, p.x.offsets, p.y.offsets, res._g, p.log_b, p.eps, p.cost)
    t = ops.softmin(p.y.rows, p.x.rows, p.y.offsets, p.x.offsets, res._f, p.log_a, p.eps, p.cost)
    return torch.exp((res._f - s) / p.eps), torch.exp((res._g - t) / p.eps)


class UnbalancedValue(torch.autograd.Function):
    """F(f, g) per problem; by the envelope theorem d/da_i = phi_a(f_i) - eps (r_i - m_b) with
    r_i = sum_j b_j exp((f_i + g_j - C_ij)/eps) and m_b the problem's mass of b (likewise for b),
    and d/dx_i = sum_j P_ij dC(x_i, y_j)/dx_i as in the balanced case, with P's own row masses."""

    @staticmethod
    def forward(ctx, x, y, a, b, res):
        p = res._prob
        rho_a, rho_b = p.reach
        r, c = _row_sums(res)
        mass_a, mass_b = p.segment_sum(p.a, "x"), p.segment_sum(p.b, "y")
        value = (p.segment_sum(p.a * phi(res._f, rho_a), "x") + p.segment_sum(p.b * phi(res._g, rho_b), "y")
                 - p.eps * (p.segment_sum(p.a * r, "x") - mass_a * mass_b))
        ctx.res, ctx.shapes, ctx.parts = res, (x.shape, y.shape), (r, c, mass_a, mass_b)
        return value

    @staticmethod
    def backward(ctx, grad):
        res, (r, c, mass_a, mass_b) = ctx.res, ctx.parts
        p = res._prob
        rho_a, rho_b = p.reach
        grad = grad.to(p.a.dtype)
        gx = gy = ga = gb = None
        if ctx.needs_input_grad[0]:
            gx = (_cost_grad(p, "x", res._f, res._g, p.a * r) * grad[p.x_index].unsqueeze(1)).reshape(ctx.shapes[0])
        if ctx.needs_input_grad[1]:
            gy = (_cost_grad(p, "y", res._f, res._g, p.b * c) * grad[p.y_index].unsqueeze(1)).reshape(ctx.shapes[1])
        if ctx.needs_input_grad[2]:
            ga = (phi(res._f, rho_a) - p.eps * (r - mass_b[p.x_index])) * grad[p.x_index]
        if ctx.needs_input_grad[3]:
            gb = (phi(res._g, rho_b) - p.eps * (c - mass_a[p.y_index])) * grad[p.y_index]
        return gx, gy, ga, gb, None
