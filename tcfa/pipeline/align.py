"""TCFA: task conditions -> one alignment map per condition -> an initialised gated stitch.

Given rows of model A's activations xa (N, dx), model B's xb (M, dy) and a condition id per
row, :class:`TCFA` fits one low-rank affine map T_c(x) = mu_y + (x - mu_x) U_c V_c per
condition (tcfa.maps.LowRankMaps) and returns ``GatedMultiStitch.from_maps(maps)``: a gate
that routes each row to the map of its nearest condition centroid in A's space.

Methods (the math of each lives in tcfa.stats / tcfa.ot; this file only wires it):

- ``"cca"``: tcfa.cca_maps, regression of y on the top-``rank`` canonical variates of x.
- ``"ridge"``: tcfa.ridge_map, reduced-rank ridge of y on x.
- ``"procrustes"``: tcfa.procrustes, an orthogonal map (rank is min(dx, dy), ``rank`` unused).
- ``"ot"`` ("HOT"): one entropic OT problem per condition, all solved in ONE batched
  tcfa.sinkhorn call on ragged offsets, between A's rows carried into B's space by a
  starting map and B's rows; each A row's barycentric target sum_j P_ij y_j / sum_j P_ij
  is the regression target of the per-condition reduced-rank ridge (``ot_rounds`` > 1
  re-solves with the refined maps, Wasserstein-Procrustes style). Paired samples
  start from the per-condition ridge map fit on the pairs; unpaired samples (xa and xb of
  different rows, conditions given for both) start from the per-condition ridge map fit on
  ``anchors`` (a few known pairs), or from the identity when dx == dy.

Tuning (:func:`tune`) then trains the stitch inside a tcfa.StitchedModel with one of
TUNING's objectives.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..ops import _validate
from .layouts import _check_mode
from .data import condition_ids as _condition_ids
from ..maps import LowRankMaps
from ..ragged import sort_by_labels
from ..ot import barycentric_map, sinkhorn
from ..linear_maps import cca_maps, procrustes, ridge_map
from ..stats import segment_moments
from ..stitch import GatedMultiStitch

METHODS = ("cca", "ot", "ridge", "procrustes")


class TCFA:
    """Fits per-condition alignment maps between two activation spaces and builds the stitch.

    method: "cca" | "ot" | "ridge" | "procrustes". rank: rank of each map (cca / ridge / ot).
    conditions: number of conditions (None: taken from the condition ids at fit time).
    reg: covariance regularisation of CCA/ridge (tcfa.stats convention, relative to the trace).
    eps: OT entropic regularisation *relative to* the mean squared distance between B's rows
    within a condition (so it is scale free); ot_rounds: OT re-solves; ot_max_rows: at most
    this many rows per condition per side enter the OT (a seeded subsample; the map is then
    fit on those rows). top_k, temperature: the stitch's routing (GatedMultiStitch).
    gate: "centroids" (nearest condition mean of A's rows) or "uniform".
    """

    def __init__(self, method: str = "cca", rank: int = 16, conditions: int | None = None, reg: float = 1e-3,
                 eps: float = 0.05, top_k: int | None = None, temperature: float = 1.0, gate: str = "centroids",
                 ot_rounds: int = 1, ot_max_rows: int | None = 2048, ot_max_iter: int = 500, seed: int = 0):
        self.method = _validate.choice("method", method, METHODS)
        self.rank = _validate.integer("rank", rank, lo=1)
        self.conditions = None if conditions is None else _validate.integer("conditions", conditions, lo=1)
        self.reg = _validate.nonnegative("reg", reg)
        self.eps = _validate.positive("eps", eps)
        self.top_k = top_k if top_k is None else _validate.integer("top_k", top_k, lo=1)
        self.temperature = _validate.positive("temperature", temperature)
        self.gate = _validate.choice("gate", gate, ("centroids", "uniform"))
        self.ot_rounds = _validate.integer("ot_rounds", ot_rounds, lo=1)
        self.ot_max_rows = None if ot_max_rows is None else _validate.integer("ot_max_rows", ot_max_rows, lo=2)
        self.ot_max_iter = _validate.integer("ot_max_iter", ot_max_iter, lo=1)
        self.seed = _validate.integer("seed", seed)
        self.maps_: LowRankMaps | None = None
        self.ot_result_ = None

    # ------------------------------------------------------------ fitting
    def fit(self, xa, xb, cond=None, *, cond_b=None, paired: bool = True, anchors=None) -> GatedMultiStitch:
        """Fits the maps from activation rows and returns the initialised GatedMultiStitch.

        xa (N, dx), xb (N, dy) paired rows (row i of both from the same input) with cond the
        condition of each row (Conditions, int64 (N,) or None for one condition). With
        ``paired=False`` (method "ot" only) xb has its own rows (M, dy) and conditions
        ``cond_b``; ``anchors`` = (ia, ib) index tensors of known pairs seed the starting map.
        The fitted maps are kept in ``self.maps_``.
        """
        xa = _validate.tensor("xa", xa, dim=2)
        xb = _validate.tensor("xb", xb, dim=2)
        _validate.same_dtype(xa=xa, xb=xb)
        if paired:
            xa, xb = _validate.paired_rows(xa, xb, "xa", "xb")
        ids, num = _condition_ids("cond", cond, xa.shape[0], self.conditions)
        if paired:
            ids_b = ids
        else:
            if self.method != "ot":
                raise ValueError(f"paired=False needs method='ot' (the only method without row pairs), got {self.method!r}")
            if cond is not None and cond_b is None:
                raise ValueError("cond_b must give the conditions of xb's rows when paired=False")
            ids_b, _ = _condition_ids("cond_b", cond_b, xb.shape[0], num)
        for side, i in (("xa", ids), ("xb", ids_b)):
            counts = torch.bincount(i, minlength=num)
            if bool((counts < 2).any()):
                c = int((counts < 2).nonzero()[0])
                raise ValueError(f"{side} needs at least 2 rows in every condition; condition {c} has {int(counts[c])}")
        if self.method != "procrustes" and self.rank > min(xa.shape[1], xb.shape[1]):
            raise ValueError(f"rank must be <= min(dx, dy) = {min(xa.shape[1], xb.shape[1])}, got {self.rank}")
        if self.top_k is not None and self.top_k > num:
            raise ValueError(f"top_k must be <= the number of conditions ({num}), got {self.top_k}")
        if self.method == "ot":
            maps = self._fit_ot(xa, xb, ids, ids_b, num, paired, anchors)
        elif self.method == "procrustes":
            maps = procrustes(xa, xb, ids, num)
        else:
            m = segment_moments(xa, xb, ids, num)
            maps = cca_maps(m, self.rank, self.reg) if self.method == "cca" else ridge_map(m, self.reg, self.rank)
        self.maps_ = maps
        return GatedMultiStitch.from_maps(maps.to(xa.dtype), gate=self.gate, top_k=self.top_k,
                                          temperature=self.temperature)

    def fit_models(self, model_a, path_a, model_b, path_b, data, cond, *, mode="tokens", batch_size=256,
                   progress=True, checkpoint=None, checkpoint_every: int = 100) -> GatedMultiStitch:
        """fit() on activations tapped from two models (tcfa.extract / to_rows) on ``data``.

        cond: one condition per sample of ``data``; in "tokens" mode every row (position) of a
        sample inherits its sample's condition, and A's grid is resampled to B's (to_rows).
        ``path_a`` / ``path_b`` = "auto": the tap points are chosen from a layer map of the
        models' blocks on ``data`` (tcfa.pipeline.layer_map.auto_layers: the best linear CKA
        among pairs leaving B a block after its tap); ``layers_`` holds the pair, ``layer_choice_``
        why, ``layer_map_`` the map. Both models tap each batch of ``data`` in one pass (a shuffling
        loader keeps its pairs). ``checkpoint``: a path; both extractions are saved there every
        ``checkpoint_every`` batches and a rerun with the same models and data resumes from there
        (tcfa.pipeline.checkpoint).
        """
        from . import models

        _check_mode(mode)  # before any forward pass
        self.layers_ = (path_a, path_b)
        if "auto" in (path_a, path_b):
            from .layer_map import auto_layers

            path_a, path_b, why, self.layer_map_ = auto_layers(model_a, path_a, model_b, path_b, data,
                                                               batch_size=batch_size, progress=progress)
            self.layers_, self.layer_choice_ = (path_a, path_b), f"layer_a={path_a!r}, layer_b={path_b!r}: {why}"
            if progress:
                print(f"tcfa: chose {self.layer_choice_}")

        # one pass: both models tap each batch as it comes (two passes over a shuffling loader paired
        # row i of A with another sample's row i of B)
        act_a, act_b = models.extract_many([(model_a, path_a), (model_b, path_b)], data, batch_size=batch_size,
                                           progress=progress, checkpoint=checkpoint,
                                           checkpoint_every=checkpoint_every)
        ids, num = _condition_ids("cond", cond, act_a.shape[0], self.conditions)
        xa, xb = models.paired_rows(act_a, act_b, mode)
        # one dtype for both sides (an fp32 model against an fp64 one: the wider), as layer_map does
        wide = torch.promote_types(xa.dtype, xb.dtype)
        per = xa.shape[0] // act_a.shape[0]
        return self.fit(xa.to(wide), xb.to(wide), ids.repeat_interleave(per))

    def _fit_ot(self, xa, xb, ids_a, ids_b, num, paired, anchors) -> LowRankMaps:
        gen = torch.Generator().manual_seed(self.seed)
        dt = torch.float64 if xa.dtype == torch.float64 else torch.float32
        xa, xb = xa.to(dt), xb.to(dt)
        ia, ib = self._ot_rows(ids_a, num, gen), self._ot_rows(ids_b, num, gen)
        if not paired:
            start = self._start_map(xa, xb, ids_a, ids_b, num, anchors)
        else:
            if anchors is not None:
                raise ValueError("anchors are for paired=False: paired samples are all anchors already")
            # per-condition ridge on the pairs: OT then moves each prediction onto B's own rows
            # of that condition (the barycentric targets lie in B's distribution, not the
            # regression's shrunken one) and the low-rank map is refit to those targets
            start = ridge_map(segment_moments(xa, xb, ids_a, num), self.reg)
        xs, ys, ca = xa[ia], xb[ib], ids_a[ia]
        lab_a, off_a = sort_by_labels(ca, num)
        lab_b, off_b = sort_by_labels(ids_b[ib], num)
        xs, ys, ca = xs[lab_a], ys[lab_b], ca[lab_a]
        moved = start.apply(xs, ca if start.num_conditions == num else torch.zeros_like(ca))
        for _ in range(self.ot_rounds):
            eps = self.eps * _mean_sq_distance(ys, off_b)
            res = sinkhorn(moved, ys, eps=eps, x_offsets=off_a, y_offsets=off_b, max_iter=self.ot_max_iter,
                           tol=1e-4, scaling=0.7)
            targets = barycentric_map(res, ys)
            maps = ridge_map(segment_moments(xs, targets, ca, num), self.reg, self.rank)
            moved = maps.apply(xs, ca)
        self.ot_result_ = res
        return maps

    def _ot_rows(self, ids, num, gen) -> torch.Tensor:
        """All rows, or a seeded subsample of at most ot_max_rows rows per condition."""
        if self.ot_max_rows is None:
            return torch.arange(ids.shape[0])
        keep = []
        for c in range(num):  # a selection per condition, not a solve: the OT itself is one call
            rows = (ids == c).nonzero().flatten()
            keep.append(rows[torch.randperm(rows.numel(), generator=gen)[: self.ot_max_rows]])
        return torch.cat(keep).sort().values

    def _start_map(self, xa, xb, ids_a, ids_b, num, anchors) -> LowRankMaps:
        dx, dy = xa.shape[1], xb.shape[1]
        if anchors is None:
            if dx != dy:
                raise ValueError(f"anchors are needed for unpaired OT between widths dx={dx} and dy={dy}: "
                                 "OT compares rows in one space, and without known pairs there is no map into it")
            eye = torch.eye(dx, dtype=xa.dtype).unsqueeze(0)
            zero = torch.zeros(1, dx, dtype=xa.dtype)
            return LowRankMaps(eye, eye.clone(), zero, zero.clone())
        if not (isinstance(anchors, (tuple, list)) and len(anchors) == 2):
            raise TypeError("anchors must be a pair (ia, ib) of int64 index tensors into xa and xb")
        a_idx, b_idx = anchors
        for name, t, n in (("anchors[0]", a_idx, xa.shape[0]), ("anchors[1]", b_idx, xb.shape[0])):
            _validate.labels(name, t, a_idx.shape[0] if isinstance(a_idx, torch.Tensor) else -1, n)
        if not torch.equal(ids_a[a_idx], ids_b[b_idx]):
            raise ValueError("anchors must pair rows of the same condition (cond[ia] == cond_b[ib])")
        # per-condition ridge on the anchor pairs (as the paired path does on all pairs)
        return ridge_map(segment_moments(xa[a_idx], xb[b_idx], ids_a[a_idx], num), self.reg)


def _mean_sq_distance(y: torch.Tensor, offsets: torch.Tensor) -> float:
    """Mean over problems of the mean squared distance between rows = 2 * total variance."""
    out = []
    for k in range(offsets.numel() - 1):
        rows = y[offsets[k]: offsets[k + 1]]
        out.append(2 * rows.var(0, unbiased=False).sum())
    return float(torch.stack(out).mean().clamp_min(1e-12))




# ------------------------------------------------------------------ tuning
TUNING = ("zero_shot", "direct", "task", "fula", "partial")


def _rows(t: torch.Tensor) -> torch.Tensor:
    """An activation as feature rows: (N, C, H, W) -> (N H W, C), (N, T, D) -> (N T, D)."""
    return t.movedim(1, -1).reshape(-1, t.shape[1]) if t.dim() == 4 else t.reshape(-1, t.shape[-1])


def normalised_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE divided by the target's mean per-feature variance: 1.0 = predicting the mean.

    Scale free, so losses at different depths of B (whose activation scales differ by
    orders of magnitude) can be averaged with equal weight (the "fula" objective)."""
    t = _rows(target)
    return (_rows(pred) - t).square().mean() / t.var(0, unbiased=False).mean().clamp_min(1e-12)


