"""Metrics of a stitched model (or an individual one): accuracy, Δaccuracy, Δθ, CKA, corruption.

All take the model's own input tensors (images) and labels; nothing here trains.
"""
from __future__ import annotations

import torch
from torch import nn

from . import data as _data
from ..stats import linear_cka

CORRUPTIONS = {"noise": 0.3, "rotation": 30.0}  # Gaussian sigma on [0, 1] pixels; degrees


def _logits(out):
    logits = getattr(out, "logits", None)
    return logits if isinstance(logits, torch.Tensor) else out


@torch.no_grad()
def predict(model: nn.Module, inputs: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Argmax class of every input, in eval mode (restored afterwards)."""
    was = model.training
    model.eval()
    try:
        return torch.cat([_logits(model(b)).argmax(-1) for b in inputs.split(batch_size)])
    finally:
        model.train(was)


def accuracy(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    if inputs.shape[0] != labels.shape[0]:
        raise ValueError(f"inputs and labels must hold the same samples, got {inputs.shape[0]} and {labels.shape[0]}")
    return float((predict(model, inputs, batch_size) == labels).double().mean())


def corrupt(images: torch.Tensor, kind: str, seed: int = 0) -> torch.Tensor:
    """The test images under one corruption of CORRUPTIONS, at its fixed severity."""
    if kind == "noise":
        return _data.gaussian_noise(images, CORRUPTIONS["noise"], torch.Generator().manual_seed(seed))
    if kind == "rotation":
        sign = torch.randint(2, (images.shape[0],), generator=torch.Generator().manual_seed(seed)) * 2 - 1
        return _data.rotate(images, CORRUPTIONS["rotation"] * sign.to(images.dtype))
    raise ValueError(f"kind must be one of {list(CORRUPTIONS)}, got {kind!r}")


def corrupted_accuracy(model, inputs, labels, seed: int = 0) -> dict:
    """{corruption: accuracy} for every corruption in CORRUPTIONS."""
    return {k: accuracy(model, corrupt(inputs, k, seed), labels) for k in CORRUPTIONS}


@torch.no_grad()
def stitch_cka(stitched, inputs: torch.Tensor, cond: torch.Tensor, num_conditions: int,
               batch_size: int = 256) -> tuple[float, list]:
    """Linear CKA between the stitched activation and B's own at B's tap, over all rows and per
    condition (rows of the samples in that condition); returns (overall, [per condition])."""
    from .models import capture

    was = stitched.training
    stitched.eval()
    try:
        got, own = [], []
        for b in inputs.split(batch_size):
            got.append(stitched.stitched_activation(b))
            own.append(capture(stitched.model_b, [stitched.path_b], b)[stitched.path_b])
    finally:
        stitched.train(was)
    got, own = torch.cat(got), torch.cat(own)
    per = got[0].numel() // got.shape[-1] if got.dim() == 3 else got.shape[2] * got.shape[3]
    rows = lambda t: t.movedim(1, -1).reshape(-1, t.shape[1]) if t.dim() == 4 else t.reshape(-1, t.shape[-1])  # noqa: E731
    ga, gb = rows(got).double(), rows(own).double()
    row_cond = cond.repeat_interleave(per)
    per_cond = [float(linear_cka(ga[row_cond == c], gb[row_cond == c])) if int((row_cond == c).sum()) >= 2
                else float("nan") for c in range(num_conditions)]
    return float(linear_cka(ga, gb)), per_cond


def trainable_params(model: nn.Module) -> int:
    """Δθ: parameters with requires_grad (for a StitchedModel: the stitch, plus any unfrozen block)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
