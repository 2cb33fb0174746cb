"""`tcfa ablate`: the TCFA proposal's ablations on the digits, one factor at a time around a default cell.

For each architecture pair (CNN->ViT, ViT->ViT of another width and depth, CNN->CNN of another depth;
timm models trained here, cached) and each seed, the layer map of the two models' blocks gives the
stitch points (up to 4 pairs along its path that leave B a block) and the default point (the pair
``layer_a="auto"`` picks). The default cell: class-conditioned CCA (rank 16), zero-shot. The axes:

- point       every stitch point, conditioned (class) and not
- method      cca, ot, ridge, procrustes, conditioned and not
- conditions  class (k 2, 5, 10), A's confidence bins (k 2, 5, 10), and on rotated / noisy digits the
              transform level (k 2, 5, 10) against no conditions on the same data   [CNN->ViT]
- tuning      zero_shot, direct, task, fula, partial; class-conditioned CCA and unconditioned ridge
- candidates  what might make conditioning pay: a gate trained to recognise the conditions ("learned
              gate"), a gate started uniform and learned from the task loss while tuning ("uniform
              gate"), top-1 routing instead of soft gates, shared-basis maps (M_0 + rank-2
              corrections), scaled-basis maps (one basis, singular values per condition), zero-shot
              and task-tuned; and at matched parameter counts: the unconditioned maps at the
              shared-basis stitch's Δθ, the class maps, the shared and the scaled basis within the
              unconditioned rank-16 stitch's Δθ, with soft and with top-1 routing
- baselines   A alone, B alone, linear stitching (unconditioned ridge at the default stitch's
              parameter count), full fine-tuning of B (same data and steps), weight averaging / TIES
              (when the pair's parameters match; never here)

Each cell gives accuracy, trainable parameters (Δθ), the stitch's forward FLOPs per image (torch's
FlopCounterMode), CKA and RSA of the tap before and of the stitched activation after, and the gate's
accuracy on the conditions. ablation.json holds one record per cell and seed; the tables average seeds.
"""
from __future__ import annotations

import json
import os
import time

import torch

from ..artifacts import write_text_atomically
from ..pipeline import data, evaluate
from ..pipeline.ablation import (conditions_of, fine_tune, fit_stitched, measure, shifted_data, similarity_before,
                                 top_probability, train_gate)
from ..pipeline.align import tune
from ..pipeline.baselines import merge_applicability
from ..pipeline.layer_map import layer_map
from ..pipeline.layer_names import default_layers
from ..shared_stitch import ScaledBasisStitch, SharedBasisStitch
from ..stitch import GatedMultiStitch
from .demo import IMAGE, MODELS as DEMO_MODELS, trained_model
from .demo_adapters import MODELS as VIT_MODELS
from .report import machine

MODELS = {"cnn": DEMO_MODELS["A"], "vit": DEMO_MODELS["B"], "vit_wide": VIT_MODELS["B"],
          "cnn_deep": {"name": "resnet18", "kwargs": {"layers": [2, 2, 2, 2], "channels": [24, 48, 96, 96],
                                                      "stem_width": 16, "output_stride": 8, "num_classes": 10}}}
PAIRS = {"cnn->vit": ("cnn", "vit"), "vit->vit": ("vit", "vit_wide"), "cnn->cnn": ("cnn", "cnn_deep")}
METHODS = ("cca", "ot", "ridge", "procrustes")
TUNINGS = ("zero_shot", "direct", "task", "fula", "partial")
DEFAULT = {"method": "cca", "conditions": "class", "k": 10, "data": "original", "levels": None,
           "tuning": "zero_shot", "variant": None, "rank": 16, "cond_rank": None, "scaled": False}
RANK = 16
COND_RANK = 2  # the shared-basis stitch's per-condition correction
# conditioned stitches within the unconditioned rank-16 stitch's Δθ: (equal_ranks key, variant, cell fields)
MATCHED = (("scaled at plain", "scaled basis at the unconditioned Δθ", {"scaled": True}),
           ("class at plain", "at the unconditioned Δθ", {}),
           ("shared at plain", "shared basis at the unconditioned Δθ", {"cond_rank": 1}))


