"""SharedBasisStitch: conditioned maps that share most of their parameters, M_c = M_0 + Delta_c.

    h(x) = mu_y0 + (x - mu_x0) U_0 V_0 + sum_c g_c(x) (mu_y[c] + (x - mu_x[c]) dU_c dV_c)

M_0 (rank r_0) is one map for every row; each condition adds a low-rank correction of rank r_c fitted
on what M_0 leaves, mixed by the same gate as GatedMultiStitch (whose fused op computes the sum). It
costs r_0 (dx + dy) + dx + dy + C (r_c (dx + dy) + dx + dy + dx + 1) parameters, against
C (r (dx + dy) + dx + dy + dx + 1) for C independent rank-r maps: conditioning at a small premium.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .linear_maps import cca_maps, ridge_map
from .ops import _validate
from .stats import segment_moments
from .stitch import GatedMultiStitch

__all__ = ["SharedBasisStitch"]


class SharedBasisStitch(nn.Module):
    """A shared map M_0 plus gated per-condition corrections (``residual``, a GatedMultiStitch)."""

    def __init__(self, dx: int, dy: int, num_conditions: int, base_rank: int, cond_rank: int, *, top_k=None,
                 temperature: float = 1.0, device=None, dtype=None):
        super().__init__()
        base_rank = _validate.integer("base_rank", base_rank, lo=1)
        f = {"device": device, "dtype": dtype}
        self.U0 = nn.Parameter(torch.randn(dx, base_rank, **f) / math.sqrt(dx))
        self.V0 = nn.Parameter(torch.randn(base_rank, dy, **f) / math.sqrt(base_rank))
        self.mu_x0 = nn.Parameter(torch.zeros(dx, **f))
        self.mu_y0 = nn.Parameter(torch.zeros(dy, **f))
        self.residual = GatedMultiStitch(dx, dy, num_conditions, cond_rank, top_k, temperature, **f)

    @property
    def dx(self) -> int:
        return self.U0.shape[0]

    @property
    def dy(self) -> int:
        return self.V0.shape[1]

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _validate.tensor("x", x, finite=False)
        if x.dim() < 1 or x.shape[-1] != self.dx:
            raise ValueError(f"x must have shape (..., {self.dx}), got {tuple(x.shape)}")
        return self.mu_y0 + ((x - self.mu_x0) @ self.U0) @ self.V0 + self.residual(x)

    @classmethod
    def fit(cls, xa: torch.Tensor, xb: torch.Tensor, ids: torch.Tensor, num_conditions: int, *, base_rank: int,
            cond_rank: int, base: str = "cca", reg: float = 1e-3, top_k=None,
            temperature: float = 1.0) -> "SharedBasisStitch":
        """M_0 from all rows (``base`` "cca" or "ridge", rank base_rank); each condition's correction is the
        rank-cond_rank ridge map from its A rows to what M_0 leaves of its B rows; nearest-centroid gate."""
        xa, xb = _validate.paired_rows(xa, xb, "xa", "xb")
        base = _validate.choice("base", base, ("cca", "ridge"))
        ids = _validate.labels("ids", ids, xa.shape[0], num_conditions)
        one = segment_moments(xa, xb, torch.zeros_like(ids), 1)
        m0 = cca_maps(one, base_rank, reg) if base == "cca" else ridge_map(one, reg, base_rank)
        m0 = m0.to(xa.dtype)
        left = xb - m0.apply(xa, torch.zeros_like(ids))
        corr = ridge_map(segment_moments(xa, left, ids, num_conditions), reg, cond_rank).to(xa.dtype)
        out = cls(xa.shape[1], xb.shape[1], num_conditions, base_rank, cond_rank, top_k=top_k,
                  temperature=temperature, device=xa.device, dtype=xa.dtype)
        with torch.no_grad():
            out.U0.copy_(m0.U[0]), out.V0.copy_(m0.V[0]), out.mu_x0.copy_(m0.mu_x[0]), out.mu_y0.copy_(m0.mu_y[0])
        out.residual = GatedMultiStitch.from_maps(corr, top_k=top_k, temperature=temperature)
        return out
