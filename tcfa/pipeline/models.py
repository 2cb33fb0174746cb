"""Layer taps on any nn.Module: one activation, several in one forward, or moments streamed over data.

StitchedModel (A's early layers -> stitch -> B's late layers) is in tcfa/pipeline/stitched.py.

Inputs everywhere are what the model takes: a Tensor (images) is passed positionally, a dict
(BERT: input_ids, attention_mask) as keyword arguments. Paths are dotted module names: timm
ResNet "layer2", timm ConvNeXt "stages.1", timm VisionTransformer "blocks.1", transformers ViT
"vit.layers.1", BERT "bert.encoder.layer.1".

How a tap's activation is laid out -- a CNN grid (N, C, H, W) or tokens (N, T, D) with leading
CLS / prefix tokens -- and how A's positions are paired with B's: tcfa/pipeline/layouts.py. How B
runs from its tap without its earlier layers: tcfa/pipeline/_skip.py.

Families tested (tests/test_models.py, random-weight configs): timm ResNet, ConvNeXt and
VisionTransformer (CLS and register tokens), transformers ResNet, ConvNeXt, ViT and BERT.
"""
from __future__ import annotations

import contextlib
import itertools
from typing import Iterable, Iterator

import torch
from torch import nn

from . import checkpoint as ckpt
from .layouts import Layout, _check_mode, layout_of, paired_rows, rows_per_sample, to_rows

__all__ = [
    "get_module",
    "extract",
    "capture",
    "stream_moments",
    "Layout",
    "layout_of",
    "to_rows",
    "rows_per_sample",
    "paired_rows",
]

# ------------------------------------------------------------------ module paths
def get_module(model: nn.Module, path: str) -> nn.Module:
    """The submodule at dotted ``path`` ("encoder.layer.3", "blocks.5"); "" is the model itself."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(path, str):
        raise TypeError(f"path must be a str, got {type(path).__name__}")
    module = model
    walked = []
    for part in path.split(".") if path else []:
        children = module._modules
        if part not in children or children[part] is None:
            where = ".".join(walked) or "<model>"
            names = [n for n, m in children.items() if m is not None]
            shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
            raise ValueError(f"layer path {path!r} does not exist in {type(model).__name__}: "
                             f"{where} has no child {part!r}; its children are [{shown}]")
        module = children[part]
        walked.append(part)
    return module


# ------------------------------------------------------------------ calling models
def _call(model: nn.Module, inputs):
    """Calls a model with a Tensor (positional) or a dict of keyword inputs."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, torch.Tensor):
        return model(inputs)
    raise TypeError(f"inputs must be a Tensor or a dict of model kwargs, got {type(inputs).__name__}")


def _first_tensor(out, path: str) -> torch.Tensor:
    """The activation in a module's output: the tensor itself, last_hidden_state, or the first tensor."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("last_hidden_state", "hidden_states"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, (tuple, list)) or hasattr(out, "to_tuple"):
        for value in (out.to_tuple() if hasattr(out, "to_tuple") else out):
            if isinstance(value, torch.Tensor):
                return value
    raise TypeError(f"module {path!r} returned {type(out).__name__}, which holds no tensor to tap")


def _logits(out):
    """B's prediction: .logits of a transformers output, else the output itself."""
    logits = getattr(out, "logits", None)
    return logits if isinstance(logits, torch.Tensor) else out


class _Stop(Exception):
    """Raised by a tap hook to end the forward pass once every wanted activation is captured."""


@contextlib.contextmanager
def _taps(model: nn.Module, paths, stop_when_done: bool):
    """Hooks the modules at ``paths``; yields the dict they fill. Optionally stops the forward after the last."""
    found = {}
    handles = []

    def hook_for(path):
        def hook(module, args, out):
            found[path] = _first_tensor(out, path)
            if stop_when_done and len(found) == len(paths):
                raise _Stop
        return hook

    try:
        for path in paths:
            handles.append(get_module(model, path).register_forward_hook(hook_for(path)))
        yield found
    finally:
        for h in handles:
            h.remove()


