"""LowRankMaps: the one type every per-condition alignment map is returned as.

Condition c maps a row x of model A's activations to model B's space by

    T_c(x) = mu_y[c] + (x - mu_x[c]) @ U[c] @ V[c],   U (C, dx, r), V (C, r, dy).

CCA, ridge, Procrustes and OT fits all produce this form; the gated stitch
(tcfa.GatedMultiStitch.from_maps) is initialised from it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .ops import _validate


class LowRankShape:
    """Shape properties of anything holding per-condition factors U (C, dx, r) and V (C, r, dy)."""

    @property
    def dx(self) -> int:
        return self.U.shape[1]

    @property
    def dy(self) -> int:
        return self.V.shape[2]

    @property
    def num_conditions(self) -> int:
        return self.U.shape[0]

    @property
    def rank(self) -> int:
        return self.U.shape[2]


@dataclass
class LowRankMaps(LowRankShape):
    U: torch.Tensor  # (C, dx, r)
    V: torch.Tensor  # (C, r, dy)
    mu_x: torch.Tensor  # (C, dx)
    mu_y: torch.Tensor  # (C, dy)

    def apply(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Maps every row x_i with its condition's map T_{labels_i}; returns (N, dy) in the wider of x's
        and the maps' dtypes (fp32 activations through maps fitted in fp64 come out fp64, and back)."""
        x = _validate.tensor("x", x, dim=2)
        if x.shape[1] != self.U.shape[1]:
            raise ValueError(f"x must have width {self.U.shape[1]}, got {x.shape[1]}")
        labels = _validate.labels("labels", labels, x.shape[0], self.num_conditions)
        wide = torch.promote_types(x.dtype, self.U.dtype)
        U, V, mu_x, mu_y = (t[labels].to(wide) for t in (self.U, self.V, self.mu_x, self.mu_y))
        z = torch.bmm((x.to(wide) - mu_x).unsqueeze(1), U).squeeze(1)
        return mu_y + torch.bmm(z.unsqueeze(1), V).squeeze(1)

    def to(self, *args, **kwargs) -> "LowRankMaps":
        return LowRankMaps(*(t.to(*args, **kwargs) for t in (self.U, self.V, self.mu_x, self.mu_y)))