def _cell(axis: str, point, **over) -> dict:
    return {"axis": axis, "layer_a": point[0], "layer_b": point[1], **DEFAULT, **over}


def grid(pair: str, points, default_point, *, quick: bool, ranks: dict) -> list[dict]:
    """The cells of one architecture pair (one-factor-at-a-time around DEFAULT at default_point);
    ``ranks``: the parameter-matched ranks of the candidates (equal_ranks)."""
    none = {"conditions": "none", "k": 1}
    cells = []
    for p in points:
        cells += [_cell("point", p), _cell("point", p, **none)]
    for m in (("cca", "ridge") if quick else METHODS):
        cells += [_cell("method", default_point, method=m), _cell("method", default_point, method=m, **none)]
    if pair == "cnn->vit":
        ks = (2,) if quick else (2, 5, 10)
        cells += [_cell("conditions", default_point, conditions=c, k=k) for c in ("class", "confidence") for k in ks]
        for kind in (("rotation",) if quick else ("rotation", "noise")):
            for k in ((2,) if quick else (2, 5, 10)):
                cells += [_cell("conditions", default_point, data=kind, levels=k, conditions="transform", k=k),
                          _cell("conditions", default_point, data=kind, levels=k, **none)]
    for mode in (("zero_shot", "task") if quick else TUNINGS):
        cells += [_cell("tuning", default_point, tuning=mode),
                  _cell("tuning", default_point, tuning=mode, method="ridge", **none)]
    for tuning in ("zero_shot", "task"):
        cells += [_cell("candidates", default_point, tuning=tuning, variant="learned gate"),
                  _cell("candidates", default_point, tuning=tuning, variant="top-1"),
                  _cell("candidates", default_point, tuning=tuning, variant="uniform gate"),
                  _cell("candidates", default_point, tuning=tuning, variant="shared basis", cond_rank=COND_RANK),
                  _cell("candidates", default_point, tuning=tuning, variant="at the shared basis's Δθ", method="ridge",
                        rank=ranks["plain at shared"], **none),
                  _cell("candidates", default_point, tuning=tuning, variant="at the shared basis's Δθ",
                        rank=ranks["plain at shared"], **none)]
        cells.append(_cell("candidates", default_point, tuning=tuning, variant="scaled basis", scaled=True))
        for routing in ("", ", top-1"):  # routing: soft gates, or the one best map (top_k = 1)
            for budget, variant, stitch in MATCHED:
                if ranks[budget]:
                    cells.append(_cell("candidates", default_point, tuning=tuning, variant=variant + routing,
                                       rank=ranks[budget], **stitch))
    return cells


def _largest(fits, limit: int) -> int:
    """The largest r in 1..limit with fits(r), or 0."""
    return max((r for r in range(1, limit + 1) if fits(r)), default=0)


def equal_ranks(dx: int, dy: int) -> dict:
    """Ranks that match parameter counts at one tap pair (counted from the modules, 10 class conditions):
    the unconditioned map with the shared-basis stitch's Δθ and with the default (10 rank-16 maps) Δθ,
    and the class maps, the shared basis (rank-1 corrections) and the scaled basis within the unconditioned
    rank-16 Δθ."""
    top = min(dx, dy)
    plain = GatedMultiStitch(dx, dy, 1, min(RANK, top)).num_trainable()
    return {"plain at shared": _rank_for_params(SharedBasisStitch(dx, dy, 10, RANK, COND_RANK).num_trainable(), dx, dy),
            "plain at default": _rank_for_params(GatedMultiStitch(dx, dy, 10, RANK).num_trainable(), dx, dy),
            "class at plain": _largest(lambda r: GatedMultiStitch(dx, dy, 10, r).num_trainable() <= plain, top),
            "shared at plain": _largest(lambda r: SharedBasisStitch(dx, dy, 10, r, 1).num_trainable() <= plain, top),
            "scaled at plain": _largest(lambda r: ScaledBasisStitch(dx, dy, 10, r).num_trainable() <= plain, top)}


