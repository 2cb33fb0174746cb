"""The guarded over-relaxed Sinkhorn update (math: tcfa.ops.sinkhorn_dense), for the loops run from Python.

The CPU kernel applies the same rule row by row in csrc/cpu/sinkhorn_dense.cpp (relaxed_move).
"""
from __future__ import annotations

import torch

__all__ = ["relaxed_update"]


def relaxed_update(v, v_plain, eps: float, rho, omega: float):
    """(v', v_T, gap): the update of potential v from its soft-min v_plain = v - eps x, its target, (v' - v_T) / eps.

    x is the log of v's current marginal ratio; the Sinkhorn target is v_T = tau v_plain,
    tau = rho / (rho + eps) (rho None: an exact marginal, tau = 1). Over-relaxed,
    v' = v + omega (v_T - v) where that does not lower the dual objective, else v_T.
    Moving v by eps d changes the objective by eps (phi-term - e^x (e^d - 1)), the
    phi-term being d for an exact marginal and (rho/eps) e^{-v/rho} (1 - e^{-d eps/rho})
    for a KL-relaxed one. gap, the miss of the target the error counts, is formed as
    (omega - 1) d_T rather than from v' - v_T, which cancels in fp32.
    """
    v_T = v_plain if rho is None else (rho / (rho + eps)) * v_plain
    if omega == 1.0:
        return v_T, v_T, torch.zeros_like(v_T)
    d_T = (v_T - v) / eps
    d = omega * d_T
    gain = d if rho is None else -(rho / eps) * torch.exp(-v / rho) * torch.expm1(-d * eps / rho)
    # NaN where v_plain is inf (an empty sum): the comparison fails and v takes v_T = inf
    ascends = gain - torch.exp((v - v_plain) / eps) * torch.expm1(d) >= 0
    return torch.where(ascends, v + eps * d, v_T), v_T, torch.where(ascends, (omega - 1) * d_T, 0.0)