def next_block(path: str) -> str:
    """The block after ``path`` when its last part is an index ("encoder.layer.1" -> "encoder.layer.2")."""
    *head, last = path.split(".")
    if not last.isdigit():
        raise ValueError(f"cannot infer the block after {path!r}: pass next_path explicitly")
    return ".".join([*head, str(int(last) + 1)])


def stitch_loss(stitched, mode: str, inputs, labels, later_paths=()) -> torch.Tensor:
    """The objective of tuning ``mode`` on one batch (zero_shot has none: task loss is reported)."""
    from .models import capture

    mode = _validate.choice("mode", mode, TUNING)
    if mode in ("zero_shot", "task", "partial"):
        return nn.functional.cross_entropy(stitched(inputs), labels)
    paths = [stitched.path_b] + (list(later_paths) if mode == "fula" else [])
    with torch.no_grad():
        target = capture(stitched.model_b, paths, inputs)
    if mode == "direct":
        return normalised_mse(stitched.stitched_activation(inputs), target[stitched.path_b])
    _, acts = stitched.forward_taps(inputs, paths)
    return torch.stack([normalised_mse(acts[p], target[p]) for p in paths]).mean()


def tune(stitched, mode: str, inputs: torch.Tensor, labels: torch.Tensor, *, steps: int = 100, lr: float = 1e-3,
         batch_size: int = 64, later_paths=(), next_path: str | None = None, seed: int = 0,
         progress: bool = False) -> list:
    """Trains the stitch of a tcfa.StitchedModel with objective ``mode``; returns the losses.

    - "zero_shot": no training (the fitted stitch as it is).
    - "direct": match B's own activation at its tap (normalised MSE).
    - "task": cross-entropy of B's logits through frozen B.
    - "fula": match B's own activations at its tap and at ``later_paths`` (layers of B after
      the tap), each depth's MSE normalised by its target's variance, averaged.
    - "partial": task loss, also training B's next block (``next_path``, default: the index
      after B's tap). B is deep-copied first, so the caller's model_b is left untouched;
      the block stays trainable, so stitched.num_trainable() counts it in.
    Adam, ``steps`` minibatches of ``batch_size`` drawn with a generator seeded by ``seed``.
    """
    mode = _validate.choice("mode", mode, TUNING)
    steps = _validate.integer("steps", steps, lo=0)
    lr = _validate.positive("lr", lr)
    batch_size = _validate.integer("batch_size", batch_size, lo=1)
    if not isinstance(inputs, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError("inputs and labels must be torch.Tensors")
    if inputs.shape[0] != labels.shape[0]:
        raise ValueError(f"inputs and labels must hold the same samples, got {inputs.shape[0]} and {labels.shape[0]}")
    if mode == "fula" and not later_paths:
        raise ValueError("later_paths must name at least one layer of B after its tap for mode='fula'")
    if mode == "zero_shot" or steps == 0:
        return []
    if mode == "partial":
        from .models import get_module

        stitched.model_b = copy.deepcopy(stitched.model_b)
        for p in get_module(stitched.model_b, next_path or next_block(stitched.path_b)).parameters():
            p.requires_grad_(True)
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in stitched.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    stitched.train()
    losses = []
    bar = range(steps)
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(bar, desc=f"tune {mode}", unit="step")
    for _ in bar:
        idx = torch.randint(inputs.shape[0], (min(batch_size, inputs.shape[0]),), generator=gen)
        loss = stitch_loss(stitched, mode, inputs[idx], labels[idx], later_paths)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if progress:
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    stitched.eval()
    return losses
