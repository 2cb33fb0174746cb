"""The pieces of one stitching-ablation cell: conditions of a given type, a stitch fitted between two
models' taps, a gate trained to recognise the conditions, and the measurements (accuracy, trainable
parameters, the stitch's forward FLOPs as torch counts them, CKA and RSA before and after, how often
the gate picks a row's own condition). `tcfa ablate` (tcfa/cli/ablate.py) runs the grid from them.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..ops import _validate
from ..shared_stitch import ScaledBasisStitch, SharedBasisStitch
from ..similarity import rsa
from ..stats import linear_cka
from .align import TCFA
from .data import Conditions, binned_conditions, class_conditions, no_conditions, transform_conditions
from .evaluate import accuracy, stitch_cka, trainable_params
from .layouts import _source
from .models import _inference, capture, extract, layout_of, paired_rows
from .stitched import StitchedModel

__all__ = ["CONDITION_KINDS", "DATA_KINDS", "shifted_data", "conditions_of", "top_probability", "fit_stitched",
           "train_gate", "gate_accuracy", "stitch_flops", "measure", "similarity_before", "fine_tune"]

CONDITION_KINDS = ("none", "class", "confidence", "transform")
DATA_KINDS = ("original", "rotation", "noise")
_LEVELS = {"rotation": lambda k: [60.0 * i / max(k - 1, 1) for i in range(k)],  # degrees, random sign
           "noise": lambda k: [0.3 * i / max(k - 1, 1) for i in range(k)]}  # Gaussian sigma on [0, 1] pixels


def shifted_data(x: torch.Tensor, kind: str, levels: int, seed: int) -> tuple[torch.Tensor, Conditions | None]:
    """The images a cell works on: ``original`` as they are, or each image given one of ``levels``
    evenly spaced rotations (0-60 degrees) or noise levels (sigma 0-0.3), drawn at random; the level
    is the sample's transform condition."""
    kind = _validate.choice("data", kind, DATA_KINDS)
    if kind == "original":
        return x, None
    levels = _validate.integer("levels", levels, lo=2)
    return transform_conditions(x, kind, _LEVELS[kind](levels), seed=seed)


def conditions_of(kind: str, k: int | None, y: torch.Tensor, *, transform: Conditions | None = None,
                  confidence: torch.Tensor | None = None) -> Conditions:
    """The conditions of a cell's samples. ``none``: one; ``class``: the label (k = 10), or k groups of
    labels (label mod k); ``confidence``: k quantile bins of model A's top softmax probability;
    ``transform``: the level of the data's transform."""
    kind = _validate.choice("conditions", kind, CONDITION_KINDS)
    if kind == "none":
        return no_conditions(y.shape[0])
    if kind == "class":
        num = int(y.max()) + 1
        return class_conditions(y) if k in (None, num) else Conditions(y % k, [f"label mod {k} = {i}" for i in range(k)])
    if kind == "confidence":
        if confidence is None:
            raise ValueError("confidence conditions need confidence=, model A's top softmax probability per sample")
        return binned_conditions(confidence, k, "confidence of A")
    if transform is None:
        raise ValueError("transform conditions need transformed data (data='rotation' or 'noise')")
    return transform


