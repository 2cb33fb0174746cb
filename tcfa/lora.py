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

__all__ = ["LoRALinear", "AnchorMap", "anchor_map", "lora_delta", "transport_lora"]


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / r) lora_B(lora_A(x)): a rank-r adapter beside a frozen nn.Linear.

    lora_A is Kaiming-uniform initialised and lora_B zero, as PEFT does, so a fresh adapter
    leaves the layer's output unchanged. Only the adapter's parameters require gradients.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be an nn.Linear, got {type(base).__name__}")
        rank = _validate.integer("rank", rank, lo=1)
        alpha = float(rank if alpha is None else alpha)
        self.base, self.rank, self.alpha = base, rank, alpha
        for p in base.parameters():
            p.requires_grad_(False)
        w = base.weight
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=w.device, dtype=w.dtype)
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


def anchor_map(x_a, x_b, *, proper: bool = True, center: bool = True) -> AnchorMap:
    """Orthogonal Procrustes between paired anchor activations x_a (n, d_a) and x_b (n, d_b).

    With the SVD (X_b - mu_b)^T (X_a - mu_a) = U S V^T (thin), R = U V^T. Its handedness is the sign
    of det(R_k), R_k the leading k x k block, k = min(d_a, d_b): a negative sign is a reflection (a
    chirality flip of the anchors' configuration). ``proper=True`` (default) returns the best proper
    map instead, R = U diag(1, ..., 1, -1) V^T (the smallest singular pair flipped, the classical
    Kabsch correction), and ``reflection`` reports what the unconstrained fit was.
    """
    x_a, x_b = _validate.paired_rows(x_a, x_b)
    n, d_a, d_b = x_a.shape[0], x_a.shape[1], x_b.shape[1]
    if n < 2:
        raise ValueError(f"anchor_map needs at least 2 anchors, got {n}")
    mu_a = x_a.mean(0) if center else torch.zeros(d_a, dtype=x_a.dtype, device=x_a.device)
    mu_b = x_b.mean(0) if center else torch.zeros(d_b, dtype=x_b.dtype, device=x_b.device)
    xa, xb = x_a - mu_a, x_b - mu_b
    U, _, Vh = torch.linalg.svd(xb.T @ xa, full_matrices=False)
    k = min(d_a, d_b)
    R = U @ Vh
    reflection = bool(torch.linalg.det(R[:k, :k]) < 0)
    if proper and reflection:
        flip = torch.ones(U.shape[1], dtype=U.dtype, device=U.device)
        flip[-1] = -1
        R = (U * flip) @ Vh
    res = (xb - xa @ R.T).norm(dim=1)
    scale = xb.norm(dim=1).mean().clamp_min(torch.finfo(xb.dtype).tiny)
    return AnchorMap(R, mu_a, mu_b, float(res.mean() / scale), float(res.max() / scale), reflection, proper)


def transport_lora(adapter: dict, maps: dict, *, rank: int | None = None) -> dict:
    """Model A's adapter carried to model B: {path_b: (A_b (k, in_b), B_b (out_b, k))}.

    ``adapter``: {path_a: (A (r, in_a), B (out_a, r))} with the scaling folded into B
    (:meth:`LoRALinear.factors`). ``maps``: {path_a: (path_b, R_in, R_out)}, R_in (in_b, in_a) and
    R_out (out_b, out_a) (e.g. :func:`anchor_map` ``.R`` of the layer's inputs and outputs).
    Delta W_B = R_out Delta W_A R_in^T. ``rank`` (default: the adapter's) at most the adapter's rank:
    B' = R_out B and A'^T = R_in A^T are QR-factored, the r x r core R_1 R_2^T is SVD-truncated to
    ``rank`` and split evenly between the factors (best rank-k approximation of Delta W_B).
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
        r = A.shape[0]
        if A.dim() != 2 or B.dim() != 2 or B.shape[1] != r:
            raise ValueError(f"adapter[{path_a!r}] must be (A (r, in), B (out, r)), got {tuple(A.shape)} and "
                             f"{tuple(B.shape)}")
        if R_in.shape[1] != A.shape[1] or R_out.shape[1] != B.shape[0]:
            raise ValueError(f"maps[{path_a!r}]: R_in must be (in_b, {A.shape[1]}) and R_out (out_b, {B.shape[0]}), "
                             f"got {tuple(R_in.shape)} and {tuple(R_out.shape)} (a width mismatch with no map)")
        k = r if rank is None else _validate.integer("rank", rank, lo=1)
        if k > r:
            raise ValueError(f"rank must be at most the adapter's rank {r} for {path_a!r}, got {k}")
        Bp, Ap = R_out @ B, A @ R_in.T  # (out_b, r), (r, in_b)
        Q1, T1 = torch.linalg.qr(Bp)
        Q2, T2 = torch.linalg.qr(Ap.T)
        U, S, Vh = torch.linalg.svd(T1 @ T2.T)
        root = S[:k].sqrt()
        out[path_b] = ((Q2 @ Vh[:k].T * root).T.contiguous(), (Q1 @ U[:, :k] * root).contiguous())
    return out
