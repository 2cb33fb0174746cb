"""`tcfa demo`: stitch a small timm CNN into a small timm ViT on sklearn digits with every TCFA method.

1. Train a timm ResNet (model A: BasicBlocks, one per stage, 16-64 channels) and a timm
   VisionTransformer (model B: 4 blocks of width 48, 8 px patches), both random-init from
   ``timm.create_model(..., pretrained=False)`` with small kwargs (MODELS), on the digits
   upsampled to 32 px. Trained weights are cached under ~/.cache/tcfa (or $TCFA_CACHE) keyed by
   a hash of the model spec, the timm version and the training settings.
2. Tap A after its third stage (``layer3``: 64 channels on a 4x4 grid) and B after its second
   of four blocks (``blocks.1``: CLS + 4x4 patch tokens, width 48); each of A's positions feeds
   the matching patch token, B's CLS is fed from A's pooled features (tcfa/pipeline/layouts.py).
3. Fit a stitch with each method (cca, ot, ridge, procrustes) under class conditions and
   without conditions (`none`), evaluate zero-shot, then tune the class-conditioned CCA and
   the unconditioned ridge stitches with each tuning mode.
4. Draw the layer map of A's blocks against B's blocks (tcfa.layer_map, layer_map.png) and stitch
   at the pairs along its path (tcfa/cli/demo_layer_map.py).
5. Report accuracy, Δaccuracy vs the better of A and B, Δθ, CKA at B's tap (overall and per
   class), accuracy under corruption; write results.json (records, the machine, the settings,
   the wall time) and stitching.png. ``python -m tcfa.cli.report`` puts results.json into README.md.
"""
from __future__ import annotations

import hashlib
import json
import os
import time

import torch
from torch import nn

from ..artifacts import save_figure, write_text_atomically
from ..pipeline import data, evaluate
from ..pipeline.align import TCFA, tune
from ..pipeline.baselines import merge_applicability
from ..pipeline.data import class_conditions, no_conditions
from ..pipeline.models import extract, layout_of, paired_rows
from ..pipeline.stitched import StitchedModel
from .report import machine, table

PATH_A, PATH_B = "layer3", "blocks.1"
LATER_B = ("blocks.2", "blocks.3")  # B's depths after the tap, for "fula"
IMAGE = 32
# timm's registered names with their architecture kwargs overridden (kwargs win over the
# name's defaults): a 4-stage BasicBlock ResNet and a 4-block ViT for 32 px images. A's
# output_stride=8 dilates layers 3-4 instead of striding them, so layer3 keeps the 4x4 grid of
# B's patches. (Tried first: layer2 of the undilated net, 32 channels on that grid; its zero-shot
# stitches reached 0.28-0.70 accuracy rather than 0.91-0.98, B's CLS being poorly predicted.)
MODELS = {
    "A": {"name": "resnet18", "kwargs": {"layers": [1, 1, 1, 1], "channels": [16, 32, 64, 64], "stem_width": 16,
                                         "output_stride": 8, "num_classes": 10}},
    "B": {"name": "vit_tiny_patch16_224", "kwargs": {"img_size": IMAGE, "patch_size": 8, "embed_dim": 48, "depth": 4,
                                                     "num_heads": 4, "mlp_ratio": 2.0, "num_classes": 10}},
}


def build(spec: dict) -> nn.Module:
    """A random-init timm model from a MODELS entry (never downloads: pretrained=False)."""
    import timm

    return timm.create_model(spec["name"], pretrained=False, **spec["kwargs"])


