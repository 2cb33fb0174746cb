"""The guarded over-relaxed Sinkhorn update and the symmetric problems' tied potentials (math:
tcfa.ops.sinkhorn_dense), for the loops run from Python (the Triton launcher, the online solve).

The CPU kernel applies the same rules in csrc/cpu/sinkhorn_dense.cpp (relaxed_moves, tie).
"""
from __future__ import annotations

import torch

__all__ = ["relaxed_update", "TiedRows"]


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


class TiedRows:
    """Symmetric problems (bool flags (B,) or None): their g is their f, row for row (square problems)."""

    def __init__(self, flags, x_offsets, y_offsets, device):
        xo, yo = x_offsets.cpu(), y_offsets.cpu()
        self.any = flags is not None and bool(flags.any())
        self.flags = flags.to(device) if self.any else torch.zeros(xo.numel() - 1, dtype=torch.bool, device=device)
        ks = torch.nonzero(self.flags).flatten().tolist()
        self.src = torch.cat([torch.arange(int(xo[k]), int(xo[k + 1])) for k in ks]).to(device) if ks else None
        self.dst = torch.cat([torch.arange(int(yo[k]), int(yo[k + 1])) for k in ks]).to(device) if ks else None

    def apply(self, f, g):
        """g with every symmetric problem's rows replaced by its f."""
        return g if self.src is None else g.index_copy(0, self.dst, f[self.src])
