"""`tcfa demo`: stitch a small CNN into a small ViT on sklearn digits with every TCFA method.

1. Train a ResNet-style CNN (model A) and a ViT (model B) from transformers configs on the
   digits upsampled to 32 px (timm cannot be installed beside this torch build, so the
   transformers families stand in). Trained weights are cached under ~/.cache/tcfa (or
   $TCFA_CACHE) keyed by a hash of the model config and training settings.
2. Tap A after its middle stage (4x4 grid, 32 channels) and B after its second of four blocks
   (CLS + 4x4 patch tokens, width 48); rows pair A's positions with B's tokens (tcfa.models).
3. Fit a stitch with each method (cca, ot, ridge, procrustes) under class conditions and
   without conditions (`none`), evaluate zero-shot, then tune the class-conditioned CCA and
   the unconditioned ridge stitches with each tuning mode.
4. Report accuracy, Δaccuracy vs the better of A and B, Δθ, CKA at B's tap (overall and per
   class), accuracy under corruption; write results.json and stitching.png.
"""
from __future__ import annotations

import hashlib
import json
import os
import time

import torch
from torch import nn

from . import data, evaluate
from .align import TCFA, tune
from .baselines import merge_applicability
from .data import class_conditions, no_conditions
from .models import StitchedModel, extract, paired_rows

PATH_A, PATH_B = "resnet.encoder.stages.1", "vit.layers.1"
LATER_B = ("vit.layers.2", "vit.layers.3")  # B's depths after the tap, for "fula"
IMAGE = 32


def model_configs():
    from transformers import ResNetConfig, ViTConfig

    cnn = ResNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[16, 32, 64], depths=[1, 1, 1],
                       layer_type="basic", num_labels=10)
    vit = ViTConfig(image_size=IMAGE, patch_size=8, num_channels=3, hidden_size=48, num_hidden_layers=4,
                    num_attention_heads=4, intermediate_size=96, num_labels=10, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0)
    return cnn, vit


def _build(config) -> nn.Module:
    from transformers import ResNetForImageClassification, ViTForImageClassification

    return (ResNetForImageClassification if config.model_type == "resnet" else ViTForImageClassification)(config)


