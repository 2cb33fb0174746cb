"""Adapters on whole models: LoRA layers put in place, PEFT-named safetensors files, merge and unmerge.

The math (factors, transport between models) is tcfa/lora.py's. Files follow PEFT's layout so that a
user's adapters round-trip: a directory with ``adapter_model.safetensors`` holding
``base_model.model.<path>.lora_A.weight`` (r, in) and ``...lora_B.weight`` (out, r), and
``adapter_config.json`` with ``r``, ``lora_alpha``, ``target_modules`` and ``peft_type: "LORA"``.
"""
from __future__ import annotations

import json
import math
import os

import torch
from torch import nn

from ..lora import LoRALinear, linear_shape, linear_weight, lora_delta
from .models import get_module

__all__ = ["add_lora", "attach_adapter", "remove_lora", "adapter_factors", "save_adapter", "load_adapter", "merge_adapter", "unmerge_adapter"]

_PREFIX = "base_model.model."


def add_lora(model: nn.Module, paths, rank: int, alpha: float | None = None) -> dict:
    """Replaces the linear layer (nn.Linear or transformers Conv1D) at each path of ``model`` by a
    :class:`LoRALinear` around it; returns them {path: LoRALinear}."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    if not paths:
        raise ValueError("paths must name at least one nn.Linear")
    layers = {}
    for path in paths:
        layer = get_module(model, path)
        linear_shape(layer, f"the layer at path {path!r}")
        layers[path] = layer
    out = {}
    for path, layer in layers.items():
        parent_path, _, name = path.rpartition(".")
        out[path] = LoRALinear(layer, rank, alpha)
        setattr(get_module(model, parent_path), name, out[path])
    return out


def attach_adapter(model: nn.Module, factors: dict, alpha: float = 1.0) -> dict:
    """Puts {path: (A, B)} on ``model`` as side branches (LoRALinear, y = base(x) + alpha B A x) instead of
    merging them; :func:`remove_lora` takes them off. Returns {path: LoRALinear}."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha!r}")
    for path, (A, B) in factors.items():
        out_f, in_f = linear_shape(get_module(model, path), f"the layer at path {path!r}")
        if A.dim() != 2 or B.dim() != 2 or (B.shape[0], A.shape[1]) != (out_f, in_f) or B.shape[1] != A.shape[0]:
            raise ValueError(f"factors[{path!r}] must be (A (r, {in_f}), B ({out_f}, r)), got {tuple(A.shape)} "
                             f"and {tuple(B.shape)}")
    layers = {}
    for path, (A, B) in factors.items():
        r = A.shape[0]
        (layer,) = add_lora(model, [path], r, alpha=alpha * r).values()  # scaling alpha: B A carries the rest
        with torch.no_grad():
            layer.lora_A.weight.copy_(A)
            layer.lora_B.weight.copy_(B)
        layers[path] = layer
    return layers


def remove_lora(model: nn.Module, paths=None) -> None:
    """Replaces each LoRALinear of ``model`` (or those at ``paths``) by its base layer, with the base's
    requires_grad flags as they were before the adapter."""
    found = {p: m for p, m in model.named_modules() if isinstance(m, LoRALinear)}
    paths = list(found) if paths is None else ([paths] if isinstance(paths, str) else list(paths))
    missing = [p for p in paths if p not in found]
    if missing:
        raise ValueError(f"paths {missing} hold no LoRALinear; the adapted layers are {sorted(found)}")
    for path in paths:
        layer = found[path]
        for p, flag in zip(layer.base.parameters(), layer.base_requires_grad):
            p.requires_grad_(flag)
        parent, _, name = path.rpartition(".")
        setattr(get_module(model, parent), name, layer.base)


def adapter_factors(model: nn.Module) -> dict:
    """{path: (A, s B)} of every LoRALinear in ``model`` (the scaling folded into B, tcfa.lora's convention)."""
    return {path: m.factors() for path, m in model.named_modules() if isinstance(m, LoRALinear)}