def cache_dir() -> str:
    return os.environ.get("TCFA_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "tcfa"))


def trained_model(spec: dict, x, y, *, epochs: int, lr: float, seed: int, cache: bool = True,
                  log=print) -> tuple[nn.Module, bool]:
    """(model built from ``spec`` and trained on (x, y), True when it came from the cache)."""
    import timm

    key_doc = {"model": spec, "timm": timm.__version__, "epochs": epochs, "lr": lr, "seed": seed,
               "n": int(x.shape[0]), "image": IMAGE}
    key = hashlib.sha256(json.dumps(key_doc, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir(), f"timm-{spec['name']}-{key}.pt")
    torch.manual_seed(seed)
    model = build(spec)
    if cache and os.path.exists(path):
        model.load_state_dict(torch.load(path, map_location="cpu"))
        log(f"loaded {spec['name']} from {path}")
        return model.eval(), True
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((x.shape[0] + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1))
    from tqdm.auto import tqdm

    model.train()
    bar = tqdm(total=steps, desc=f"train {spec['name']}", unit="step", disable=None)
    for _ in range(epochs):
        for idx in torch.randperm(x.shape[0], generator=gen).split(64):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    if cache:
        os.makedirs(cache_dir(), exist_ok=True)
        torch.save(model.state_dict(), path + ".tmp")
        os.replace(path + ".tmp", path)
    return model, False


def _record(name, conditioning, tuning, model, x_te, y_te, cond_te, best, stitched=None, extra=None):
    acc = evaluate.accuracy(model, x_te, y_te)
    rec = dict(name=name, conditioning=conditioning, tuning=tuning, accuracy=acc, delta_accuracy=acc - best,
               trainable_params=evaluate.trainable_params(model) if stitched else 0,
               corrupted_accuracy=evaluate.corrupted_accuracy(model, x_te, y_te), cka=None, cka_per_condition=None)
    if stitched is not None:
        rec["cka"], rec["cka_per_condition"] = evaluate.stitch_cka(stitched, x_te, cond_te, 10)
    rec.update(extra or {})
    return rec


def run(out_dir: str | None = "demo_output", *, seed: int = 0, epochs: int = 12, tune_steps: int = 60,
        methods=("cca", "ot", "ridge", "procrustes"), tunings=("direct", "task", "fula", "partial"),
        rank: int = 16, n_train: int | None = None, cache: bool = True, plot: bool = True, with_layer_map: bool = True,
        log=print) -> dict:
    """Runs the demo; returns {"records", "machine", "settings", "timings"} (also out_dir/results.json).

    ``epochs``, ``tune_steps``, ``n_train`` (training images used; None: all) make it small for tests."""
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    x, y = data.digits_images(IMAGE)
    tr, te = data.split(x.shape[0], 0.25, seed)
    tr = tr if n_train is None else tr[:n_train]
    x_tr, y_tr, x_te, y_te = x[tr], y[tr], x[te], y[te]
    t1 = time.perf_counter()
    trained = {role: trained_model(spec, x_tr, y_tr, epochs=epochs, lr=3e-3, seed=seed, cache=cache, log=log)
               for role, spec in MODELS.items()}
    (model_a, cached_a), (model_b, cached_b) = trained["A"], trained["B"]
    train_seconds = 0.0 if cached_a and cached_b else time.perf_counter() - t1

    best = max(evaluate.accuracy(model_a, x_te, y_te), evaluate.accuracy(model_b, x_te, y_te))
    records = [_record("model A (CNN)", "-", "-", model_a, x_te, y_te, None, best),
               _record("model B (ViT)", "-", "-", model_b, x_te, y_te, None, best)]
    merge_ok, why = merge_applicability(model_a, model_b)
    for merge in ("weight averaging", "TIES merging"):
        records.append(dict(name=merge, conditioning="-", tuning="-", accuracy=None, delta_accuracy=None, cka=None,
                            cka_per_condition=None, trainable_params=0, corrupted_accuracy=None,
                            not_applicable=why if not merge_ok else None))

    act_a, act_b = extract(model_a, PATH_A, x_tr), extract(model_b, PATH_B, x_tr)
    layout_a, layout_b = layout_of(act_a, model=model_a), layout_of(act_b, model=model_b)
    rows_a, rows_b = paired_rows(act_a, act_b, "tokens", layout_a=layout_a, layout_b=layout_b)
    conds = {"class": class_conditions(y_tr), "none": no_conditions(x_tr.shape[0])}

    # Rows come sample-major, B's special (CLS) tokens first in each sample (tcfa/pipeline/layouts.py): they
    # are filled from A's pooled features, a different distribution from A's positions, and ViT
    # classifies from CLS alone -- so they get their own stitch (cls_stitch), fitted the same way.
    per, special = layout_b.positions, layout_b.num_special
    is_special = torch.arange(rows_a.shape[0]) % per < special

    def stitched_from(method, conditioning):
        c = conds[conditioning]
        make = lambda: TCFA(method, rank=rank, conditions=c.num, seed=seed, eps=0.01, ot_max_rows=1024)  # noqa: E731
        stitch = make().fit(rows_a[~is_special], rows_b[~is_special], c.ids.repeat_interleave(per - special))
        cls_stitch = make().fit(rows_a[is_special], rows_b[is_special], c.ids.repeat_interleave(special))
        return StitchedModel(model_a, PATH_A, model_b, PATH_B, stitch, cls_stitch=cls_stitch, example_input=x_te[:1])

    for method in methods:
        for conditioning in ("class", "none"):
            t1 = time.perf_counter()
            sm = stitched_from(method, conditioning)
            records.append(_record(f"TCFA-{method}", conditioning, "zero_shot", sm, x_te, y_te, y_te, best, sm,
                                   {"fit_seconds": time.perf_counter() - t1}))
            log(f"  {method:<10} {conditioning:<6} zero_shot  acc {records[-1]['accuracy']:.3f}")
    # tuning: the class-conditioned CCA stitch and the unconditioned ridge baseline, each mode
    for method, conditioning in (("cca", "class"), ("ridge", "none")):
        if method not in methods:
            continue
        for mode in tunings:
            t1 = time.perf_counter()
            sm = stitched_from(method, conditioning)
            losses = tune(sm, mode, x_tr, y_tr, steps=tune_steps, lr=3e-3, later_paths=LATER_B, seed=seed)
            records.append(_record(f"TCFA-{method}", conditioning, mode, sm, x_te, y_te, y_te, best, sm,
                                   {"loss_first": losses[0] if losses else None,
                                    "loss_last": losses[-1] if losses else None,
                                    "fit_seconds": time.perf_counter() - t1}))
            log(f"  {method:<10} {conditioning:<6} {mode:<10} acc {records[-1]['accuracy']:.3f}")

    layer_map_doc = None
    if with_layer_map:
        from . import demo_layer_map

        log("layer map: A's blocks x B's blocks, stitches along its path")
        layer_map_doc = demo_layer_map.run(model_a, model_b, x_tr, y_tr, x_te, y_te, rank=rank, tune_steps=tune_steps,
                                           later_b=LATER_B, seed=seed, out_dir=out_dir if plot else None, log=log)
    models = {role: dict(MODELS[role], params=sum(p.numel() for p in m.parameters()), test_accuracy=r["accuracy"],
                         tap=path, tap_shape=lay.describe())
              for role, m, r, path, lay in (("A", model_a, records[0], PATH_A, layout_a),
                                            ("B", model_b, records[1], PATH_B, layout_b))}
    doc = {"records": records, "machine": machine(),
           "settings": {"seed": seed, "epochs": epochs, "tune_steps": tune_steps, "rank": rank, "image": IMAGE,
                        "n_train": int(x_tr.shape[0]), "n_test": int(x_te.shape[0]), "models": models},
           "timings": {"wall_seconds": time.perf_counter() - t0, "train_seconds": train_seconds}}
    if layer_map_doc is not None:
        doc["layer_map"] = layer_map_doc
    log(table(records))
    log(f"demo wall time {doc['timings']['wall_seconds']:.1f} s")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, "results.json")
        write_text_atomically(path, json.dumps(doc, indent=2))
        log(f"wrote {path}")
        if plot:
            plot_results(records, os.path.join(out_dir, "stitching.png"))
            log(f"wrote {os.path.join(out_dir, 'stitching.png')}")
    return doc


def plot_results(records, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in records if r.get("accuracy") is not None]
    labels = [f"{r['name']} {r['conditioning']} {r['tuning']}".replace(" - -", "") for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(18, 6))
    axes[0].barh(labels, [r["accuracy"] for r in rows], color="tab:blue")
    axes[0].set_xlabel("test accuracy")
    axes[0].invert_yaxis()
    st = [r for r in rows if r.get("cka") is not None]
    axes[1].barh([labels[rows.index(r)] for r in st], [r["cka"] for r in st], color="tab:orange")
    axes[1].set_xlabel("linear CKA with B's own activation at B's tap")
    axes[1].invert_yaxis()
    for r in st:
        if r["tuning"] == "zero_shot":
            axes[2].plot(range(10), r["cka_per_condition"], marker="o", label=f"{r['name']} {r['conditioning']}")
    axes[2].set_xlabel("digit class (condition)")
    axes[2].set_ylabel("CKA per condition (zero-shot)")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)
