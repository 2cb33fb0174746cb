"""LoRA adapters carried between models of different families and widths (adapter transport).

An adapter on a linear layer W (out x in) is Delta W = s B A, A (r x in), B (out x r), s = alpha / r
(PEFT's LoRA). Model A's layer and model B's matched layer are related by maps fitted on shared anchor
inputs (:func:`anchor_map`): R_in (in_B x in_A) between their input spaces, R_out (out_B x out_A)
between their output spaces, so that

    Delta W_B = R_out Delta W_A R_in^T = (R_out s B_A)(A_A R_in^T),

which is again rank r: :func:`transport_lora` never forms a dense out x in product; it re-factors the
r x r core by an SVD when a smaller rank is asked for. :class:`LoRALinear` is the adapter module
(nn.Linear plus lora_A / lora_B, PEFT's parameter names); :func:`merge_adapter` adds alpha Delta W into
a model's weights and returns what :func:`unmerge_adapter` needs to restore them bit for bit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .ops import _validate
from .stats import moments_of_checked

__all__ = ["LoRALinear", "AnchorMap", "anchor_map", "roughness", "lora_delta", "transport_lora", "linear_weight"]


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / r) lora_B(lora_A(x)): a rank-r adapter beside a frozen linear layer.

    ``base``: an nn.Linear or a transformers Conv1D (GPT-2's projections, weight stored (in, out)).

    lora_A is Kaiming-uniform initialised and lora_B zero, as PEFT does, so a fresh adapter
    leaves the layer's output unchanged. Only the adapter's parameters require gradients.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float | None = None):
        super().__init__()
        out_features, in_features = linear_shape(base, "base")
        rank = _validate.integer("rank", rank, lo=1)
        alpha = float(rank) if alpha is None else _validate.positive("alpha", alpha)
        self.base, self.rank, self.alpha = base, rank, alpha
        self.base_requires_grad = [p.requires_grad for p in base.parameters()]  # restored by remove_lora
        for p in base.parameters():
            p.requires_grad_(False)
        w = base.weight
        self.lora_A = nn.Linear(in_features, rank, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B = nn.Linear(rank, out_features, bias=False, device=w.device, dtype=w.dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(x)) * self.scaling

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (r, in), s B (out, r)): Delta W = (s B) A, the scaling folded into B."""
        return self.lora_A.weight.detach(), self.lora_B.weight.detach() * self.scaling


