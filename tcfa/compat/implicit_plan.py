"""An entropic plan P(M, a, b) whose gradients carry its own dependence on M, a and b.

POT's torch backend differentiates its plans (and the losses built on them, such as sinkhorn2's
<M, P>) by unrolling the Sinkhorn iterations. At convergence that is the derivative of the plan
itself, which this module computes by implicit differentiation instead. The plan of the KL-relaxed
problem (POT's reg_m = rho; rho = inf keeps a marginal exact, the balanced case) satisfies

    P_ij = a_i b_j exp((f_i + g_j - M_ij) / eps),   r = P 1 = a exp(-f / rho_a),   c = P^T 1 = b exp(-g / rho_b).

Perturbing M, a, b moves the potentials by H [df; dg] = [(P o dM) 1 - eps P (db / b);
(P o dM)^T 1 - eps P^T (da / a)], H = [[diag(h_r), P], [P^T, diag(h_c)]], h_r = r (1 + eps / rho_a),
h_c = c (1 + eps / rho_b). For an upstream gradient G = dL/dP, W = G o P and [u; v] solving
H [u; v] = [W 1; W^T 1] (H is symmetric, so this is the adjoint system):

    dL/dM_ij = (P_ij (u_i + v_j) - W_ij) / eps,   dL/da = h_r u / a,   dL/db = h_c v / b.

A weight that is 0 gets a NaN gradient (its row or column holds no plan to take the limit
from; POT's is NaN too); M's gradient and the other weights' are exact. Balanced (both rho
infinite), H is singular along (1, -1), the potentials' shared constant: u and v,
and the gradients for a and b, are defined up to a constant t added to u and taken from v, which no
move along sum a = sum b sees. The t returned is POT's: when its last iteration scales the rows (sinkhorn),
it extends P to unequal masses A = sum a, B = sum b as the plan of (a B / A, b) scaled by A / B,
whose gradients are u + s and v - s, s = (<G, P> - a.u) / A (for any t); the columns last
(sinkhorn_unbalanced with reg_m = inf), the mirror image. H is solved through its Schur
complement on the smaller side: O(n m min(n, m) + min(n, m)^3). Checked against POT 0.9's unrolled
gradients in tests/test_compat_pot.py.
"""
from __future__ import annotations

import torch


def _safe_inverse(w: torch.Tensor) -> torch.Tensor:
    """1 / w, and 0 where w is 0 (a zero-mass row or column carries no plan)."""
    return torch.where(w > 0, 1 / w.clamp_min(torch.finfo(w.dtype).tiny), torch.zeros_like(w))


def _adjoint(P: torch.Tensor, hr: torch.Tensor, hc: torch.Tensor, wr: torch.Tensor, wc: torch.Tensor,
             balanced: bool):
    """[u; v] with [[diag(hr), P], [P^T, diag(hc)]] [u; v] = [wr; wc]; balanced: the solution with
    sum(u) = 0 of the singular system."""
    if P.shape[0] > P.shape[1]:  # eliminate on the smaller side: the transposed problem
        v, u = _adjoint(P.mT, hc, hr, wc, wr, balanced)
        shift = u.mean() if balanced else 0.0
        return u - shift, v + shift
    Pc = P * _safe_inverse(hc)
    schur = torch.diag(hr) - Pc @ P.mT
    if balanced:
        # S 1 = a - P 1 = 0: S + mean(a)/n 1 1^T is invertible, and for a right side orthogonal to 1
        # (sum W - sum W) its solution has sum 0 and solves S u = rhs, as 1^T S = 0
        schur = schur + hr.mean() / hr.shape[0]
    u = torch.linalg.solve(schur, (wr - Pc @ wc)[:, None])[:, 0]
    return u, _safe_inverse(hc) * (wc - P.mT @ u)


class _ImplicitPlan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, M, a, b, P, eps, rho_a, rho_b, last):
        ctx.save_for_backward(a, b, P)
        ctx.eps, ctx.rho, ctx.last = eps, (rho_a, rho_b), last
        return P.clone()

    @staticmethod
    def backward(ctx, G):
        a, b, P = ctx.saved_tensors
        eps, (rho_a, rho_b) = ctx.eps, ctx.rho
        balanced = rho_a is None and rho_b is None
        r, c = P.sum(1), P.sum(0)
        hr = r * (1 + eps / rho_a) if rho_a is not None else r
        hc = c * (1 + eps / rho_b) if rho_b is not None else c
        W = G * P
        # rows and columns without mass carry no plan and would make H singular: the system is solved
        # on the support, u and v are 0 off it (where P and W are 0, so dL/dM is 0 there)
        rows, cols = hr > 0, hc > 0
        u, v = torch.zeros_like(hr), torch.zeros_like(hc)
        u[rows], v[cols] = _adjoint(P[rows][:, cols], hr[rows], hc[cols], W.sum(1)[rows], W.sum(0)[cols], balanced)
        gM = (P * (u[:, None] + v[None, :]) - W) / eps
        # a zero weight's derivative needs its row's potential, which a plan of zeros does not hold:
        # NaN there (POT's unrolled gradient is NaN there too), the others are exact
        ga = torch.where(a > 0, hr * u * _safe_inverse(a), float("nan"))
        gb = torch.where(b > 0, hc * v * _safe_inverse(b), float("nan"))
        if balanced and ctx.last == "rows":  # POT's gauge (module docstring)
            shift = (W.sum() - (a * ga).nan_to_num().sum()) / a.sum()
            ga, gb = ga + shift, gb - shift
        elif balanced:
            shift = (W.sum() - (b * gb).nan_to_num().sum()) / b.sum()
            ga, gb = ga - shift, gb + shift
        return gM, ga, gb, None, None, None, None, None


def implicit_plan(M: torch.Tensor, a: torch.Tensor, b: torch.Tensor, P: torch.Tensor, eps: float,
                  reach: tuple | None = None, last: str = "rows") -> torch.Tensor:
    """P, the converged plan of (M, a, b) at ``eps`` with KL marginal weights ``reach`` (rho_a, rho_b;
    None for an exact marginal, or for both), returned with gradients for M, a and b through its own dependence on them (module
    docstring). P's values are taken as given. ``last``: the marginal ("rows" or "cols") the POT solver
    being matched scales last, which fixes the balanced gradients' constant (sinkhorn: rows;
    sinkhorn_unbalanced with reg_m = inf: columns)."""
    if last not in ("rows", "cols"):
        raise ValueError(f"last must be 'rows' or 'cols', got {last!r}")
    rho_a, rho_b = (None if r is None else float(r) for r in (reach or (None, None)))
    return _ImplicitPlan.apply(M, a, b, P.detach(), float(eps), rho_a, rho_b, last)