class _Pair:
    """One architecture pair at one seed: models, data, the layer map's stitch points."""

    def __init__(self, pair, seed, *, epochs, n_train, cache, log):
        x, y = data.digits_images(IMAGE)
        tr, te = data.split(x.shape[0], 0.25, seed)
        tr = tr if n_train is None else tr[:n_train]
        self.x_tr, self.y_tr, self.x_te, self.y_te = x[tr], y[tr], x[te], y[te]
        a, b = PAIRS[pair]
        self.model_a = trained_model(MODELS[a], self.x_tr, self.y_tr, epochs=epochs, lr=3e-3, seed=seed, cache=cache,
                                     log=log)[0]
        self.model_b = trained_model(MODELS[b], self.x_tr, self.y_tr, epochs=epochs, lr=3e-3, seed=seed, cache=cache,
                                     log=log)[0]
        self.layers_b = default_layers(self.model_b)
        lm = layer_map(self.model_a, default_layers(self.model_a), self.model_b, self.layers_b, self.x_tr,
                       num_anchors=min(512, self.x_tr.shape[0]), progress=False)
        path = [(a_, b_) for a_, b_ in lm.path() if self.layers_b.index(b_) < len(self.layers_b) - 1]
        path = list(dict.fromkeys(path))
        step = max(1, len(path) / 4)
        self.points = [path[int(i * step)] for i in range(min(4, len(path)))]
        self.default_point = lm.choose_stitch()[:2]
        if self.default_point not in self.points:
            self.points.append(self.default_point)
        self.map_scores = {f"{a_}->{b_}": float(lm.scores[lm.layers_a.index(a_), lm.layers_b.index(b_)])
                           for a_, b_ in self.points}
        self.seed = seed
        self._confidence, self.before = {}, {}

    def later(self, path_b):
        return self.layers_b[self.layers_b.index(path_b) + 1:]

    def confidence(self, name, x):
        if name not in self._confidence:
            self._confidence[name] = top_probability(self.model_a, x)
        return self._confidence[name]


