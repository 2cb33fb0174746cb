"""The maps adapter transport needs: each paired linear layer's input and output spaces, model A to model B.

:func:`fit_adapter_maps` runs both models once on anchor inputs, captures the input and the output of
every paired linear layer (nn.Linear or transformers Conv1D), fits tcfa.anchor_map on them (pooled, and
per condition when labels are given) and reports, per pair, what says whether the maps can be trusted
before any merge: the Procrustes residuals, reflections, how much the maps turn between neighbouring
layers, how many units match both ways, and the layer map's score.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from ..correspondence import unit_intersection
from ..lora import anchor_map, linear_shape, roughness
from ..ops import _validate
from .models import _call, _inference, get_module

__all__ = ["AdapterMaps", "fit_adapter_maps"]


@dataclass
class AdapterMaps:
    """``maps``: {path_a: (path_b, R_in, R_out)} fitted on all anchors (what tcfa.transport_lora takes);
    ``per_condition``: with labels, one such dict per condition, fitted on that condition's anchors;
    ``diagnostics``: one dict per layer pair (:func:`fit_adapter_maps`)."""
    maps: dict
    per_condition: list | None
    diagnostics: list


def _linear_io(model: nn.Module, paths, inputs) -> dict:
    """{path: (input, output)} of the linear layers at ``paths`` from one forward pass (eval, no grad)."""
    found, handles = {}, []

    def hook_for(path):
        def hook(module, args, out):  # returns None: the output is left as it is
            found.setdefault(path, (args[0], out))
        return hook

    for path in paths:
        linear_shape(get_module(model, path), f"the layer at {path!r}")
        handles.append(get_module(model, path).register_forward_hook(hook_for(path)))
    try:
        with _inference(model):
            _call(model, inputs)
    finally:
        for h in handles:
            h.remove()
    missing = [p for p in paths if p not in found]
    if missing:
        raise ValueError(f"layers {missing} were not executed by the forward pass of {type(model).__name__}")
    return found


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1, t.shape[-1]).double()


def _kind(path: str) -> str:
    """The layer's kind across depth: numeric path parts dropped ("blocks.3.mlp.fc1" -> "blocks.#.mlp.fc1")."""
    return re.sub(r"(^|\.)\d+(?=\.|$)", r"\1#", path)


def _map_score(layer_map, path_a: str, path_b: str):
    """The LayerMap score of the (deepest) listed layers containing path_a and path_b, or None."""
    if layer_map is None:
        return None

    def owner(layers, path):
        inside = [i for i, name in enumerate(layers) if path == name or path.startswith(name + ".")]
        return max(inside, key=lambda i: len(layers[i])) if inside else None

    i, j = owner(layer_map.layers_a, path_a), owner(layer_map.layers_b, path_b)
    return None if i is None or j is None else float(layer_map.scores[i, j])


