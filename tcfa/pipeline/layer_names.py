"""Which layers a layer map compares: module paths, patterns, and a model's blocks in depth order."""
from __future__ import annotations

import fnmatch

from torch import nn

from .models import get_module

__all__ = ["resolve_layers", "default_layers"]

_CONTAINERS = (nn.Sequential, nn.ModuleList)


def _matches(pattern: str, path: str) -> bool:
    """fnmatch per dotted component: "*" never crosses a dot ("blocks.*" is blocks.0, not blocks.0.attn)."""
    parts, wanted = path.split("."), pattern.split(".")
    return len(parts) == len(wanted) and all(fnmatch.fnmatchcase(p, w) for p, w in zip(parts, wanted))


def resolve_layers(name: str, model: nn.Module, layers) -> list[str]:
    """Module paths from ``layers``: a path, a pattern ("blocks.*", "layer[1-4].*", "bert.encoder.layer.*"),
    or a list of them. A pattern expands to the matching modules in registration order; duplicates
    are dropped. Errors name ``name`` and list what exists."""
    if isinstance(layers, str):
        layers = [layers]
    if not isinstance(layers, (list, tuple)) or not layers or not all(isinstance(p, str) for p in layers):
        raise TypeError(f"{name} must be a module path, a pattern or a non-empty list of them, got {layers!r:.80}")
    paths = []
    for entry in layers:
        if any(c in entry for c in "*?["):
            found = [p for p, _ in model.named_modules() if p and _matches(entry, p)]
            if not found:
                shown = ", ".join(n for n, _ in model.named_children())
                raise ValueError(f"{name}: pattern {entry!r} matches no module of {type(model).__name__} "
                                 f"(its children are [{shown}]; '*' stays within one dotted component)")
            paths += found
        else:
            try:
                get_module(model, entry)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
            paths.append(entry)
    return list(dict.fromkeys(paths))


def default_layers(model: nn.Module) -> list[str]:
    """The model's blocks in registration order: the children of every nn.Sequential / nn.ModuleList
    whose children are all of one class and hold parameters (timm ViT blocks.i, timm / torchvision
    ResNet layerK.i, BERT encoder.layer.i, ConvNeXt stages.s.blocks.i); where such blocks nest, the
    innermost ones. This is what ``layer_a="auto"`` searches over."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    blocks = []
    for path, module in model.named_modules():
        if not isinstance(module, _CONTAINERS) or len(module) < 1:
            continue
        kids = list(module.named_children())
        same_class = len({type(m) for _, m in kids}) == 1
        if same_class and all(any(True for _ in m.parameters()) for _, m in kids):
            blocks += [f"{path}.{k}" if path else k for k, _ in kids]
    inner = [b for b in blocks if not any(o.startswith(b + ".") for o in blocks)]
    if not inner:
        raise ValueError(f"{type(model).__name__} has no sequence of blocks to search (no nn.Sequential or "
                         "nn.ModuleList of same-class modules with parameters): list its layers explicitly")
    return inner