def _rank_for_params(params: int, dx: int, dy: int) -> int:
    """The rank whose unconditioned GatedMultiStitch has at most ``params`` parameters, (dx + dy) r + 2 dx + dy + 1
    (capped at min(dx, dy))."""
    return max(1, min(min(dx, dy), (params - 2 * dx - dy - 1) // (dx + dy)))


def run_cell(p: _Pair, cell: dict, *, tune_steps: int) -> dict:
    """Fits, tunes and measures one cell; returns its metrics."""
    x_tr, t_tr = shifted_data(p.x_tr, cell["data"], cell["levels"] or 2, p.seed)
    x_te, t_te = shifted_data(p.x_te, cell["data"], cell["levels"] or 2, p.seed + 1000)
    name = f"{cell['data']}/{cell['levels']}"
    c_tr = conditions_of(cell["conditions"], cell["k"], p.y_tr, transform=t_tr,
                         confidence=p.confidence(name + "/tr", x_tr) if cell["conditions"] == "confidence" else None)
    c_te = conditions_of(cell["conditions"], cell["k"], p.y_te, transform=t_te,
                         confidence=p.confidence(name + "/te", x_te) if cell["conditions"] == "confidence" else None)
    rank = cell["rank"]
    t0 = time.perf_counter()
    top_k = 1 if "top-1" in (cell["variant"] or "") else None
    sm = fit_stitched(p.model_a, cell["layer_a"], p.model_b, cell["layer_b"], x_tr, c_tr, method=cell["method"],
                      rank=rank, cond_rank=cell["cond_rank"], scaled=cell["scaled"], top_k=top_k,
                      gate="uniform" if cell["variant"] == "uniform gate" else "centroids", seed=p.seed)
    if cell["variant"] == "learned gate":
        train_gate(sm, x_tr, c_tr, seed=p.seed)
    later = p.later(cell["layer_b"])
    tune(sm, cell["tuning"], x_tr, p.y_tr, steps=tune_steps, lr=3e-3, later_paths=later[:2],
         next_path=later[0] if later else None, seed=p.seed)
    out = {"rank_used": rank, "fit_seconds": time.perf_counter() - t0, **measure(sm, x_te, p.y_te, c_te)}
    key = (cell["layer_a"], cell["layer_b"], name)  # A and B are frozen: one measurement per tap pair and data
    if key not in p.before:
        p.before[key] = similarity_before(p.model_a, cell["layer_a"], p.model_b, cell["layer_b"], x_te)
    out.update(p.before[key])
    return out


def baselines(p: _Pair, pair: str, *, tune_steps: int) -> list[dict]:
    """A alone, B alone, B fully fine-tuned on the tuning data for the tuning steps, weight merging."""
    acc = lambda m: evaluate.accuracy(m, p.x_te, p.y_te)  # noqa: E731
    out = [{"method": "A alone", "accuracy": acc(p.model_a), "trainable_params": 0},
           {"method": "B alone", "accuracy": acc(p.model_b), "trainable_params": 0}]
    tuned = fine_tune(p.model_b, p.x_tr, p.y_tr, steps=tune_steps, seed=p.seed)
    out.append({"method": "full fine-tuning of B", "accuracy": acc(tuned),
                "trainable_params": sum(q.numel() for q in tuned.parameters()), "steps": tune_steps})
    ok, why = merge_applicability(p.model_a, p.model_b)
    out.append({"method": "weight averaging / TIES", "note": "applicable" if ok else why})
    return [{"pair": pair, "seed": p.seed, "axis": "baselines", **r} for r in out]


# `tcfa ablate --quick` (and the test suite): one pair, a reduced grid, one epoch of training on 300 images
QUICK = {"pairs": ("cnn->vit",), "quick": True, "epochs": 1, "tune_steps": 3, "n_train": 300}


def run(out_dir: str | None = "ablation_output", *, seeds=(0, 1, 2), pairs=tuple(PAIRS), quick: bool = False,
        epochs: int = 12, tune_steps: int = 60, n_train: int | None = None, cache: bool = True, log=print) -> dict:
    """Runs the grid; returns {"records", "settings", "machine", "seconds"} (also out_dir/ablation.json + plots)."""
    t0 = time.perf_counter()
    records = []
    for pair in pairs:
        for seed in seeds:
            p = _Pair(pair, seed, epochs=epochs, n_train=n_train, cache=cache, log=log)
            dx, dy = _widths(p, {"layer_a": p.default_point[0], "layer_b": p.default_point[1]})
            ranks = equal_ranks(dx, dy)
            cells = grid(pair, p.points, p.default_point, quick=quick, ranks=ranks)
            cells.append(_cell("baselines", p.default_point, method="ridge", conditions="none", k=1,
                               variant="linear stitching at the default's Δθ", rank=ranks["plain at default"]))
            for cell in cells:
                metrics = run_cell(p, cell, tune_steps=tune_steps)
                widths = dict(zip(("dx", "dy"), _widths(p, cell)))
                records.append({"pair": pair, "seed": seed, **cell, **metrics, **widths,
                                "map_score": p.map_scores.get(f"{cell['layer_a']}->{cell['layer_b']}")})
            records += baselines(p, pair, tune_steps=tune_steps)
            log(f"{pair} seed {seed}: {len(cells)} cells, {time.perf_counter() - t0:.0f} s")
    out = {"records": records, "machine": machine(), "seconds": time.perf_counter() - t0,
           "settings": {"seeds": list(seeds), "pairs": list(pairs), "quick": quick, "epochs": epochs,
                        "tune_steps": tune_steps, "n_train": n_train, "rank": RANK, "cond_rank": COND_RANK,
                        "models": {k: MODELS[k] for pr in pairs for k in PAIRS[pr]}}}
    if out_dir:
        from .ablate_report import plot, summary

        os.makedirs(out_dir, exist_ok=True)
        write_text_atomically(os.path.join(out_dir, "ablation.json"), json.dumps(out, indent=1))
        plot(out, out_dir)
        log(summary(out))
    return out


def _widths(p: _Pair, cell) -> tuple[int, int]:
    """(dx, dy): the channel widths of A's and B's taps of ``cell``."""
    from ..pipeline.models import capture

    with torch.no_grad():
        got_a = capture(p.model_a, [cell["layer_a"]], p.x_tr[:1])[cell["layer_a"]]
        got_b = capture(p.model_b, [cell["layer_b"]], p.x_tr[:1])[cell["layer_b"]]
    width = lambda t: t.shape[1] if t.dim() == 4 else t.shape[-1]  # noqa: E731
    return width(got_a), width(got_b)