def fit_adapter_maps(model_a: nn.Module, model_b: nn.Module, pairs, inputs, *, labels=None,
                     num_segments: int | None = None, proper: bool = True, layer_map=None,
                     top_units: int = 16) -> AdapterMaps:
    """Input and output maps (tcfa.anchor_map) of each paired linear layer, fitted on anchor inputs.

    ``pairs``: {path_a: path_b} (or (path_a, path_b) items) of linear layers, e.g. the projections of
    the blocks LayerMap.path() pairs. ``inputs``: the anchor batch both models take (a tensor or a
    dict of keyword inputs); each model runs once, in eval mode without gradients, and every position
    of a sequence or grid is a row, carrying its sample's label. ``labels`` (N,) int64 in
    [0, num_segments): per-condition maps too. ``layer_map``: a LayerMap whose score is reported.

    Diagnostics per pair, for the input ("in") and output ("out") maps:
      residual_{in,out}_{mean,max}  anchor_map's Procrustes residual relative to the anchors' spread;
      reflection_{in,out}           the unconstrained fit was improper (``proper`` keeps rotations);
      roughness_{in,out}            tcfa.roughness against the previous pair of the same kind (the path
                                    with its numbers dropped, blocks.#.mlp.fc1), None for the first;
      coverage_{in,out}             share of units matched both ways on the anchors
                                    (tcfa.unit_intersection's coverage: 1 for a permutation);
      span_{in,out}                 numerical rank of A's centred anchor rows over A's width: a map is
                                    fitted only on the span of the anchors (below 1, R is arbitrary on
                                    the rest and transport there is a guess);
      layer_map_score               the layer map's score of the layers holding path_a and path_b;
      residual_{in,out}_per_condition  with labels, each condition's map's mean residual.
    """
    pairs = list(pairs.items() if isinstance(pairs, dict) else pairs)
    if not pairs:
        raise ValueError("pairs must hold at least one (path_a, path_b) layer pair")
    if not all(isinstance(p, (tuple, list)) and len(p) == 2 for p in pairs):
        raise TypeError("pairs must be a dict {path_a: path_b} or (path_a, path_b) items")
    if labels is not None:
        num_segments = _validate.integer("num_segments", num_segments, lo=1)
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
            raise TypeError("labels must be a 1-D int64 tensor, one condition per anchor sample")
        labels = _validate.labels("labels", labels, labels.shape[0], num_segments)
    top_units = _validate.integer("top_units", top_units, lo=1)
    io_a = _linear_io(model_a, [a for a, _ in pairs], inputs)
    io_b = _linear_io(model_b, [b for _, b in pairs], inputs)
    maps, per_condition, diagnostics, previous = {}, None, [], {}
    if labels is not None:
        per_condition = [{} for _ in range(num_segments)]
    for path_a, path_b in pairs:
        d = {"a": path_a, "b": path_b, "layer_map_score": _map_score(layer_map, path_a, path_b)}
        fitted = {}
        for side, k in (("in", 0), ("out", 1)):
            x_a, x_b = _rows(io_a[path_a][k]), _rows(io_b[path_b][k])
            if x_a.shape[0] != x_b.shape[0]:
                raise ValueError(f"the {side}puts of {path_a!r} ({x_a.shape[0]} rows) and {path_b!r} "
                                 f"({x_b.shape[0]} rows) do not pair: the two layers see different positions")
            m = anchor_map(x_a, x_b, proper=proper)
            fitted[side] = m
            prev = previous.get((_kind(path_a), side))
            d.update({f"residual_{side}_mean": m.residual_mean, f"residual_{side}_max": m.residual_max,
                      f"reflection_{side}": m.reflection,
                      f"roughness_{side}": roughness(m.R, prev) if prev is not None and prev.shape == m.R.shape
                      else None,
                      f"coverage_{side}": float(unit_intersection([x_a], [x_b], top_units)["coverage"][0, 0]),
                      f"span_{side}": int(torch.linalg.matrix_rank(x_a - x_a.mean(0))) / x_a.shape[1]})
            previous[(_kind(path_a), side)] = m.R
            if labels is not None:
                if x_a.shape[0] % labels.shape[0]:
                    raise ValueError(f"labels has {labels.shape[0]} entries but {path_a!r} gives {x_a.shape[0]} "
                                     "rows: one label per anchor sample")
                row_labels = labels.repeat_interleave(x_a.shape[0] // labels.shape[0])
                fitted[side + "_c"] = anchor_map(x_a, x_b, row_labels, num_segments, proper=proper)
                d[f"residual_{side}_per_condition"] = [mc.residual_mean for mc in fitted[side + "_c"]]
        maps[path_a] = (path_b, fitted["in"].R, fitted["out"].R)
        if labels is not None:
            for c in range(num_segments):
                per_condition[c][path_a] = (path_b, fitted["in_c"][c].R, fitted["out_c"][c].R)
        diagnostics.append(d)
    return AdapterMaps(maps, per_condition, diagnostics)
