"""Conditioned maps that share most of their parameters: SharedBasisStitch (M_c = M_0 + Delta_c) and
ScaledBasisStitch (M_c = U diag(s_c) V).

SharedBasisStitch:

    h(x) = mu_y0 + (x - mu_x0) U_0 V_0 + sum_c g_c(x) (mu_y[c] + (x - mu_x[c]) dU_c dV_c)

M_0 (rank r_0) is one map for every row; each condition adds a low-rank correction of rank r_c fitted
on what M_0 leaves, mixed by the same gate as GatedMultiStitch (whose fused op computes the sum). It
costs r_0 (dx + dy) + dx + dy + C (r_c (dx + dy) + dx + dy + dx + 1) parameters, against
C (r (dx + dy) + dx + dy + dx + 1) for C independent rank-r maps: conditioning at a small premium.

ScaledBasisStitch, the cheapest conditioning of a rank-r map: one basis, per-condition singular values,

    h(x) = mu_y + ((x - mu_x) U * (g(x) S)) V          (* elementwise; S (C, r), row c is s_c)

so that for a hard gate on condition c, h(x) = mu_y + (x - mu_x) U diag(s_c) V. It costs
r (dx + dy) + dx + dy + C r + C (dx + 1) parameters: C (r + dx + 1) over one unconditioned rank-r map.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from . import artifacts
from .linear_maps import cca_maps, ridge_map
from .ops import _validate
from .stats import segment_moments
from .stitch import GatedMultiStitch, centroid_gate

__all__ = ["SharedBasisStitch", "ScaledBasisStitch"]


class _SavedStitch:
    """save/load for a stitch module built from its ``config()``: its state_dict as a verified artifact
    (tcfa.artifacts), the config in the header; load checks every shape against a module built from
    that config (on the meta device) before copying anything."""

    def save(self, path: str, *, method: str | None = None, layers=None, conditions=None) -> None:
        """Writes the parameters atomically (safetensors); ``method``, ``layers`` and ``conditions``
        record where the stitch came from."""
        artifacts.save(path, dict(self.state_dict()), kind=type(self).__name__, method=method, layers=layers,
                       conditions=conditions, config=self.config())

    @classmethod
    def load(cls, path: str, device=None):
        """The module saved at ``path`` by :meth:`save`; hashes and shapes are verified first."""
        art = artifacts.load(path, kind=cls.__name__)
        shapes = {name: tuple(t.shape) for name, t in art.build(cls, device="meta").state_dict().items()}
        art.check_shapes(shapes)
        stitch = art.build(cls, device=device, dtype=next(iter(art.tensors.values())).dtype)
        stitch.load_state_dict({name: art.tensors[name] for name in shapes})
        return stitch


def _base_map(xa, xb, rank: int, base: str, reg: float):
    """The unconditioned rank-``rank`` map of all rows (LowRankMaps with one map), by CCA or ridge."""
    base = _validate.choice("base", base, ("cca", "ridge"))
    one = segment_moments(xa, xb, torch.zeros(xa.shape[0], dtype=torch.long, device=xa.device), 1)
    return (cca_maps(one, rank, reg) if base == "cca" else ridge_map(one, reg, rank)).to(xa.dtype)


class SharedBasisStitch(_SavedStitch, nn.Module):
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

    def config(self) -> dict:
        r = self.residual
        return {"dx": self.dx, "dy": self.dy, "num_conditions": r.num_conditions, "base_rank": self.U0.shape[1],
                "cond_rank": r.rank, "top_k": r.top_k, "temperature": r.temperature}

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
        ids = _validate.labels("ids", ids, xa.shape[0], num_conditions)
        base_rank, cond_rank = _validate.integer("base_rank", base_rank, lo=1), _validate.integer("cond_rank", cond_rank, lo=1)
        m0 = _base_map(xa, xb, base_rank, base, reg)
        left = xb - m0.apply(xa, torch.zeros_like(ids))
        corr = ridge_map(segment_moments(xa, left, ids, num_conditions), reg, cond_rank).to(xa.dtype)
        out = cls(xa.shape[1], xb.shape[1], num_conditions, base_rank, cond_rank, top_k=top_k,
                  temperature=temperature, device=xa.device, dtype=xa.dtype)
        with torch.no_grad():
            out.U0.copy_(m0.U[0]), out.V0.copy_(m0.V[0]), out.mu_x0.copy_(m0.mu_x[0]), out.mu_y0.copy_(m0.mu_y[0])
        out.residual = GatedMultiStitch.from_maps(corr, top_k=top_k, temperature=temperature)
        return out


class ScaledBasisStitch(_SavedStitch, nn.Module):
    """One rank-r basis (U, V) whose r directions are rescaled per condition (S), mixed by a gate.

    Parameters: ``U`` (dx, r), ``V`` (r, dy), ``mu_x`` (dx,), ``mu_y`` (dy,), ``scales`` S (C, r),
    ``gate_weight`` (dx, C), ``gate_bias`` (C,). Gates as ``tcfa.ops.gated_stitch``'s: softmax of
    (x W_g + b_g) / temperature over all C conditions, or over the top_k largest logits (0 elsewhere).
    """

    def __init__(self, dx: int, dy: int, num_conditions: int, rank: int, *, top_k=None, temperature: float = 1.0,
                 device=None, dtype=None):
        super().__init__()
        dx, dy = _validate.integer("dx", dx, lo=1), _validate.integer("dy", dy, lo=1)
        C, rank = _validate.integer("num_conditions", num_conditions, lo=1), _validate.integer("rank", rank, lo=1)
        self.top_k = _validate.top_k("top_k", top_k, C)
        self.temperature = _validate.positive("temperature", temperature)
        f = {"device": device, "dtype": dtype}
        self.U = nn.Parameter(torch.randn(dx, rank, **f) / math.sqrt(dx))
        self.V = nn.Parameter(torch.randn(rank, dy, **f) / math.sqrt(rank))
        self.mu_x = nn.Parameter(torch.zeros(dx, **f))
        self.mu_y = nn.Parameter(torch.zeros(dy, **f))
        self.scales = nn.Parameter(torch.ones(C, rank, **f))
        self.gate_weight = nn.Parameter(torch.zeros(dx, C, **f))
        self.gate_bias = nn.Parameter(torch.zeros(C, **f))

    def config(self) -> dict:
        return {"dx": self.U.shape[0], "dy": self.V.shape[1], "num_conditions": self.scales.shape[0],
                "rank": self.U.shape[1], "top_k": self.top_k, "temperature": self.temperature}

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C) gates of rows x (N, dx)."""
        logits = (x @ self.gate_weight + self.gate_bias) / self.temperature
        if self.top_k is None:
            return torch.softmax(logits, dim=-1)
        top, index = logits.topk(self.top_k, dim=-1)
        return torch.zeros_like(logits).scatter(-1, index, torch.softmax(top, dim=-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _validate.tensor("x", x, finite=False)
        dx = self.U.shape[0]
        if x.dim() < 1 or x.shape[-1] != dx:
            raise ValueError(f"x must have shape (..., {dx}), got {tuple(x.shape)}")
        return self.mu_y + (((x - self.mu_x) @ self.U) * (self.gates(x) @ self.scales)) @ self.V

    @classmethod
    def fit(cls, xa: torch.Tensor, xb: torch.Tensor, ids: torch.Tensor, num_conditions: int, *, rank: int,
            base: str = "cca", reg: float = 1e-3, top_k=None, temperature: float = 1.0) -> "ScaledBasisStitch":
        """U, V, mu_x, mu_y: the unconditioned rank-``rank`` map of all rows (``base`` "cca" or "ridge").
        s_c: least squares of condition c's rows with the basis fixed, shrunk towards 1 (the pooled map),

            s_c = argmin_s |T_c - Z_c diag(s) V|^2 + lam |s - 1|^2,   Z_c = (X_c - mu_x) U,  T_c = Y_c - mu_y
                = (Z_c^T Z_c o V V^T + lam I)^-1 (diag(Z_c^T T_c V^T) + lam 1),   lam = reg tr(Z_c^T Z_c o V V^T) / r

        (o elementwise; a condition with no rows keeps s_c = 1). Gate: nearest condition centroid of A."""
        xa, xb = _validate.paired_rows(xa, xb, "xa", "xb")
        ids = _validate.labels("ids", ids, xa.shape[0], num_conditions)
        reg, rank = _validate.nonnegative("reg", reg), _validate.integer("rank", rank, lo=1)
        m = _base_map(xa, xb, rank, base, reg)
        U, V, mu_x, mu_y = m.U[0], m.V[0], m.mu_x[0], m.mu_y[0]
        r = U.shape[1]
        # the (C, r, r) normal equations in fp64: n_c rows summed, r is small
        z, tv = ((xa - mu_x) @ U).double(), ((xb - mu_y) @ V.t()).double()
        C = num_conditions
        zz = z.new_zeros(C, r, r).index_add_(0, ids, z[:, :, None] * z[:, None, :])
        A = zz * (V @ V.t()).double()
        rhs = z.new_zeros(C, r).index_add_(0, ids, z * tv)
        lam = reg * A.diagonal(dim1=1, dim2=2).sum(1) / r
        eye = torch.eye(r, dtype=A.dtype, device=A.device)
        # pinv: a condition with fewer rows than r (or reg 0) has a singular system; its minimum-norm solution
        scales = (torch.linalg.pinv(A + lam[:, None, None] * eye) @ (rhs + lam[:, None])[..., None])[..., 0]
        count = torch.bincount(ids, minlength=C)
        scales[count == 0] = 1.0
        centroids = torch.zeros(C, xa.shape[1], dtype=xa.dtype, device=xa.device).index_add_(0, ids, xa)
        centroids = centroids / count.clamp_min(1)[:, None].to(xa.dtype)
        out = cls(xa.shape[1], xb.shape[1], C, r, top_k=top_k, temperature=temperature, device=xa.device,
                  dtype=xa.dtype)
        with torch.no_grad():
            for name, value in zip(("U", "V", "mu_x", "mu_y", "scales"), (U, V, mu_x, mu_y, scales.to(xa.dtype))):
                getattr(out, name).copy_(value)
            weight, bias = centroid_gate(centroids)
            out.gate_weight.copy_(weight), out.gate_bias.copy_(bias)
        return out