def top_probability(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """model's top softmax probability per sample (its confidence)."""
    with _inference(model):
        return torch.cat([torch.softmax(model(b), 1).amax(1) for b in x.split(256)])


def _tap_rows(model_a, path_a, model_b, path_b, x):
    act_a, act_b = extract(model_a, path_a, x), extract(model_b, path_b, x)
    layout_a, layout_b = layout_of(act_a, model=model_a), layout_of(act_b, model=model_b)
    rows_a, rows_b = paired_rows(act_a, act_b, "tokens", layout_a=layout_a, layout_b=layout_b)
    return rows_a, rows_b, layout_b.positions, layout_b.num_special


def fit_stitched(model_a, path_a, model_b, path_b, x, cond: Conditions, *, method: str = "cca", rank: int = 16,
                 cond_rank: int | None = None, scaled: bool = False, top_k: int | None = None,
                 gate: str = "centroids", seed: int = 0) -> StitchedModel:
    """A StitchedModel A[path_a] -> B[path_b] whose stitch is fitted on images x with conditions ``cond``.

    B's special (CLS) tokens, filled from A's pooled features, get their own stitch fitted the same way.
    ``cond_rank``: a SharedBasisStitch (shared rank-``rank`` map, ``method`` cca or ridge, plus a rank-
    ``cond_rank`` correction per condition) instead of C independent maps; ``scaled``: a ScaledBasisStitch
    (one rank-``rank`` basis, its singular values rescaled per condition). ``gate``: "centroids" (nearest
    condition mean) or "uniform" (equal gates, for a gate learned from the task loss while tuning).
    """
    rows_a, rows_b, per, special = _tap_rows(model_a, path_a, model_b, path_b, x)
    ids = cond.ids.repeat_interleave(per)
    is_special = torch.arange(rows_a.shape[0]) % per < special
    r = min(rank, rows_a.shape[1], rows_b.shape[1])

    def make(rows):
        xa, xb, c = rows_a[rows], rows_b[rows], ids[rows]
        if scaled:
            return ScaledBasisStitch.fit(xa, xb, c, cond.num, rank=r, base=method, top_k=top_k)
        if cond_rank is not None:
            return SharedBasisStitch.fit(xa, xb, c, cond.num, base_rank=r, cond_rank=cond_rank, base=method,
                                         top_k=top_k)
        # CCA of a condition with n rows has at most n - 1 directions (the CLS stitch has one row per image)
        least = int(torch.bincount(c, minlength=cond.num).min()) - 1
        rank_here = max(1, min(r, least)) if method == "cca" else r
        return TCFA(method, rank=rank_here, conditions=cond.num, top_k=top_k, gate=gate, seed=seed, eps=0.01,
                    ot_max_rows=1024).fit(xa, xb, c)

    stitch = make(~is_special)
    cls_stitch = make(is_special) if special else None
    return StitchedModel(model_a, path_a, model_b, path_b, stitch, cls_stitch=cls_stitch, example_input=x[:1])


def _gated(stitched: StitchedModel, x):
    """[(GatedMultiStitch whose gate routes, the A rows it routes, their sample index)] for the main stitch
    (B's ordinary positions) and the CLS stitch (B's special tokens, from A's pooled features)."""
    with _inference(stitched.model_a):
        act = capture(stitched.model_a, [stitched.path_a], x)[stitched.path_a]
    src, pooled_mask = _source(act, stitched.layout_a, stitched.layout_b, stitched.mode)
    everything = torch.ones(src.shape[1], dtype=torch.bool)
    out = []
    for s, mask in ((stitched.stitch, everything if pooled_mask is None else ~pooled_mask),
                    (stitched.cls_stitch, pooled_mask)):
        if s is not None and mask is not None and bool(mask.any()):
            gate = s.residual if isinstance(s, SharedBasisStitch) else s
            rows = src[:, mask].reshape(-1, src.shape[-1]).detach()
            out.append((gate, rows, torch.arange(src.shape[0]).repeat_interleave(int(mask.sum()))))
    return out


def train_gate(stitched: StitchedModel, x, cond: Conditions, *, steps: int = 300, lr: float = 1e-2,
               seed: int = 0) -> None:
    """Trains each stitch's gate as a classifier of the rows' conditions (cross-entropy of the gate
    logits against the sample's condition) instead of nearest centroid; the maps are left as fitted."""
    gen = torch.Generator().manual_seed(seed)
    for gate, rows, sample in _gated(stitched, x):
        ids = cond.ids[sample]
        opt = torch.optim.Adam([gate.gate_weight, gate.gate_bias], lr=lr)
        for _ in range(steps):
            idx = torch.randint(0, rows.shape[0], (min(1024, rows.shape[0]),), generator=gen)
            logits = (rows[idx] @ gate.gate_weight + gate.gate_bias) / gate.temperature
            loss = nn.functional.cross_entropy(logits, ids[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()


def gate_accuracy(stitched: StitchedModel, x, cond: Conditions) -> float:
    """Share of B's ordinary positions whose top gate (main stitch) is their sample's condition."""
    if cond.num == 1:
        return 1.0
    gate, rows, sample = _gated(stitched, x)[0]
    with torch.no_grad():
        chosen = (rows @ gate.gate_weight + gate.gate_bias).argmax(1)
    return float((chosen == cond.ids[sample]).double().mean())


def stitch_flops(stitched: StitchedModel, x_one) -> int:
    """Forward FLOPs of the stitch (and the CLS stitch) for one input, counted by torch's FlopCounterMode
    (the fused op through its registered formula, tcfa/ops/registration.py): the stitched activation's
    count less the count of A's forward up to its tap, which it includes."""
    def total(fn) -> int:
        with FlopCounterMode(display=False) as counter, _inference(stitched):
            fn()
        return counter.get_total_flops()

    one = x_one[:1]
    return total(lambda: stitched.stitched_activation(one)) - total(
        lambda: capture(stitched.model_a, [stitched.path_a], one))


def _pooled(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().double()
    return t.mean((2, 3)) if t.dim() == 4 else t.mean(1) if t.dim() == 3 else t


def similarity_before(model_a, path_a, model_b, path_b, x) -> dict:
    """Linear CKA of the paired tap rows and RSA of the pooled taps, A against B, before any stitch."""
    rows_a, rows_b, _, _ = _tap_rows(model_a, path_a, model_b, path_b, x)
    act_a, act_b = extract(model_a, path_a, x), extract(model_b, path_b, x)
    return {"cka_before": float(linear_cka(rows_a.double(), rows_b.double())),
            "rsa_before": rsa(_pooled(act_a), _pooled(act_b))}


def measure(stitched: StitchedModel, x, y, cond: Conditions) -> dict:
    """accuracy, trainable parameters, stitch FLOPs per input, CKA (overall) and RSA (pooled) of the stitched
    activation against B's own, and the gate's accuracy on the conditions."""
    cka, _ = stitch_cka(stitched, x, cond.ids, cond.num)
    with _inference(stitched):
        got = torch.cat([stitched.stitched_activation(b) for b in x.split(256)])
    own = extract(stitched.model_b, stitched.path_b, x)
    return {"accuracy": accuracy(stitched, x, y), "trainable_params": trainable_params(stitched),
            "stitch_flops": stitch_flops(stitched, x), "cka_after": cka, "rsa_after": rsa(_pooled(got), _pooled(own)),
            "gate_accuracy": gate_accuracy(stitched, x, cond)}


def fine_tune(model: nn.Module, x, y, *, steps: int, lr: float = 3e-4, batch_size: int = 64, seed: int = 0) -> nn.Module:
    """A copy of ``model`` with every parameter trained on the task loss (the full fine-tuning baseline)."""
    model = copy.deepcopy(model)
    for p in model.parameters():
        p.requires_grad_(True)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch_size,), generator=gen)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()

