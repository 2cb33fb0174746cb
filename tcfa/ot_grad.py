"""The gradient of the entropic OT value (tcfa.SinkhornResult.value) by the envelope theorem.

The potentials (f, g) are optimal, so no backpropagation through the iterations:

    d value / d a_i = f_i,   d value / d b_j = g_j,   d value / d x_i = sum_j P_ij dC(x_i, y_j)/dx_i,

and the last is a barycentric projection (tcfa.ops.barycentric) of dC under the
row-normalised plan, streamed like the solver itself.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from . import ops
from .ragged import offsets_from_sizes

if TYPE_CHECKING:
    from .ot import SinkhornResult, _Problem


def _cost_grad(p: _Problem, side: str, f, g, mass) -> torch.Tensor:
    """sum_j P_ij dC(x_i, y_j)/dx_i for side "x" (or the same for y), on the centred rows."""
    if side == "x":
        return _cost_grad_rows(p.x.rows, p.y.rows, p.x.offsets, p.y.offsets, g, p.log_b, mass, p.eps, p.cost)
    return _cost_grad_rows(p.y.rows, p.x.rows, p.y.offsets, p.x.offsets, f, p.log_a, mass, p.eps, p.cost)


def _cost_grad_rows(u, v, uo, vo, pot, logw, mass, eps, cost) -> torch.Tensor:
    """mass_i * (the barycentre of dC(u_i, v_j)/du_i under the row-normalised plan), per row of u."""
    if cost == "sqeuclidean":
        T = ops.barycentric(u, v, uo, vo, pot, logw, v, eps, cost)
        return 2 * mass.unsqueeze(1) * (u - T)
    norm = u.norm(dim=1, keepdim=True).clamp_min(1e-30)
    uh, vh = u / norm, v / v.norm(dim=1, keepdim=True).clamp_min(1e-30)
    T = ops.barycentric(u, v, uo, vo, pot, logw, vh, eps, cost)
    # d(1 - uh.vh)/du = -(vh - (uh.vh) uh) / |u|
    return -mass.unsqueeze(1) * (T - (uh * T).sum(1, keepdim=True) * uh) / norm


def _y_cost_grad(p: _Problem, res: SinkhornResult) -> torch.Tensor:
    """_cost_grad for y over this process's x rows.

    With x whole, column j of the plan has mass b_j. A shard holds the part
    b_j w_j of it, w_j = exp((G_j - h_j)/eps) with h its own soft-min over
    its rows and G the merged one, so the parts sum to b_j exactly. The y
    rows of problems the shard holds no x row of get 0 (their barycentre over
    this shard is 0/0, which the barycentric op refuses): they are left out.
    """
    if not p.comm.sharded:
        return _cost_grad(p, "y", res._f, res._g, p.b)
    part = ops.softmin(p.y.rows, p.x.rows, p.y.offsets, p.x.offsets, res._f, p.log_a, p.eps, p.cost)
    mass = p.b * torch.exp((p.comm.merge_softmin(part, p.eps) - part) / p.eps)
    local = p.x.sizes > 0  # problems with rows on this shard
    rows = local[p.y_index]
    grad = torch.zeros_like(p.y.rows)
    if bool(local.any()):
        yo = offsets_from_sizes(p.y.sizes[local])
        xo = offsets_from_sizes(p.x.sizes[local])  # every x row belongs to a local problem
        grad[rows] = _cost_grad_rows(p.y.rows[rows], p.x.rows, yo, xo, res._f, p.log_a, mass[rows], p.eps, p.cost)
    return torch.where((mass > 0).unsqueeze(1), grad, torch.zeros_like(grad))


def dual_value(res: SinkhornResult) -> torch.Tensor:
    """sum_i a_i f_i + sum_j b_j g_j per problem."""
    p = res._prob
    return p.segment_sum(p.a * res._f, "x") + p.segment_sum(p.b * res._g, "y")


def weight_grads(res: SinkhornResult, grad: torch.Tensor, need_a: bool, need_b: bool):
    """d value / d a = f and d value / d b = g, times each row's problem's incoming gradient."""
    p = res._prob
    return (res._f * grad[p.x_index] if need_a else None, res._g * grad[p.y_index] if need_b else None)


class OTValue(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, a, b, res: SinkhornResult):
        ctx.res = res
        ctx.x_shape, ctx.y_shape = x.shape, y.shape
        return dual_value(res)

    @staticmethod
    def backward(ctx, grad):
        res = ctx.res
        p = res._prob
        grad = grad.to(p.a.dtype)
        gx = gy = None
        if ctx.needs_input_grad[0]:
            gx = (_cost_grad(p, "x", res._f, res._g, p.a) * grad[p.x_index].unsqueeze(1)).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            gy = _y_cost_grad(p, res) * grad[p.y_index].unsqueeze(1)
            gy = p.comm.sum(gy).reshape(ctx.y_shape)  # each rank's x rows pull on y
        return gx, gy, *weight_grads(res, grad, *ctx.needs_input_grad[2:4]), None
