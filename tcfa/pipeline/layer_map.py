"""tcfa.layer_map: every listed layer of A against every listed layer of B, one forward pass per batch.

The result, a :class:`LayerMap`, holds the (L_A, L_B) scores (and per condition), the unit
intersection diagnostics, and acts on them: the best pairs, the depth-order-preserving path, the
stitch point for ``layer_a="auto"``, a heatmap, a durable artifact. The metrics' math is in
tcfa/similarity.py and tcfa/correspondence.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from .. import artifacts, correspondence, distributed, similarity
from ..ops import _validate
from .checkpoint import Checkpoint, batch_fingerprint, data_length, model_fingerprint, peek, run
from .data import condition_ids
from .layer_names import default_layers, resolve_layers
from .layouts import _pooled, _source, layout_of
from .models import _batch_len, _batches, _inference, _labelled_batches, _progress, capture

__all__ = ["LayerMap", "layer_map", "METRICS"]

# metric -> larger is more similar
METRICS = {"cka": True, "cca": True, "procrustes": True, "gw": False}
GW_ANCHORS = 256  # GW solves (L_A L_B) problems of n x n anchors: 256 keeps 144 pairs under a second


@dataclass
class LayerMap:
    """Similarity of every (layer of A, layer of B) pair: ``scores[i, j]`` compares layers_a[i] with
    layers_b[j]; ``scores_per_condition[c]`` the same on condition c's samples (NaN where a
    condition has too few). ``diagnostics``: the unit intersection maps (correspondence.unit_intersection)."""

    scores: torch.Tensor
    layers_a: list
    layers_b: list
    metric: str = "cka"
    scores_per_condition: torch.Tensor | None = None
    diagnostics: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)

    @property
    def larger_is_better(self) -> bool:
        return METRICS[self.metric]

    def _map(self, condition) -> torch.Tensor:
        if condition is None:
            return self.scores
        if self.scores_per_condition is None:
            raise ValueError("condition was given but this map was drawn without conditions")
        c = _validate.integer("condition", condition, 0)
        if c >= self.scores_per_condition.shape[0]:
            raise ValueError(f"condition must be < {self.scores_per_condition.shape[0]}, got {c}")
        return self.scores_per_condition[c]

    def best_pairs(self, k: int = 5, condition=None) -> list[tuple[str, str, float]]:
        """The k most similar (layer_a, layer_b, score) pairs, best first (NaN entries last)."""
        k = _validate.integer("k", k, 1)
        s = self._map(condition).flatten()
        key = torch.nan_to_num(s if self.larger_is_better else -s, nan=-float("inf"))
        order = key.argsort(descending=True, stable=True)[:k].tolist()
        nb = len(self.layers_b)
        return [(self.layers_a[i // nb], self.layers_b[i % nb], float(s[i])) for i in order]

    def path(self, condition=None) -> list[tuple[str, str]]:
        """The depth-order-preserving correspondence (correspondence.monotone_path): one layer of B per layer
        of A, never going back in B's depth, with the best total score."""
        scores = self._map(condition)
        if condition is not None and bool(scores.isnan().all()):
            raise ValueError(f"condition {condition} has no scores: too few of its samples reached the map (a "
                             "condition's scores need the metric's least anchors; a minibatch, 4 rows of a batch)")
        steps = correspondence.monotone_path(scores, self.larger_is_better)
        return [(self.layers_a[i], self.layers_b[j]) for i, j in steps]

    def choose_stitch(self, blocks_after: dict | None = None) -> tuple[str, str, str]:
        """(layer_a, layer_b, why): the best pair whose B layer leaves at least one block of B after
        the tap. ``blocks_after[layer_b]`` counts B's blocks after it; by default each layer of the
        map's B side counts the map's later layers (so the last one is never chosen)."""
        after = blocks_after or {b: len(self.layers_b) - 1 - j for j, b in enumerate(self.layers_b)}
        ranked = self.best_pairs(len(self.layers_a) * len(self.layers_b))
        for a, b, score in ranked:
            if after.get(b, 0) >= 1 and score == score:
                why = (f"best {self.metric} ({score:.4f}) of the {len(ranked)} pairs of the layer map among those "
                       f"leaving B {after[b]} block(s) after its tap")
                return a, b, why
        raise ValueError("no pair of the layer map leaves B a block after the tap: list deeper layers of A or "
                         "earlier layers of B")

    def table(self, k: int = 5) -> str:
        """The k best pairs and the path, as text (what `tcfa layers` prints)."""
        lines = [f"{'layer of A':<24} {'layer of B':<24} {self.metric:>8}"]
        lines += [f"{a:<24} {b:<24} {s:8.4f}" for a, b, s in self.best_pairs(k)]
        lines.append("path: " + ", ".join(f"{a}->{b}" for a, b in self.path()))
        return "\n".join(lines)

    def plot(self, file: str, path=True) -> str:
        """Heatmap PNG of the map (with the path drawn when ``path``); with conditions, one small
        multiple per condition beside the overall map. Returns ``file``."""
        from .layer_map_plot import plot_layer_map

        return plot_layer_map(self, file, path)

    def save(self, file) -> dict:
        """Writes the map as a tcfa artifact (safetensors + verified header, atomic)."""
        tensors = {"scores": self.scores}
        if self.scores_per_condition is not None:
            tensors["scores_per_condition"] = self.scores_per_condition
        tensors.update({f"diagnostics.{k}": v for k, v in self.diagnostics.items()})
        return artifacts.save(file, tensors, kind="LayerMap", method=self.metric,
                              layers={"a": list(self.layers_a), "b": list(self.layers_b)}, config=self.config)

    @classmethod
    def load(cls, file) -> "LayerMap":
        art = artifacts.load(file, kind="LayerMap")
        la, lb = art.header["layers"]["a"], art.header["layers"]["b"]
        art.check_shapes({"scores": [len(la), len(lb)]})
        diag = {k.split(".", 1)[1]: v for k, v in art.tensors.items() if k.startswith("diagnostics.")}
        return cls(art.tensors["scores"], la, lb, art.header["method"], art.tensors.get("scores_per_condition"),
                   diag, art.config)