def _is_conv1d(layer: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D, recognised by shape so that transformers stays optional
    w = getattr(layer, "weight", None)
    return (type(layer).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.dim() == 2
            and w.shape[1] == getattr(layer, "nf", None))


def linear_shape(layer: nn.Module, name: str = "layer") -> tuple[int, int]:
    """(out_features, in_features) of an nn.Linear or a transformers Conv1D; a TypeError naming ``name`` else."""
    if isinstance(layer, nn.Linear):
        return layer.out_features, layer.in_features
    if _is_conv1d(layer):
        return layer.nf, layer.weight.shape[0]
    raise TypeError(f"{name} must be an nn.Linear or a transformers Conv1D, got {type(layer).__name__}")


def linear_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as (out, in), Delta W's orientation: a view (Conv1D stores it transposed)."""
    linear_shape(layer)
    return layer.weight.T if _is_conv1d(layer) else layer.weight


def lora_delta(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """The dense Delta W = B A (out, in) of factors A (r, in), B (out, r) (for checks and merging)."""
    return B @ A


@dataclass
class AnchorMap:
    """A semi-orthogonal map R (d_b, d_a) with x_b ~ mu_b + (x_a - mu_a) R^T on the anchors, and its diagnostics.

    residual_mean / residual_max: the anchors' |x_b - map(x_a)| relative to the mean |x_b - mu_b|;
    reflection: whether the least-squares map was improper (det < 0 on the compared coordinates:
    all of them for equal widths, the first min(d_a, d_b) for different ones, tcfa.procrustes's
    padding convention); proper: whether R is the proper-rotation solution (the default).
    """
    R: torch.Tensor
    mu_a: torch.Tensor
    mu_b: torch.Tensor
    residual_mean: float
    residual_max: float
    reflection: bool
    proper: bool

    def __call__(self, x_a: torch.Tensor) -> torch.Tensor:
        return self.mu_b + (x_a - self.mu_a) @ self.R.T


def anchor_map(x_a, x_b, labels=None, num_segments=None, *, proper: bool = True, center: bool = True):
    """Orthogonal Procrustes between paired anchor activations x_a (n, d_a) and x_b (n, d_b).

    With the SVD (X_b - mu_b)^T (X_a - mu_a) = U S V^T (thin), R = U V^T. Its handedness is the sign
    of det(R_k), R_k the leading k x k block, k = min(d_a, d_b): a negative sign is a reflection (a
    chirality flip of the anchors' configuration). ``proper=True`` (default) returns the best proper
    map instead, R = U diag(1, ..., 1, -1) V^T (the smallest singular pair flipped, the classical
    Kabsch correction), and ``reflection`` reports what the unconstrained fit was.

    With ``labels`` (n,) int64 in [0, num_segments): one map per condition, each fitted on its own
    anchors (at least 2 each), returned as a list of AnchorMap; the per-condition cross-moments come
    from tcfa's segment_moments kernel in one call. Without labels: one AnchorMap.
    """
    x_a, x_b = _validate.paired_rows(x_a, x_b, "x_a", "x_b")
    per_condition = labels is not None
    if not per_condition:
        if num_segments not in (None, 1):
            raise ValueError(f"num_segments must be None or 1 when labels is None, got {num_segments}")
        num_segments, labels = 1, torch.zeros(x_a.shape[0], dtype=torch.int64, device=x_a.device)
    elif num_segments is None:
        raise ValueError("num_segments must be given with labels")
    num_segments = _validate.integer("num_segments", num_segments, lo=1)
    labels = _validate.labels("labels", labels, x_a.shape[0], num_segments)
    m = moments_of_checked(x_a, x_b, labels, num_segments, ("xy",))
    short = (m.count < 2).nonzero().flatten().tolist()
    if short:
        what = f"condition(s) {short}" if per_condition else "the map"
        raise ValueError(f"anchor_map needs at least 2 anchors per map, {what} got fewer (counts "
                         f"{m.count.tolist()})")
    cross, mu_a, mu_b = m.sxy, m.mean_x, m.mean_y  # cross: (C, d_a, d_b) = Xa_c^T Xb_c, centred
    if not center:
        cross = cross + m.count.to(cross.dtype)[:, None, None] * mu_a[:, :, None] * mu_b[:, None, :]
        mu_a, mu_b = torch.zeros_like(mu_a), torch.zeros_like(mu_b)
    V, _, Uh = torch.linalg.svd(cross, full_matrices=False)  # cross^T = U S V^T
    R = Uh.mT @ V.mT
    k = min(x_a.shape[1], x_b.shape[1])
    reflection = torch.linalg.det(R[:, :k, :k]) < 0
    if proper and bool(reflection.any()):
        flip = torch.ones(num_segments, V.shape[-1], dtype=R.dtype, device=R.device)
        flip[:, -1] = torch.where(reflection, -1.0, 1.0).to(R.dtype)
        R = (Uh.mT * flip[:, None, :]) @ V.mT
    maps = []
    for c in range(num_segments):
        rows = labels == c
        xa, xb = x_a[rows] - mu_a[c], x_b[rows] - mu_b[c]
        res = (xb - xa @ R[c].T).norm(dim=1)
        scale = xb.norm(dim=1).mean().clamp_min(torch.finfo(xb.dtype).tiny)
        maps.append(AnchorMap(R[c], mu_a[c], mu_b[c], float(res.mean() / scale), float(res.max() / scale),
                              bool(reflection[c]), proper))
    return maps if per_condition else maps[0]


def roughness(R: torch.Tensor, R_prev: torch.Tensor) -> float:
    """|R - R_prev|_F / |R_prev|_F: how much a map turns from one layer to its neighbour (0: the same map;
    about sqrt(2) between unrelated rotations of a large space)."""
    if R.shape != R_prev.shape:
        raise ValueError(f"roughness compares maps of one shape, got {tuple(R.shape)} and {tuple(R_prev.shape)}")
    return float((R - R_prev).norm() / R_prev.norm().clamp_min(torch.finfo(R.dtype).tiny))


def transport_lora(adapter: dict, maps: dict, *, rank: int | None = None) -> dict:
    """Model A's adapter carried to model B: {path_b: (A_b (k, in_b), B_b (out_b, k))}.

    ``adapter``: {path_a: (A (r, in_a), B (out_a, r))} with the scaling folded into B
    (:meth:`LoRALinear.factors`). ``maps``: {path_a: (path_b, R_in, R_out)}, R_in (in_b, in_a) and
    R_out (out_b, out_a) (e.g. :func:`anchor_map` ``.R`` of the layer's inputs and outputs).
    Delta W_B = R_out Delta W_A R_in^T. ``rank`` (default: the adapter's) at most the adapter's rank:
    B' = R_out B and A'^T = R_in A^T are QR-factored, the core R_1 R_2^T is SVD-truncated to
    ``rank`` and split evenly between the factors (best rank-k approximation of Delta W_B). Delta W_B
    has rank at most min(in_b, out_b): a k above it keeps the factors' shapes, with zero rows of A_b
    and columns of B_b past that rank. The product is formed in the wider of the adapter's and the
    maps' dtypes and returned in the adapter's.
    """
    if not isinstance(adapter, dict) or not adapter:
        raise ValueError("adapter must be a non-empty dict {path_a: (A, B)}")
    if not isinstance(maps, dict):
        raise TypeError(f"maps must be a dict {{path_a: (path_b, R_in, R_out)}}, got {type(maps).__name__}")
    missing = sorted(set(adapter) - set(maps))
    if missing:
        raise ValueError(f"maps has no layer pair for adapted layer(s) {missing}; pairs given for {sorted(maps)}")
    out = {}
    for path_a, (A, B) in adapter.items():
        path_b, R_in, R_out = maps[path_a]
        A = _validate.tensor(f"adapter[{path_a!r}] A", A, dim=2)
        B = _validate.tensor(f"adapter[{path_a!r}] B", B, dim=2)
        R_in = _validate.tensor(f"maps[{path_a!r}] R_in", R_in, dim=2)
        R_out = _validate.tensor(f"maps[{path_a!r}] R_out", R_out, dim=2)
        r = A.shape[0]
        if B.shape[1] != r:
            raise ValueError(f"adapter[{path_a!r}] must be (A (r, in), B (out, r)), got {tuple(A.shape)} and "
                             f"{tuple(B.shape)}")
        if R_in.shape[1] != A.shape[1] or R_out.shape[1] != B.shape[0]:
            raise ValueError(f"maps[{path_a!r}]: R_in must be (in_b, {A.shape[1]}) and R_out (out_b, {B.shape[0]}), "
                             f"got {tuple(R_in.shape)} and {tuple(R_out.shape)} (a width mismatch with no map)")
        k = r if rank is None else _validate.integer("rank", rank, lo=1)
        if k > r:
            raise ValueError(f"rank must be at most the adapter's rank {r} for {path_a!r}, got {k}")
        # in the wider of the two dtypes (maps fitted in fp64 carry fp32 adapters), returned in the adapter's
        wide = torch.promote_types(torch.promote_types(A.dtype, B.dtype), torch.promote_types(R_in.dtype, R_out.dtype))
        Bp, Ap = R_out.to(wide) @ B.to(wide), A.to(wide) @ R_in.to(wide).T  # (out_b, r), (r, in_b)
        Q1, T1 = torch.linalg.qr(Bp)
        Q2, T2 = torch.linalg.qr(Ap.T)
        U, S, Vh = torch.linalg.svd(T1 @ T2.T)  # (min(out_b, r), min(in_b, r)): S holds the reachable ranks
        root = S[:k].sqrt()
        a_b = Ap.new_zeros(k, Ap.shape[1])
        b_b = Bp.new_zeros(Bp.shape[0], k)
        a_b[:root.numel()] = (Q2 @ Vh[:root.numel()].T * root).T
        b_b[:, :root.numel()] = Q1 @ U[:, :root.numel()] * root
        out[path_b] = (a_b.to(A.dtype), b_b.to(B.dtype))
    return out
