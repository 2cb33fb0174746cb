"""The demo's layer map: A's blocks against B's blocks on digits, and stitches along the map's path.

Does the map predict where stitching works? For each pair on the map's path, the pair
``layer_a="auto"`` would choose and the diagonal pairs (A's i-th block into B's i-th), a
class-conditioned CCA stitch is fitted zero-shot and then task-tuned, and its test accuracy is
reported beside the pair's CKA.
"""
from __future__ import annotations

import os

import torch

from ..pipeline import evaluate
from ..pipeline.align import TCFA, tune
from ..pipeline.data import class_conditions
from ..pipeline.layer_map import layer_map
from ..pipeline.layer_names import default_layers
from ..pipeline.models import extract, layout_of, paired_rows
from ..pipeline.stitched import StitchedModel

ANCHORS = 1024  # training images the map is drawn on


def _stitch(model_a, path_a, model_b, path_b, x_tr, y_tr, x_te, rank, seed):
    """A class-conditioned CCA stitch A[path_a] -> B[path_b], B's special tokens with their own stitch."""
    act_a, act_b = extract(model_a, path_a, x_tr), extract(model_b, path_b, x_tr)
    layout_b = layout_of(act_b, model=model_b)
    rows_a, rows_b = paired_rows(act_a, act_b, "tokens", layout_a=layout_of(act_a, model=model_a), layout_b=layout_b)
    per, special = layout_b.positions, layout_b.num_special
    is_special = torch.arange(rows_a.shape[0]) % per < special
    c = class_conditions(y_tr)
    r = min(rank, rows_a.shape[1], rows_b.shape[1])
    make = lambda: TCFA("cca", rank=r, conditions=c.num, seed=seed)  # noqa: E731
    stitch = make().fit(rows_a[~is_special], rows_b[~is_special], c.ids.repeat_interleave(per - special))
    cls_stitch = make().fit(rows_a[is_special], rows_b[is_special], c.ids.repeat_interleave(special)) if special else None
    return StitchedModel(model_a, path_a, model_b, path_b, stitch, cls_stitch=cls_stitch, example_input=x_te[:1])


def run(model_a, model_b, x_tr, y_tr, x_te, y_te, *, rank, tune_steps, later_b, seed, out_dir, log=print) -> dict:
    """Draws the map (writes out_dir/layer_map.png) and evaluates stitches along its path; a JSON-ready dict."""
    la, lb = default_layers(model_a), default_layers(model_b)
    lm = layer_map(model_a, la, model_b, lb, x_tr, conditions=class_conditions(y_tr), num_anchors=ANCHORS,
                   progress=False)
    a_auto, b_auto, why = lm.choose_stitch()
    # the path, the auto pair and the diagonal (depth i of A into depth i of B): pairs the map rates
    # low as well as high, so the table can show whether its ranking matches the stitches'
    diagonal = [(la[i], lb[i]) for i in range(min(len(la), len(lb)))]
    pairs = list(dict.fromkeys(lm.path() + [(a_auto, b_auto)] + diagonal))
    along = []
    for path_a, path_b in pairs:
        sm = _stitch(model_a, path_a, model_b, path_b, x_tr, y_tr, x_te, rank, seed)
        zero = evaluate.accuracy(sm, x_te, y_te)
        later = [p for p in later_b if lb.index(p) > lb.index(path_b)] if path_b in lb else []
        tune(sm, "task", x_tr, y_tr, steps=tune_steps, lr=3e-3, later_paths=later, seed=seed)
        along.append({"layer_a": path_a, "layer_b": path_b, "cka": float(lm.scores[la.index(path_a), lb.index(path_b)]),
                      "zero_shot": zero, "task": evaluate.accuracy(sm, x_te, y_te),
                      "on_path": (path_a, path_b) in lm.path(), "auto": (path_a, path_b) == (a_auto, b_auto)})
        log(f"  map pair {path_a:>9} -> {path_b:<9} CKA {along[-1]['cka']:.3f}  zero-shot {zero:.3f}  "
            f"task-tuned {along[-1]['task']:.3f}")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        log(f"wrote {lm.plot(os.path.join(out_dir, 'layer_map.png'))}")
    return {"layers_a": la, "layers_b": lb, "anchors": ANCHORS, "scores": lm.scores.tolist(),
            "auto": {"layer_a": a_auto, "layer_b": b_auto, "why": why}, "along_path": along}


def section(doc: dict) -> list[str]:
    """README lines: the map's table and what the stitches along its path reached."""
    m = doc["layer_map"]
    head = "| A \\ B | " + " | ".join(f"`{b}`" for b in m["layers_b"]) + " |"
    lines = ["Linear CKA of A's blocks against B's blocks (pooled features, "
             f"{m['anchors']} training images; `layer_map.png` adds one panel per class):", "", head,
             "|---" * (len(m["layers_b"]) + 1) + "|"]
    lines += [f"| `{a}` | " + " | ".join(f"{s:.3f}" for s in row) + " |" for a, row in zip(m["layers_a"], m["scores"])]
    lines += ["", "Class-conditioned CCA stitches at the pairs of the map's path, the `auto` pair and the "
              "diagonal, test accuracy zero-shot and after task tuning:", "",
              "| A layer | B layer | CKA | zero-shot | task-tuned | |", "|---|---|---|---|---|---|"]
    for r in m["along_path"]:
        tags = ", ".join(t for t, on in (("path", r["on_path"]), ("auto", r["auto"])) if on)
        lines.append(f"| `{r['layer_a']}` | `{r['layer_b']}` | {r['cka']:.3f} | {r['zero_shot']:.3f} | "
                     f"{r['task']:.3f} | {tags} |")
    best_map = max(m["along_path"], key=lambda r: r["cka"])
    best_zero = max(m["along_path"], key=lambda r: r["zero_shot"])
    lines += ["", f"`auto` chose `{m['auto']['layer_a']}` -> `{m['auto']['layer_b']}`: {m['auto']['why']}. "
              f"Of these pairs the highest CKA is `{best_map['layer_a']}` -> `{best_map['layer_b']}` "
              f"({best_map['cka']:.3f}, zero-shot {best_map['zero_shot']:.3f}); the best zero-shot stitch is "
              f"`{best_zero['layer_a']}` -> `{best_zero['layer_b']}` ({best_zero['zero_shot']:.3f}, CKA "
              f"{best_zero['cka']:.3f})."]
    return lines