# ------------------------------------------------------------------ drawing the map
class _Rows:
    """Turns each tap into rows: one per sample ("pooled": the mean over positions; "flatten": every
    position's features in one row), or one per position ("tokens": every layer is carried onto the
    positions of B's first listed layer as tcfa.to_rows pairs a tap with B's -- grids resampled
    bilinearly, special tokens from the pooled features -- so that row r means the same sample and
    position in every layer). A (N, D) activation is its own row."""

    def __init__(self, mode: str, model_a, model_b):
        self.mode, self.models, self.layouts, self.ref = mode, {"a": model_a, "b": model_b}, {}, None

    def __call__(self, side: str, acts: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.mode != "tokens":
            return [a if a.dim() == 2 else _pooled(a) if self.mode == "pooled" else a.flatten(1) for a in acts]
        if any(a.dim() != 3 and a.dim() != 4 for a in acts):
            raise ValueError("mode='tokens' needs (N, C, H, W) or (N, T, D) activations at every layer; "
                             "use mode='pooled' for (N, D) ones")
        if side not in self.layouts:
            self.layouts[side] = [layout_of(a, model=self.models[side]) for a in acts]
            if side == "b":
                self.ref = self.layouts["b"][0]
        return [_source(a, lay, self.ref, "tokens")[0].reshape(-1, lay.width) for a, lay in zip(acts, self.layouts[side])]

    def per_sample(self) -> int:
        return 1 if self.mode != "tokens" else self.ref.positions


def _tap_all(model, paths, inputs, name, checked):
    """Features of every layer in ``paths`` from one forward (stopped after the deepest)."""
    found = capture(model, paths, inputs)
    if not checked and list(found) != paths:
        raise ValueError(f"{name} must be in depth order (the order the forward pass reaches them): got {paths}, "
                         f"the forward of {type(model).__name__} reached them as {list(found)}")
    return [found[p] for p in paths]


def _least_anchors(debiased: bool, estimator: str) -> int:
    """Samples an estimator needs: the unbiased HSIC (debiased, minibatch) divides by n - 3."""
    return 4 if (debiased or estimator == "minibatch") else 2


def _check_args(metric, estimator, mode, num_anchors, debiased, batch_size, k, reg, top_units, gw_eps):
    _validate.choice("metric", metric, tuple(METRICS))
    _validate.choice("estimator", estimator, ("full", "minibatch"))
    _validate.choice("mode", mode, ("pooled", "flatten", "tokens"))
    if estimator == "minibatch" and metric != "cka":
        raise ValueError(f"estimator='minibatch' is for metric='cka' only, got metric={metric!r}")
    if estimator == "minibatch" and _validate.integer("batch_size", batch_size, 1) < 4:
        raise ValueError(f"batch_size must be >= 4 for the minibatch estimator (its HSIC needs 4 rows), got {batch_size}")
    if k is not None:
        _validate.integer("k", k, 1)
    _validate.nonnegative("reg", reg)
    _validate.integer("top_units", top_units, 1)
    _validate.positive("gw_eps", gw_eps)
    least = _least_anchors(debiased, estimator)
    if num_anchors is not None and _validate.integer("num_anchors", num_anchors, 1) < least:
        raise ValueError(f"num_anchors must be >= {least} for {metric} ({estimator}), got {num_anchors}")


def _shared_options(sharded, la, lb, metric, estimator, mode, num, debiased):
    """What every rank of a sharded layer map must share (the number and size of its collectives)."""
    if sharded and estimator != "minibatch":
        raise ValueError(f"process_group needs estimator='minibatch' (its sums add over ranks), got {estimator!r}: "
                         "the 'full' estimator keeps every anchor's features in one process")
    return (None, {"layers_a": tuple(la), "layers_b": tuple(lb), "metric": metric, "estimator": estimator,
                   "mode": mode, "conditions": num, "debiased": bool(debiased)})


def layer_map(model_a: nn.Module, layers_a, model_b: nn.Module, layers_b, data, *, metric: str = "cka",
              conditions=None, num_anchors: int | None = None, batch_size: int = 256, estimator: str = "full",
              debiased: bool = False, mode: str = "pooled", k: int | None = None, reg: float = 1e-4,
              top_units: int = 16, gw_eps: float = 0.05, progress: bool = True, checkpoint=None,
              checkpoint_every: int = 100, process_group=None) -> LayerMap:
    """Draws the map of ``metric`` between every layer of ``layers_a`` and every layer of ``layers_b``.

    Layers: module paths or patterns ("blocks.*"), in depth order; "auto" takes the model's blocks
    (layer_names.default_layers). Each batch of ``data`` (as tcfa.extract takes it) runs each model
    once, tapping all its layers and stopping after the deepest. Per sample, a layer gives its
    ``mode`` rows: "pooled" (one per sample: the mean over spatial positions / tokens, as
    tcfa.to_rows pools), "flatten" (one per sample holding every position, as Kornblith et al. and
    torch-cka compare) or "tokens" (one per position of B's first listed layer, every layer carried
    onto those positions by the layouts of tcfa.to_rows; anchors still count samples).

    metric: "cka" (linear; ``debiased`` for the unbiased HSIC), "cca" (mean of the top ``k``
    canonical correlations, ``reg``), "procrustes", "gw" (entropic GW with ``gw_eps``; lower is
    better). estimator: "full" keeps the first ``num_anchors`` samples' features (all samples when
    None; 256 for gw) and computes every pair on all of them; "minibatch" (cka) averages the
    unbiased HSIC over batches of ``batch_size`` (torch-cka's estimator) with memory independent of
    the data size. ``conditions``: one id per sample of ``data`` (an int64 tensor or tcfa
    Conditions) adds ``scores_per_condition``. Memory of "full": n * (sum of widths).
    ``checkpoint``: a file path; the features (full) or HSIC sums (minibatch) and the position in
    ``data`` are saved there every ``checkpoint_every`` batches, and a rerun of the same call
    resumes from it (tcfa.pipeline.checkpoint). ``process_group`` (estimator "minibatch"): each
    rank streams its own shard of ``data``; the HSIC sums are summed over the ranks (collectives
    bounded by tcfa.distributed.collective_timeout) and every rank returns the map of all the data.
    Ranks must pass the same layers, metric, mode and number of conditions (a named error otherwise).
    """
    _check_args(metric, estimator, mode, num_anchors, debiased, batch_size, k, reg, top_units, gw_eps)
    la = default_layers(model_a) if layers_a == "auto" else resolve_layers("layers_a", model_a, layers_a)
    lb = default_layers(model_b) if layers_b == "auto" else resolve_layers("layers_b", model_b, layers_b)
    if num_anchors is None and metric == "gw":
        num_anchors = GW_ANCHORS
    ids, num = (None, None) if conditions is None else condition_ids("conditions", conditions, None, None)
    comm = distributed.communicator(process_group, call="layer_map")
    comm.agree(_shared_options, comm.sharded, la, lb, metric, estimator, mode, num, debiased)
    feats_a, feats_b, labels, minibatch, per_condition = [], [], [], None, None
    if estimator == "minibatch":  # all rows of each batch, and (with conditions) each condition's rows
        minibatch = similarity.MinibatchCKA(len(la), len(lb))
        per_condition = similarity.MinibatchCKA(len(la), len(lb), num) if ids is not None else None
    to_rows = _Rows(mode, model_a, model_b)
    if ids is not None:
        batches = _labelled_batches(data, ids, batch_size)
    else:
        batches = ((b, None) for b in _batches(data, batch_size))
    first, batches = peek(batches)
    state = {"seen": torch.zeros((), dtype=torch.int64)}

    def step(batch):
        inputs, y = batch
        seen = int(state["seen"])
        take = _batch_len(inputs) if num_anchors is None else min(_batch_len(inputs), num_anchors - seen)
        acts_a = [t[:take] for t in _tap_all(model_a, la, inputs, "layers_a", seen > 0)]
        # B first: in tokens mode A's rows are laid on the positions of B's first layer
        xb = to_rows("b", [t[:take] for t in _tap_all(model_b, lb, inputs, "layers_b", seen > 0)])
        xa = to_rows("a", acts_a)
        # one compute dtype for both models (an fp32 model against a bf16 one): fp64 if either is
        ct = torch.float64 if any(t.dtype == torch.float64 for t in xa + xb) else torch.float32
        xa, xb = [t.to(ct) for t in xa], [t.to(ct) for t in xb]
        y = None if y is None else y[:take].repeat_interleave(to_rows.per_sample())
        state["seen"] += take
        if minibatch is not None:
            minibatch.update(xa, xb)
            if per_condition is not None:
                per_condition.update(xa, xb, y)
        else:
            feats_a.append(xa)
            feats_b.append(xb)
            labels.append(y)

    sums = {"mb": minibatch, "pc": per_condition}

    def get_state():
        out = {"seen": state["seen"]}
        for prefix, est in sums.items():
            if est is not None:
                out.update({f"{prefix}.{k}": getattr(est, k) for k in est.SUMS})
        if minibatch is None and feats_a:
            out.update({f"a.{i}": torch.cat(parts) for i, parts in enumerate(zip(*feats_a))})
            out.update({f"b.{i}": torch.cat(parts) for i, parts in enumerate(zip(*feats_b))})
            if labels[0] is not None:
                out["labels"] = torch.cat(labels)
        return out

    def set_state(saved):
        state["seen"] = saved["seen"]
        for prefix, est in sums.items():
            for k in est.SUMS if est is not None else ():
                setattr(est, k, saved[f"{prefix}.{k}"])
        if minibatch is None and "a.0" in saved:
            feats_a[:] = [[saved[f"a.{i}"] for i in range(len(la))]]
            feats_b[:] = [[saved[f"b.{i}"] for i in range(len(lb))]]
            labels[:] = [saved.get("labels")]

    def config():
        return dict(call="layer_map", layers_a=la, layers_b=lb, models=[model_fingerprint(model_a),
                                                                          model_fingerprint(model_b)],
                    metric=metric, estimator=estimator, mode=mode,
                    num_anchors=num_anchors, batch_size=batch_size, conditions=num, data_length=data_length(data),
                    first_batch=None if first is None else batch_fingerprint(first[0]))

    with _inference(model_a, model_b):
        run(_progress(batches, progress, f"layer map {len(la)}x{len(lb)}"), step,
            Checkpoint.optional(checkpoint, checkpoint_every, config), get_state, set_state,
            stop=lambda: num_anchors is not None and int(state["seen"]) >= num_anchors)
    stopped_early = num_anchors is not None and int(state["seen"]) >= num_anchors
    if ids is not None and not stopped_early and int(state["seen"]) != ids.shape[0]:
        raise ValueError(f"conditions has {ids.shape[0]} entries but data held {int(state['seen'])} samples")
    if comm.sharded:  # HSIC sums add over disjoint batches: the ranks' sums are the whole data's
        for est in (minibatch, per_condition):
            for name in est.SUMS if est is not None else ():
                distributed.all_reduce(getattr(est, name), dist.ReduceOp.SUM, process_group, f"layer_map: {name}")
        distributed.all_reduce(state["seen"], dist.ReduceOp.SUM, process_group, "layer_map: samples")
    seen = int(state["seen"])
    least = _least_anchors(debiased, estimator)
    if seen < least:
        raise ValueError(f"data gave {seen} samples; {metric} ({estimator}) needs at least {least} anchors")
    if minibatch is not None and int(minibatch.batches.sum()) == 0:
        raise ValueError("no batch of data held 4 samples: the minibatch estimator needs batches of at least 4")
    # the minibatch estimator is the unbiased HSIC (torch-cka's) whatever ``debiased`` says
    config = dict(estimator=estimator, mode=mode, debiased=debiased or minibatch is not None, num_anchors=seen,
                  batch_size=batch_size, k=k, reg=reg, top_units=top_units, gw_eps=gw_eps)
    if minibatch is not None:
        per_cond = per_condition.result() if per_condition is not None else None
        return LayerMap(minibatch.result()[0], la, lb, metric, per_cond, {}, config)
    xa = [torch.cat(parts) for parts in zip(*feats_a)]
    xb = [torch.cat(parts) for parts in zip(*feats_b)]
    score = _scorer(metric, debiased, k, reg, gw_eps)
    per_cond = None
    if ids is not None:
        lab = torch.cat(labels)
        per_cond = torch.stack([_on_rows(score, xa, xb, (lab == c).nonzero().flatten(), least, len(la), len(lb))
                                for c in range(num)])
    paired = similarity.PairedLayers(xa, xb, least)  # one X_A^T X_B for the metric and the diagnostics
    # the diagnostics need the cross-covariance of every pair of units: skipped where it would not fit
    diagnostics = correspondence.intersection_of(paired, top_units) if metric != "gw" and paired.cross_fits() else {}
    return LayerMap(score(paired), la, lb, metric, per_cond, diagnostics, config)


def _scorer(metric, debiased, k, reg, gw_eps):
    """The metric as a function of similarity.PairedLayers."""
    if metric == "cka":
        return lambda p: similarity.cka_of(p, debiased)
    if metric == "cca":
        return lambda p: similarity.cca_of(p, k, reg)
    if metric == "procrustes":
        return similarity.procrustes_of
    return lambda p: correspondence.pairwise_gw(p.xs, p.ys, eps=gw_eps)


def _on_rows(score, xa, xb, rows, least, na, nb):
    """The metric on one condition's rows; NaN when it has fewer than ``least``."""
    if rows.numel() < least:
        return torch.full((na, nb), float("nan"), dtype=torch.float64)
    rows = rows.to(xa[0].device)
    return score(similarity.PairedLayers([x.index_select(0, rows) for x in xa], [y.index_select(0, rows) for y in xb],
                                         least))


def auto_layers(model_a, layer_a: str, model_b, layer_b: str, data, *, metric: str = "cka", num_anchors: int = 512,
                batch_size: int = 256, progress: bool = False):
    """Resolves ``"auto"`` tap points: (layer_a, layer_b, why, LayerMap).

    An "auto" side searches its model's blocks (layer_names.default_layers); a named side stays
    fixed (a named layer_b is taken as given, even B's last block: only A's layer is chosen). The map
    is drawn on the first ``num_anchors`` samples of ``data`` (pooled features) and
    the pair chosen is the best-scoring one whose B layer leaves at least one of B's blocks after
    the tap (LayerMap.choose_stitch): a stitch into B's last block would leave B nothing to run.
    """
    la = default_layers(model_a) if layer_a == "auto" else [layer_a]
    blocks_b = default_layers(model_b)
    lb = blocks_b if layer_b == "auto" else [layer_b]
    if layer_b == "auto" and len(lb) > 1:
        lb = lb[:-1]  # the last block leaves B nothing after it: not a candidate, not worth tapping
    lm = layer_map(model_a, la, model_b, lb, data, metric=metric, num_anchors=num_anchors, batch_size=batch_size,
                   progress=progress)
    if layer_b != "auto":  # the user fixed B's tap: the best layer of A against it, whatever follows it
        a, b, score = lm.best_pairs(1)[0]
        if score != score:
            raise ValueError(f"every score of the layer map against layer_b={layer_b!r} is NaN: too few samples")
        return a, b, f"best {lm.metric} ({score:.4f}) of the {len(la)} layers of A against the given layer_b", lm
    after = {b: len(blocks_b) - 1 - blocks_b.index(b) if b in blocks_b else 1 for b in lb}
    a, b, why = lm.choose_stitch(after)
    return a, b, why, lm
