"""Quantities built on the Sinkhorn solver: the debiased divergence and entropic Gromov-Wasserstein."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import ops
from .ops import _validate
from .ragged import Ragged
from .ot import _HalfSteps, _iterate, _prepare, sinkhorn


def sinkhorn_divergence(x, y, a=None, b=None, *, eps, cost="sqeuclidean", x_offsets=None, y_offsets=None,
                        **kwargs) -> torch.Tensor:
    """Debiased entropic OT per problem, (B,): S = OT(x, y) - OT(x, x)/2 - OT(y, y)/2.

    Non-negative, zero when the two measures coincide; differentiable like
    :meth:`SinkhornResult.value`. kwargs go to :func:`sinkhorn`.
    """
    common = dict(eps=eps, cost=cost, **kwargs)
    xy = sinkhorn(x, y, a, b, x_offsets=x_offsets, y_offsets=y_offsets, **common).value()
    xx = sinkhorn(x, x, a, a, x_offsets=x_offsets, y_offsets=x_offsets, **common).value()
    yy = sinkhorn(y, y, b, b, x_offsets=y_offsets, y_offsets=y_offsets, **common).value()
    return xy - 0.5 * (xx + yy)


@dataclass
class GWResult:
    plan: torch.Tensor  # (n, m)
    value: torch.Tensor  # scalar GW loss of the plan
    n_iter: int
    converged: bool


def entropic_gw(x, y, a=None, b=None, *, eps, cost="sqeuclidean", max_iter=1000, tol=1e-9,
                inner_max_iter=1000, inner_tol=1e-9) -> GWResult:
    """Entropic Gromov-Wasserstein (square loss) between the geometries of x and y.

    A layer-overlap diagnostic for activations of different widths: compares
    the within-set costs C1 = C(x_i, x_k) and C2 = C(y_j, y_l). Projected
    gradient (Peyre et al. 2016; POT's ``entropic_gromov_wasserstein``,
    solver "PGD"): from T = a b^T, repeat

        L = 2 (C1^2 a 1^T + 1 (C2^2 b)^T - 2 C1 T C2^T),   T <- Sinkhorn(a, b, L, eps)

    until |T - T_prev|_F < tol. The value is sum_ij (L/2)_ij T_ij. Each
    Sinkhorn runs on the dense soft-min, warm-started from the last
    potentials. One problem (x (n, d), y (m, e)).
    """
    x = _validate.tensor("x", x, dim=2)
    y = _validate.tensor("y", y, dim=2)
    _validate.same_device(x=x, y=y)
    _validate.same_dtype(x=x, y=y)
    C1 = _single_cost(x, cost)
    C2 = _single_cost(y, cost)
    prob, _, _ = _prepare(torch.zeros(x.shape[0], 1, dtype=C1.dtype, device=x.device),
                          torch.zeros(y.shape[0], 1, dtype=C1.dtype, device=x.device), a, b, eps, "sqeuclidean", None, None)
    pa, pb = prob.a, prob.b
    constC = (C1**2 @ pa).unsqueeze(1) + (C2**2 @ pb).unsqueeze(0)
    T = torch.outer(pa, pb)
    steps = _HalfSteps(prob, dense=False)
    f = g = None
    it, err = 0, float("inf")
    while it < max_iter and err >= tol:
        L = 2 * (constC - 2 * C1 @ T @ C2.T)
        steps.cost = L.reshape(-1).contiguous()
        f, g, _, _, _ = _iterate(prob, steps, inner_max_iter, inner_tol, [], f, g)
        T_new = ((prob.log_a + f / prob.eps).unsqueeze(1) + (prob.log_b + g / prob.eps) - L / prob.eps).exp()
        err = float(torch.linalg.norm(T_new - T))
        T, it = T_new, it + 1
    value = ((constC - 2 * C1 @ T @ C2.T) * T).sum()
    return GWResult(T, value, it, err < tol)


def _single_cost(x, cost):
    off = Ragged.single(x).offsets
    return ops.cost_matrix(x, x, off, off, _validate.choice("cost", cost, _validate.COSTS)).view(x.shape[0], x.shape[0])