def capture(model: nn.Module, paths, inputs) -> dict:
    """Activations at several ``paths`` from one forward of ``model``, stopped after the last tap fires.

    Runs in the caller's grad mode and train/eval mode (unlike ``extract``): this is the building
    block for training losses on B's own activations.
    """
    paths = [paths] if isinstance(paths, str) else list(paths)
    if not paths:
        raise ValueError("paths must name at least one layer")
    with _taps(model, paths, stop_when_done=True) as found:
        try:
            _call(model, inputs)
        except _Stop:
            pass
    missing = [p for p in paths if p not in found]
    if missing:
        raise ValueError(f"layers {missing} were not executed by the forward pass of {type(model).__name__}")
    return dict(found)


# ------------------------------------------------------------------ batching
def _batch_input(batch):
    """The model input of a batch: a Tensor, a dict of kwargs, or the first element of a tuple/list."""
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("data yielded an empty tuple/list batch")
        batch = batch[0]
    if isinstance(batch, (torch.Tensor, dict)):
        return batch
    raise TypeError(f"each batch of data must be a Tensor, a dict of model kwargs or a tuple/list whose "
                    f"first element is the input; got {type(batch).__name__}")


def _batches(data, batch_size: int) -> Iterator:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(data, torch.Tensor):
        yield from data.split(batch_size)
    elif isinstance(data, dict):
        n = _batch_len(data)
        for i in range(0, n, batch_size):
            yield {k: v[i:i + batch_size] if isinstance(v, torch.Tensor) else v for k, v in data.items()}
    elif isinstance(data, Iterable):
        for batch in data:
            yield _batch_input(batch)
    else:
        raise TypeError(f"data must be a Tensor, a dict of tensors or an iterable of batches, "
                        f"got {type(data).__name__}")


def _batch_len(inputs) -> int:
    if isinstance(inputs, torch.Tensor):
        return inputs.shape[0]
    for v in inputs.values():
        if isinstance(v, torch.Tensor):
            return v.shape[0]
    raise ValueError("a dict of inputs must hold at least one tensor")


def _head(inputs, n: int = 1):
    """The first ``n`` samples of a batch of inputs."""
    if isinstance(inputs, torch.Tensor):
        return inputs[:n]
    return {k: v[:n] if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def _to_device(inputs, device):
    if device is None:
        return inputs
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, unit="batch")


@contextlib.contextmanager
def _inference(*models):
    """eval mode + no_grad, restoring each model's train flag afterwards."""
    modes = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        with torch.no_grad():
            yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


def extract(model: nn.Module, path: str, data, *, batch_size: int = 256, device=None,
            progress: bool = False, checkpoint=None, checkpoint_every: int = 100) -> torch.Tensor:
    """Activations at the output of module ``path`` for every sample of ``data``, concatenated.

    The forward pass stops right after the tap (a hook raises), in eval mode under no_grad.
    ``data``: a Tensor of inputs (split into ``batch_size`` batches), a dict of input tensors, or an
    iterable of batches (Tensor, dict of kwargs, or tuple/list whose first element is the input).
    Returns the raw activation shape: (N, C, H, W) for CNN stages, (N, T, D) for ViT/BERT blocks,
    (N, D) for linear layers. ``checkpoint``: a file path where the activations so far are saved
    every ``checkpoint_every`` batches, and from which a rerun resumes (tcfa.pipeline.checkpoint;
    each save rewrites everything extracted so far, so space the saves for large activations).
    """
    return extract_many([(model, path)], data, batch_size=batch_size, device=device, progress=progress,
                        checkpoint=checkpoint, checkpoint_every=checkpoint_every)[0]


def extract_many(taps, data, *, batch_size: int = 256, device=None, progress: bool = False, checkpoint=None,
                 checkpoint_every: int = 100) -> list[torch.Tensor]:
    """extract() of several (model, path) taps in one pass over ``data``: every model sees each batch
    as it comes, so the rows of all taps are the same samples even when ``data`` shuffles or is a
    one-shot iterator. Returns one tensor per tap; the checkpoint holds them all (and the models'
    fingerprints: a rerun with other weights is refused)."""
    for model, path in taps:
        get_module(model, path)  # fail early, naming the path
    first, batches = ckpt.peek(_batches(data, batch_size))
    if first is None:
        raise ValueError("data holds no batches")
    chunks = [[] for _ in taps]

    def step(inputs):
        inputs = _to_device(inputs, device)  # once for every tap
        for (model, path), out in zip(taps, chunks):
            out.append(capture(model, [path], inputs)[path])

    def restore(tensors):  # where the taps land: the model's device unless the inputs are moved
        for i, (model, _) in enumerate(taps):
            home = device or next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device
            chunks[i][:] = [tensors[f"activations.{i}"].to(home)]

    def config():
        return dict(call="extract", paths=[p for _, p in taps], models=[ckpt.model_fingerprint(m) for m, _ in taps],
                    batch_size=batch_size, data_length=ckpt.data_length(data),
                    first_batch=ckpt.batch_fingerprint(first))

    label = "extract " + ", ".join(p for _, p in taps)
    with _inference(*(m for m, _ in taps)):
        ckpt.run(_progress(batches, progress, label), step,
                 ckpt.Checkpoint.optional(checkpoint, checkpoint_every, config),
                 lambda: {f"activations.{i}": torch.cat(c) for i, c in enumerate(chunks)}, restore)
    return [torch.cat(c) for c in chunks]