def cache_dir() -> str:
    return os.environ.get("TCFA_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "tcfa"))


def trained_model(config, x, y, *, epochs: int, lr: float, seed: int, cache: bool = True, log=print) -> nn.Module:
    """A model built from ``config`` and trained on (x, y), from the cache when it holds it."""
    spec = json.dumps({"config": config.to_dict(), "epochs": epochs, "lr": lr, "seed": seed, "n": int(x.shape[0]),
                       "image": IMAGE}, sort_keys=True, default=str)
    key = hashlib.sha256(spec.encode()).hexdigest()[:16]
    path = os.path.join(cache_dir(), f"{config.model_type}-{key}.pt")
    torch.manual_seed(seed)
    model = _build(config)
    if cache and os.path.exists(path):
        model.load_state_dict(torch.load(path, map_location="cpu"))
        log(f"loaded {config.model_type} from {path}")
        return model.eval()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((x.shape[0] + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1))
    from tqdm.auto import tqdm

    model.train()
    bar = tqdm(total=steps, desc=f"train {config.model_type}", unit="step", disable=None)
    for _ in range(epochs):
        for idx in torch.randperm(x.shape[0], generator=gen).split(64):
            loss = nn.functional.cross_entropy(model(x[idx]).logits, y[idx])
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
    return model


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
        rank: int = 16, n_train: int | None = None, cache: bool = True, plot: bool = True, log=print) -> list:
    """Runs the demo; returns the result records (also written to out_dir/results.json).

    ``epochs``, ``tune_steps``, ``n_train`` (training images used; None: all) make it small for tests."""
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    x, y = data.digits_images(IMAGE)
    tr, te = data.split(x.shape[0], 0.25, seed)
    tr = tr if n_train is None else tr[:n_train]
    x_tr, y_tr, x_te, y_te = x[tr], y[tr], x[te], y[te]
    cfg_a, cfg_b = model_configs()
    model_a = trained_model(cfg_a, x_tr, y_tr, epochs=epochs, lr=3e-3, seed=seed, cache=cache, log=log)
    model_b = trained_model(cfg_b, x_tr, y_tr, epochs=epochs, lr=3e-3, seed=seed, cache=cache, log=log)

    acc_a, acc_b = evaluate.accuracy(model_a, x_te, y_te), evaluate.accuracy(model_b, x_te, y_te)
    best = max(acc_a, acc_b)
    merge_ok, why = merge_applicability(model_a, model_b)
    records = [_record("model A (CNN)", "-", "-", model_a, x_te, y_te, None, best),
               _record("model B (ViT)", "-", "-", model_b, x_te, y_te, None, best)]
    for merge in ("weight averaging", "TIES merging"):
        records.append(dict(name=merge, conditioning="-", tuning="-", accuracy=None, delta_accuracy=None, cka=None,
                            cka_per_condition=None, trainable_params=0, corrupted_accuracy=None,
                            not_applicable=why if not merge_ok else None))

    fit_x, fit_y = x_tr, y_tr
    rows_a, rows_b = paired_rows(extract(model_a, PATH_A, fit_x), extract(model_b, PATH_B, fit_x), "tokens")
    per = rows_a.shape[0] // fit_x.shape[0]
    conds = {"class": class_conditions(fit_y), "none": no_conditions(fit_x.shape[0])}

    # Rows come sample-major, B's CLS token first (tcfa.models.paired_rows): B's CLS is filled
    # from A's pooled features, a different distribution from A's positions, and ViT classifies
    # from CLS alone -- so CLS gets its own stitch (cls_stitch), fitted the same way on those rows.
    is_cls = torch.zeros(rows_a.shape[0], dtype=torch.bool)
    is_cls[::per] = True

    def stitched_from(method, conditioning):
        c = conds[conditioning]
        make = lambda: TCFA(method, rank=rank, conditions=c.num, seed=seed, eps=0.01, ot_max_rows=1024)  # noqa: E731
        stitch = make().fit(rows_a[~is_cls], rows_b[~is_cls], c.ids.repeat_interleave(per - 1))
        cls_stitch = make().fit(rows_a[is_cls], rows_b[is_cls], c.ids)
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

    log(table(records))
    log(f"demo wall time {time.perf_counter() - t0:.1f} s")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, "results.json")
        with open(path + ".tmp", "w") as fh:
            json.dump(records, fh, indent=2)
        os.replace(path + ".tmp", path)
        log(f"wrote {path}")
        if plot:
            plot_results(records, os.path.join(out_dir, "stitching.png"))
            log(f"wrote {os.path.join(out_dir, 'stitching.png')}")
    return records


def _fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def table(records) -> str:
    head = f"{'method':<16} {'cond':<6} {'tuning':<10} {'acc':>6} {'Δacc':>7} {'Δθ':>7} {'CKA':>6} {'noise':>6} {'rot':>6}"
    lines = [head, "-" * len(head)]
    for r in records:
        if r.get("not_applicable"):
            lines.append(f"{r['name']:<16} {r['not_applicable']}")
            continue
        ca = r["corrupted_accuracy"] or {}
        lines.append(f"{r['name']:<16} {r['conditioning']:<6} {r['tuning']:<10} {_fmt(r['accuracy']):>6} "
                     f"{_fmt(r['delta_accuracy'], '+.3f'):>7} {r['trainable_params']:>7} {_fmt(r['cka']):>6} "
                     f"{_fmt(ca.get('noise')):>6} {_fmt(ca.get('rotation')):>6}")
    return "\n".join(lines)


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
    fig.savefig(path, dpi=100)
    plt.close(fig)
