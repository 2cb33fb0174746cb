"""Baselines TCFA is compared with.

- The individual models A and B (evaluated as they are: see tcfa/pipeline/evaluate.py).
- Unconditioned stitches: TCFA with one condition (``TCFA(..., conditions=1)``).
- Weight-space merges, defined only for two models of the same architecture (identical
  parameter names and shapes): ``weight_average`` and ``ties_merge``. For a cross-architecture
  pair ``merge_applicability`` says why they do not apply.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..ops import _validate


def merge_applicability(model_a: nn.Module, model_b: nn.Module) -> tuple[bool, str]:
    """(True, "") when the two models' parameters match by name and shape, else (False, reason)."""
    pa, pb = dict(model_a.named_parameters()), dict(model_b.named_parameters())
    if type(model_a) is not type(model_b):
        return False, (f"not applicable: different architectures ({type(model_a).__name__} vs "
                       f"{type(model_b).__name__}); weight-space merging needs a one-to-one match of parameters")
    if pa.keys() != pb.keys():
        return False, "not applicable: the models' parameter names differ"
    bad = [k for k in pa if pa[k].shape != pb[k].shape]
    if bad:
        return False, f"not applicable: parameter {bad[0]} has shapes {tuple(pa[bad[0]].shape)} vs {tuple(pb[bad[0]].shape)}"
    return True, ""


def _require_mergeable(models) -> None:
    if len(models) < 2:
        raise ValueError(f"models must hold at least 2 models, got {len(models)}")
    for i, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise TypeError(f"models[{i}] must be an nn.Module, got {type(m).__name__}")
        ok, why = merge_applicability(models[0], m)
        if not ok:
            raise ValueError(f"models[{i}] cannot be merged with models[0]: {why}")


def weight_average(models, weights=None) -> nn.Module:
    """A copy of models[0] whose floating-point parameters and buffers are the (weighted) mean."""
    _require_mergeable(models)
    w = torch.full((len(models),), 1.0 / len(models)) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
    if w.shape != (len(models),) or not bool((w >= 0).all()) or float(w.sum()) <= 0:
        raise ValueError(f"weights must be {len(models)} non-negative numbers with a positive sum, got {weights!r}")
    w = w / w.sum()
    out = copy.deepcopy(models[0])
    states = [m.state_dict() for m in models]
    merged = {}
    for k, v in states[0].items():
        # integer buffers (BatchNorm's num_batches_tracked) are counters, not weights: keep A's
        merged[k] = sum(float(wi) * s[k] for wi, s in zip(w, states)) if v.is_floating_point() else v
    out.load_state_dict(merged)
    return out


def ties_merge(base: nn.Module, models, density: float = 0.2, scale: float = 1.0) -> nn.Module:
    """TIES-merging (Yadav et al. 2023) of fine-tuned ``models`` sharing the start point ``base``.

    Per floating-point tensor, with task vectors tau_i = theta_i - theta_base:
    1. trim: keep each tau_i's top ``density`` fraction of entries by magnitude, zero the rest;
    2. elect sign: s = sign(sum_i trimmed tau_i) (the sign of the larger total mass);
    3. disjoint mean: average, per entry, only the trimmed tau_i whose sign agrees with s
       (entries where none agree stay 0);
    theta = theta_base + scale * merged tau.
    """
    if not isinstance(base, nn.Module):
        raise TypeError(f"base must be an nn.Module, got {type(base).__name__}")
    models = list(models)
    _require_mergeable([base, *models])
    if not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    scale = _validate.nonnegative("scale", scale)
    base_state = base.state_dict()
    states = [m.state_dict() for m in models]
    merged = {}
    for k, b in base_state.items():
        if not b.is_floating_point():
            merged[k] = states[0][k]
            continue
        tau = torch.stack([s[k] - b for s in states]).flatten(1)  # (M, numel)
        keep = max(1, int(round(density * tau.shape[1])))
        thresh = tau.abs().topk(keep, dim=1).values[:, -1:]  # per task vector
        trimmed = torch.where(tau.abs() >= thresh, tau, torch.zeros_like(tau))
        sign = torch.sign(trimmed.sum(0))
        agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
        count = agree.sum(0).clamp_min(1)
        merged[k] = b + scale * ((trimmed * agree).sum(0) / count).view_as(b)
    out = copy.deepcopy(base)
    out.load_state_dict(merged)
    return out