def stream_moments(model_a, path_a, model_b, path_b, data, labels, accumulator, *, mode: str = "pooled",
                   batch_size: int = 256, progress: bool = False, checkpoint=None, checkpoint_every: int = 100):
    """Feeds paired rows of A's and B's taps into ``accumulator`` batch by batch (memory independent of N).

    ``labels``: one condition per sample, a Tensor aligned with ``data`` (consumed in order) or None
    when every batch of ``data`` is a tuple (inputs, labels). Each sample's label is repeated for its
    rows (tokens mode). Taps may be maps, tokens or (N, D) rows (tcfa.pipeline.layouts).
    ``checkpoint``: a file path; the accumulator and the position in ``data`` are saved there every
    ``checkpoint_every`` batches and a rerun of the same call resumes from it
    (tcfa.pipeline.checkpoint). Returns the accumulator.
    """
    _check_mode(mode)
    for m, p in ((model_a, path_a), (model_b, path_b)):
        get_module(m, p)
    if labels is not None:
        labels = torch.as_tensor(labels).reshape(-1)
    batches = _labelled_batches(data, labels, batch_size)
    first, batches = ckpt.peek(batches)
    state = {"seen": torch.zeros((), dtype=torch.int64)}

    def config():
        return dict(call="stream_moments", path_a=path_a, path_b=path_b, mode=mode, batch_size=batch_size,
                    models=[ckpt.model_fingerprint(model_a), ckpt.model_fingerprint(model_b)],
                    data_length=ckpt.data_length(data), labels_length=None if labels is None else labels.shape[0],
                    first_batch=None if first is None else ckpt.batch_fingerprint(first[0]),
                    accumulator=ckpt.state_fingerprint(accumulator.state_dict()))

    layouts = []

    def step(batch):
        inputs, y = batch
        act_a = capture(model_a, [path_a], inputs)[path_a]
        act_b = capture(model_b, [path_b], inputs)[path_b]
        if not layouts:
            layouts.extend((layout_of(act_a, model=model_a), layout_of(act_b, model=model_b)))
        xa, xb = paired_rows(act_a, act_b, mode, layout_a=layouts[0], layout_b=layouts[1])
        per = xa.shape[0] // act_a.shape[0]
        accumulator.update(xa, xb, y.to(xa.device).repeat_interleave(per))
        state["seen"] += act_a.shape[0]

    def restore(tensors):
        state["seen"] = tensors.pop("seen")
        accumulator.load_state_dict({**accumulator.state_dict(), **tensors})

    with _inference(model_a, model_b):
        ckpt.run(_progress(batches, progress, f"moments {path_a} -> {path_b}"), step,
                 ckpt.Checkpoint.optional(checkpoint, checkpoint_every, config),
                 lambda: {**ckpt.tensors_of(accumulator.state_dict()), "seen": state["seen"]}, restore)
    seen = int(state["seen"])
    if labels is not None and seen != labels.shape[0]:
        raise ValueError(f"labels has {labels.shape[0]} entries but data held {seen} samples")
    return accumulator


def _labelled_batches(data, labels, batch_size):
    """(inputs, labels) per batch, from data + a labels tensor, or from (inputs, labels) batches."""
    if labels is not None:
        start = 0
        for inputs in _batches(data, batch_size):
            n = _batch_len(inputs)
            if start + n > labels.shape[0]:
                raise ValueError(f"labels has {labels.shape[0]} entries, fewer than the samples in data")
            yield inputs, labels[start:start + n]
            start += n
        return
    for batch in data:
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
            raise ValueError("labels=None needs data batches of the form (inputs, labels)")
        yield _batch_input(batch), torch.as_tensor(batch[1]).reshape(-1)