def save_adapter(directory, factors: dict, *, rank: int | None = None, alpha: float | None = None) -> str:
    """Writes {path: (A, B)} as a PEFT adapter directory (B stored as B / s, s = alpha / r); returns its path."""
    from safetensors.torch import save_file  # noqa: PLC0415  (an optional dependency of the package)

    if not factors:
        raise ValueError("factors must hold at least one layer {path: (A, B)}")
    ranks = {A.shape[0] for A, _ in factors.values()}
    r = ranks.pop() if rank is None and len(ranks) == 1 else rank
    if r is None:
        raise ValueError(f"the layers have different ranks {sorted(ranks | {r})}: give rank=")
    alpha = float(r if alpha is None else alpha)
    tensors = {}
    for path, (A, B) in factors.items():
        tensors[f"{_PREFIX}{path}.lora_A.weight"] = A.detach().contiguous().cpu()
        tensors[f"{_PREFIX}{path}.lora_B.weight"] = (B.detach() * (r / alpha)).contiguous().cpu()
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": int(r), "lora_alpha": alpha, "target_modules": sorted(factors),
              "bias": "none", "task_type": None}
    with open(os.path.join(directory, "adapter_config.json"), "w") as fh:
        json.dump(config, fh, indent=2)
    return str(directory)


def load_adapter(directory) -> tuple[dict, dict]:
    """(factors {path: (A, s B)}, config) from a PEFT adapter directory (its own or tcfa's)."""
    from safetensors.torch import load_file  # noqa: PLC0415

    with open(os.path.join(directory, "adapter_config.json")) as fh:
        config = json.load(fh)
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{directory} holds a {config.get('peft_type')} adapter, not LORA")
    scaling = float(config.get("lora_alpha", config["r"])) / float(config["r"])
    tensors = load_file(os.path.join(directory, "adapter_model.safetensors"))
    factors = {}
    for key, A in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        stem = key[: -len(".lora_A.weight")]
        path = stem[len(_PREFIX):] if stem.startswith(_PREFIX) else stem
        B = tensors.get(f"{stem}.lora_B.weight")
        if B is None:
            raise ValueError(f"{directory}: {key} has no matching lora_B")
        factors[path] = (A, B * scaling)
    if not factors:
        raise ValueError(f"{directory} holds no lora_A / lora_B weights")
    return factors, config


def _weight(model: nn.Module, path: str) -> torch.Tensor:
    """The (out, in) weight of the linear layer at ``path`` (inside a LoRALinear if there is one)."""
    layer = get_module(model, path)
    layer = layer.base if isinstance(layer, LoRALinear) else layer
    linear_shape(layer, f"the adapter path {path!r}")
    return linear_weight(layer)


def merge_adapter(model: nn.Module, factors: dict, alpha: float = 1.0) -> dict:
    """Adds alpha B A into each adapted layer's weight of ``model`` in place ({path: (A, B)}).

    Returns {path: original weight}, what :func:`unmerge_adapter` restores bit for bit (the
    originals are kept, not re-subtracted). Every layer is checked before anything is written.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha!r}")
    weights = {}
    for path, (A, B) in factors.items():
        w = _weight(model, path)
        if (B.shape[0], A.shape[1]) != tuple(w.shape):
            raise ValueError(f"factors[{path!r}] give Delta W of shape {(B.shape[0], A.shape[1])}, "
                             f"the layer's weight is {tuple(w.shape)} (out, in)")
        weights[path] = w
    saved = {}
    with torch.no_grad():
        for path, w in weights.items():
            A, B = factors[path]
            saved[path] = w.detach().clone()
            w.add_(alpha * lora_delta(A.to(w), B.to(w)))
    return saved


def unmerge_adapter(model: nn.Module, saved: dict) -> None:
    """Restores the weights :func:`merge_adapter` changed."""
    with torch.no_grad():
        for path, weight in saved.items():
            _weight(model, path).copy_(weight)
