"""GatedMultiStitch: the trainable stitching layer, h = sum_c gate_c(x) * M_c(x).

The math is tcfa.ops.gated_stitch (one place); this module holds its
parameters, initialises them from per-condition alignment maps, counts them,
and saves/loads them as verified safetensors artifacts (tcfa.artifacts).
"""
from __future__ import annotations

import json
import math

import torch
from torch import nn

from . import artifacts, ops
from .ops import _validate
from .maps import LowRankMaps, LowRankShape

_PARAMS = ("gate_weight", "gate_bias", "U", "V", "mu_x", "mu_y")


def centroid_gate(centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate parameters (W_g (dx, C), b_g (C,)) whose logits x W_g + b_g = 2 x.m_c - |m_c|^2 rank the
    (C, dx) centroids m_c by distance: the softmax of them is softmax(-|x - m_c|^2), since |x|^2 cancels."""
    return 2 * centroids.t(), -(centroids * centroids).sum(1)


class GatedMultiStitch(nn.Module, LowRankShape):
    """A gate over C conditions mixing C low-rank affine maps from width dx to dy.

    Parameters: ``gate_weight`` (dx, C), ``gate_bias`` (C,), ``U`` (C, dx, r),
    ``V`` (C, r, dy), ``mu_x`` (C, dx), ``mu_y`` (C, dy). ``top_k=None`` mixes
    all C maps (dense); ``top_k=k`` evaluates only the k best-gated maps of
    each row (routed). Inputs may have leading batch dimensions: (..., dx).

    A fresh module has random U ~ N(0, 1/dx), V ~ N(0, 1/r) and gate weights
    ~ N(0, 1/dx), zero biases and means; :meth:`from_maps` starts it from fitted
    alignment maps instead.
    """

    def __init__(self, dx: int, dy: int, num_conditions: int, rank: int, top_k: int | None = None,
                 temperature: float = 1.0, *, device=None, dtype=None):
        super().__init__()
        for name, v in (("dx", dx), ("dy", dy), ("num_conditions", num_conditions), ("rank", rank)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.top_k = _validate.top_k("top_k", top_k, num_conditions)
        self.temperature = _validate.positive("temperature", temperature)
        f = {"device": device, "dtype": dtype}
        C = num_conditions
        self.gate_weight = nn.Parameter(torch.randn(dx, C, **f) / math.sqrt(dx))
        self.gate_bias = nn.Parameter(torch.zeros(C, **f))
        self.U = nn.Parameter(torch.randn(C, dx, rank, **f) / math.sqrt(dx))
        self.V = nn.Parameter(torch.randn(C, rank, dy, **f) / math.sqrt(rank))
        self.mu_x = nn.Parameter(torch.zeros(C, dx, **f))
        self.mu_y = nn.Parameter(torch.zeros(C, dy, **f))

    def config(self) -> dict:
        return {"dx": self.dx, "dy": self.dy, "num_conditions": self.num_conditions, "rank": self.rank,
                "top_k": self.top_k, "temperature": self.temperature}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config().items())

    def num_trainable(self) -> int:
        """Δθ: the number of trainable scalars (parameters with requires_grad)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # ------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *, return_aux_loss: bool = False):
        """out = tcfa.ops.gated_stitch(x, ...) over the last dimension of x.

        With ``return_aux_loss=True`` (routed mode only) also returns the
        Switch-Transformer load-balancing loss

            aux = C * sum_c f_c * P_c,

        f_c the fraction of the N*k routing slots that chose condition c (no
        gradient) and P_c the mean over rows of the full softmax(logits / tau)
        probability of c (differentiable). It is 1 when routing is uniform and
        grows as it collapses onto few conditions; add ``alpha * aux`` (Switch
        uses alpha = 0.01) to the training loss.
        """
        x = _validate.tensor("x", x, finite=False)  # ops.gated_stitch checks the values once
        if x.dim() < 1 or x.shape[-1] != self.dx:
            raise ValueError(f"x must have shape (..., {self.dx}), got {tuple(x.shape)}")
        rows = x.reshape(-1, self.dx)
        if return_aux_loss and self.top_k is None:
            raise ValueError("return_aux_loss needs routed mode (top_k set): dense mode has no routing to balance")
        out, _, index = ops.gated_stitch(rows, self.gate_weight, self.gate_bias, self.U, self.V, self.mu_x,
                                         self.mu_y, self.top_k, self.temperature, return_routing=True)
        out = out.reshape(*x.shape[:-1], self.dy)
        if not return_aux_loss:
            return out
        C = self.num_conditions
        probs = torch.softmax((rows @ self.gate_weight + self.gate_bias) / self.temperature, dim=1)
        frac = torch.bincount(index.reshape(-1), minlength=C).to(probs.dtype) / max(index.numel(), 1)
        return out, C * (frac * probs.mean(0)).sum()

    # ------------------------------------------------------------ initialisation
    @classmethod
    def from_maps(cls, maps: LowRankMaps, gate="centroids", top_k: int | None = None,
                  temperature: float = 1.0) -> "GatedMultiStitch":
        """A stitch whose map c is ``maps``' T_c and whose gate picks the nearest centroid.

        ``gate``: "centroids" uses the conditions' x means ``maps.mu_x`` as
        centroids m_c; a (C, dx) tensor gives them explicitly; "uniform" starts
        with equal gates (zero gate parameters). Nearest-centroid logits
        2 x.m_c - |m_c|^2 = |x|^2 - |x - m_c|^2 (|x|^2 is the same for every c,
        so it cancels in the softmax) give W_g = 2 m^T, b_g = -|m_c|^2, and
        gates softmax(-|x - m_c|^2 / tau): lower temperature, harder routing.
        """
        if not isinstance(maps, LowRankMaps):
            raise TypeError(f"maps must be a tcfa.maps.LowRankMaps, got {type(maps).__name__}")
        U = _validate.tensor("maps.U", maps.U, dim=3)
        C, dx, r = U.shape
        dy = _validate.tensor("maps.V", maps.V, dim=3).shape[2]
        if isinstance(gate, str):
            _validate.choice("gate", gate, ("centroids", "uniform"))
            centroids = maps.mu_x if gate == "centroids" else None
        else:
            centroids = _validate.tensor("gate", gate, dim=2)
            if tuple(centroids.shape) != (C, dx):
                raise ValueError(f"gate centroids must have shape ({C}, {dx}), got {tuple(centroids.shape)}")
        if centroids is None:
            weight, bias = torch.zeros(dx, C, dtype=U.dtype, device=U.device), torch.zeros(C, dtype=U.dtype, device=U.device)
        else:
            weight, bias = centroid_gate(centroids.to(U))
        # The op's checks name any bad map shape (V, mu_x, mu_y) before anything is built.
        _validate.stitch_args(torch.zeros(0, dx, dtype=U.dtype, device=U.device), weight, bias, U, maps.V,
                              maps.mu_x, maps.mu_y, top_k, temperature)
        stitch = cls(dx, dy, C, r, top_k=top_k, temperature=temperature, device=U.device, dtype=U.dtype)
        with torch.no_grad():
            for name, value in zip(_PARAMS, (weight, bias, U, maps.V, maps.mu_x, maps.mu_y)):
                getattr(stitch, name).copy_(value)
        return stitch

    # ------------------------------------------------------------ persistence
    @staticmethod
    def _shapes(cfg: dict) -> dict:
        """Every parameter's shape implied by a config (what a saved file must hold)."""
        C, dx, dy, r = cfg["num_conditions"], cfg["dx"], cfg["dy"], cfg["rank"]
        return {"gate_weight": (dx, C), "gate_bias": (C,), "U": (C, dx, r), "V": (C, r, dy),
                "mu_x": (C, dx), "mu_y": (C, dy)}

    def save(self, path: str, *, method: str | None = None, layers=None, conditions=None) -> None:
        """Writes the parameters atomically as a verified tcfa artifact (safetensors).

        The config rides in the JSON header (also under the plain key
        "tcfa.GatedMultiStitch"); ``method``, ``layers`` and ``conditions``
        record where the stitch came from. See :mod:`tcfa.artifacts`.
        """
        tensors = {name: getattr(self, name) for name in _PARAMS}
        artifacts.save(path, tensors, kind="GatedMultiStitch", method=method, layers=layers,
                       conditions=conditions, config=self.config(),
                       extra_metadata={"tcfa.GatedMultiStitch": json.dumps(self.config())})

    @classmethod
    def load(cls, path: str, device=None) -> "GatedMultiStitch":
        """The module saved at ``path`` by :meth:`save`; hashes and shapes are verified first."""
        art = artifacts.load(path, kind="GatedMultiStitch")
        cfg = art.config
        missing = {"dx", "dy", "num_conditions", "rank"} - set(cfg)
        if missing:
            raise ValueError(f"{path}: the header's config lacks {sorted(missing)}")
        art.check_shapes(cls._shapes(cfg))
        stitch = art.build(cls, device=device, dtype=art.tensors["U"].dtype)
        with torch.no_grad():
            for name in _PARAMS:
                getattr(stitch, name).copy_(art.tensors[name])
        return stitch
