"""`tcfa demo --adapters`: a LoRA trained on one timm ViT carried to another of a different width and depth.

1. Train ViT A (4 blocks, width 48) and ViT B (3 blocks, width 64) on the digits (cached, as `tcfa demo`).
2. The shifted task: the same digits rotated by 45 degrees. Train a LoRA (MLP fc1 and fc2 of every
   block) on A for it, and, as the upper bound, one directly on B; ranks 4, 8, 16.
3. Pair A's blocks with B's: along the layer map's monotone path (tcfa.layer_map, linear CKA of pooled
   tokens), or by proportional depth. Fit the input and output maps of each paired linear layer on
   anchor images, original and rotated, their tokens as rows (tcfa.fit_adapter_maps, proper rotations).
   Anchors: random, class-stratified, or from the layer map (the images on which A's and B's blocks
   along the map's path agree most, layer_map_anchors). Maps: pooled over both conditions, or the
   rotated condition's own (per-condition anchor maps: the condition the adapter was trained for).
4. Transport A's adapter (tcfa.transport_lora) and merge alpha * Delta W into B for alpha in
   0.2 ... 0.8; three seeds (models, adapters, anchors), mean and std over them. Report B's accuracy on the shifted task and on the original one for: B alone (no-op),
   B + transported, B + direct LoRA, B + a random LoRA of the same norm per layer (the null), B + the
   naive transport (factors truncated / zero-padded, no maps). retention = (transported - B) /
   (direct - B); drift = B's original accuracy minus the merged model's. Weight averaging and TIES
   need equal architectures (tcfa.pipeline.baselines.merge_applicability): not applicable here.
"""
from __future__ import annotations

import json
import os
import time

import torch
from torch import nn

from ..artifacts import save_figure, write_text_atomically
from ..lora import transport_lora
from ..pipeline import data, evaluate
from ..pipeline.adapter_maps import fit_adapter_maps
from ..pipeline.adapters import add_lora, adapter_factors, merge_adapter, remove_lora, unmerge_adapter
from ..pipeline.baselines import merge_applicability
from ..pipeline.layer_map import layer_map
from ..pipeline.models import capture
from .demo import IMAGE, trained_model
from ..bench.common import table
from .report import machine

SHIFT_DEGREES = 45.0
ALPHAS = (0.2, 0.35, 0.5, 0.65, 0.8)
RANKS = (4, 8, 16)
VIT = {"name": "vit_tiny_patch16_224", "kwargs": {"img_size": IMAGE, "patch_size": 8, "num_heads": 4,
                                                  "mlp_ratio": 2.0, "num_classes": 10}}
MODELS = {"A": {**VIT, "kwargs": {**VIT["kwargs"], "embed_dim": 48, "depth": 4}},
          "B": {**VIT, "kwargs": {**VIT["kwargs"], "embed_dim": 64, "depth": 3}}}
LINEARS = ("mlp.fc1", "mlp.fc2")  # the adapted linear layers of every block
ANCHOR_KINDS = ("random", "stratified", "layer map")
PAIRINGS = ("layer map", "proportional")
MAPS = ("pooled", "rotated only")  # maps fitted on both conditions' anchors, or on the rotated ones alone


def train_lora(model: nn.Module, depth: int, rank: int, x, y, *, steps: int, seed: int) -> dict:
    """Trains a LoRA (fc1, fc2 of every block) on (x, y); returns its factors and removes it from ``model``."""
    paths = [f"blocks.{i}.{name}" for i in range(depth) for name in LINEARS]
    layers = add_lora(model, paths, rank, alpha=2 * rank)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for m in layers.values() for p in (m.lora_A.weight, m.lora_B.weight)], lr=3e-3)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (64,), generator=gen)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    factors = adapter_factors(model)
    remove_lora(model)  # back to the plain model
    return factors


def anchors(y: torch.Tensor, n: int, kind: str, seed: int) -> torch.Tensor:
    """Indices of n random or class-stratified training images (the "layer map" kind: layer_map_anchors)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.randperm(y.shape[0], generator=gen)[:n]
    per = n // int(y.max() + 1)
    return torch.cat([idx[torch.randperm(idx.numel(), generator=gen)[:per]]
                      for idx in (torch.nonzero(y == c).flatten() for c in range(int(y.max()) + 1))])


def _blocks(model) -> list[str]:
    return [f"blocks.{i}" for i in range(len(model.blocks))]


def block_map(model_a, model_b, x):
    """The linear-CKA layer map of A's blocks against B's on images x (pooled tokens)."""
    return layer_map(model_a, _blocks(model_a), model_b, _blocks(model_b), x, num_anchors=x.shape[0],
                     progress=False)


def layer_map_anchors(model_a, model_b, x_pool, n: int) -> torch.Tensor:
    """The n images of x_pool on which A and B agree most along the layer map's path: per image, the
    correlation of its row of A's and of B's centred Gram matrices of pooled block outputs (its
    similarity to every other image, the per-image term of linear CKA), averaged over the path."""
    path = block_map(model_a, model_b, x_pool).path()
    got_a = capture(model_a, [a for a, _ in path], x_pool)
    got_b = capture(model_b, sorted({b for _, b in path}), x_pool)

    def gram_rows(t):
        f = t.detach().double().mean(1)
        f = f - f.mean(0)
        g = f @ f.T
        g = g - g.mean(1, keepdim=True)
        return g / g.norm(dim=1, keepdim=True).clamp_min(1e-30)

    agree = sum((gram_rows(got_a[a]) * gram_rows(got_b[b])).sum(1) for a, b in path) / len(path)
    return agree.topk(n).indices


def block_pairs(pool_map, model_a, model_b, pairing: str) -> list[tuple[int, int]]:
    L_a, L_b = len(model_a.blocks), len(model_b.blocks)
    if pairing == "proportional":
        return [(i, round(i * (L_b - 1) / (L_a - 1))) for i in range(L_a)]
    return [(int(a.split('.')[1]), int(b.split('.')[1])) for a, b in pool_map.path()]


def adapter_maps(model_a, model_b, pairs, x_anchor, labels, layer_map_):
    """tcfa.fit_adapter_maps for every adapted linear of A's paired blocks (labels: 0 original, 1 rotated)."""
    linear_pairs = {f"blocks.{i}.{name}": f"blocks.{j}.{name}" for i, j in pairs for name in LINEARS}
    return fit_adapter_maps(model_a, model_b, linear_pairs, x_anchor, labels=labels, num_segments=2,
                            layer_map=layer_map_)


def _merged_accuracy(model_b, factors, alpha, tests) -> dict:
    """Accuracy of B with alpha * Delta W of {path: (A, B)} merged, per test set; B is restored after."""
    saved = merge_adapter(model_b, factors, alpha)
    try:
        return {name: evaluate.accuracy(model_b, x, y) for name, (x, y) in tests.items()}
    finally:
        unmerge_adapter(model_b, saved)


def _transported(adapter, maps, rank=None) -> dict:
    out = {}
    for path_a, factors in adapter.items():  # one call per A layer: two A layers may share a B layer
        (path_b, fb), = transport_lora({path_a: factors}, {path_a: maps[path_a]}, rank=rank).items()
        out.setdefault(path_b, []).append(fb)
    return {f"{p}#{k}": fb for p, fbs in out.items() for k, fb in enumerate(fbs)}


def _null_and_naive(adapter, maps, model_b, seed) -> tuple[dict, dict]:
    gen = torch.Generator().manual_seed(seed)
    null, naive = {}, {}
    for k, (path_a, (A, B)) in enumerate(adapter.items()):
        path_b = maps[path_a][0]
        w = model_b.get_submodule(path_b).weight
        out_b, in_b = w.shape
        Ar, Br = torch.randn(A.shape[0], in_b, generator=gen), torch.randn(out_b, A.shape[0], generator=gen)
        Br = Br * ((B @ A).norm() / (Br @ Ar).norm())
        null[f"{path_b}#{k}"] = (Ar, Br)
        Ap = torch.zeros(A.shape[0], in_b)
        Bp = torch.zeros(out_b, A.shape[0])
        Ap[:, :min(in_b, A.shape[1])] = A[:, :in_b]
        Bp[:min(out_b, B.shape[0])] = B[:out_b]
        naive[f"{path_b}#{k}"] = (Ap, Bp)
    return null, naive


def _one_seed(seed, x_tr, y_tr, tests, *, epochs, lora_steps, ranks, alphas, n_anchors, cache, log):
    """The records and map diagnostics of one seed (models, adapters and anchors drawn from it)."""
    rot = lambda t: data.rotate(t, torch.full((t.shape[0],), SHIFT_DEGREES))  # noqa: E731
    xs_tr = rot(x_tr)
    model_a, _ = trained_model(MODELS["A"], x_tr, y_tr, epochs=epochs, lr=3e-3, seed=seed, cache=cache, log=log)
    model_b, _ = trained_model(MODELS["B"], x_tr, y_tr, epochs=epochs, lr=3e-3, seed=seed, cache=cache, log=log)
    base = {name: evaluate.accuracy(model_b, xx, yy) for name, (xx, yy) in tests.items()}
    records = [{"method": "B alone (no-op)", "seed": seed, **base}]
    # maps: one set per (anchors, pairing), shared by every rank and alpha
    pool = anchors(y_tr, min(4 * n_anchors, y_tr.shape[0]), "random", seed + 7)
    maps, diagnostics = {}, []
    for kind in ANCHOR_KINDS:
        idx = (pool[layer_map_anchors(model_a, model_b, x_tr[pool], n_anchors)] if kind == "layer map"
               else anchors(y_tr, n_anchors, kind, seed))
        the_map = block_map(model_a, model_b, x_tr[idx])
        x_anchor = torch.cat([x_tr[idx], xs_tr[idx]])
        labels = torch.cat([torch.zeros(idx.numel()), torch.ones(idx.numel())]).long()
        for pairing in PAIRINGS:
            fitted = adapter_maps(model_a, model_b, block_pairs(the_map, model_a, model_b, pairing), x_anchor,
                                  labels, the_map)
            maps[kind, pairing, "pooled"], maps[kind, pairing, "rotated only"] = fitted.maps, fitted.per_condition[1]
            diagnostics += [{"seed": seed, "anchors": kind, "pairing": pairing, **d} for d in fitted.diagnostics]
    for rank in ranks:
        lora_a = train_lora(model_a, len(model_a.blocks), rank, xs_tr, y_tr, steps=lora_steps, seed=seed)
        lora_b = train_lora(model_b, len(model_b.blocks), rank, xs_tr, y_tr, steps=lora_steps, seed=seed + 1)
        moved = {key: _strip(_transported(lora_a, m)) for key, m in maps.items()}
        null, naive = _null_and_naive(lora_a, maps["random", "layer map", "pooled"], model_b, seed)
        for alpha in alphas:
            common = {"rank": rank, "alpha": alpha, "seed": seed}
            direct = _merged_accuracy(model_b, lora_b, alpha, tests)
            records.append({"method": "direct LoRA on B", **common, **direct})
            for (kind, pairing, which), factors in moved.items():
                acc = _merged_accuracy(model_b, factors, alpha, tests)
                records.append({"method": "transported", **common, "anchors": kind, "pairing": pairing,
                                "maps": which, **acc, **_retention(acc, direct, base)})
            for name, f in (("random LoRA, same norm (null)", null), ("naive transport (truncate/pad)", naive)):
                acc = _merged_accuracy(model_b, _strip(f), alpha, tests)
                records.append({"method": name, **common, **acc, **_retention(acc, direct, base)})
    applicable, why = merge_applicability(model_a, model_b)
    records.append({"method": "weight averaging / TIES", "seed": seed, "note": why if not applicable else "applicable"})
    return records, diagnostics


def run(out_dir: str | None = "demo_adapters_output", *, seeds=(0, 1, 2), epochs: int = 12, lora_steps: int = 300,
        ranks=RANKS, alphas=ALPHAS, n_anchors: int = 200, n_train: int | None = None, cache: bool = True,
        log=print) -> dict:
    """Runs the experiment; returns {"records", "diagnostics", "machine", "settings"} (also out_dir/adapters.json)."""
    t0 = time.perf_counter()
    x, y = data.digits_images(IMAGE)
    records, diagnostics = [], []
    for seed in seeds:
        tr, te = data.split(x.shape[0], 0.25, seed)
        tr = tr if n_train is None else tr[:n_train]
        tests = {"shifted": (data.rotate(x[te], torch.full((te.numel(),), SHIFT_DEGREES)), y[te]),
                 "original": (x[te], y[te])}
        got = _one_seed(seed, x[tr], y[tr], tests, epochs=epochs, lora_steps=lora_steps, ranks=ranks, alphas=alphas,
                        n_anchors=n_anchors, cache=cache, log=log)
        records += got[0]
        diagnostics += got[1]
    out = {"records": records, "diagnostics": diagnostics, "machine": machine(),
           "settings": {"seeds": list(seeds), "epochs": epochs, "lora_steps": lora_steps, "ranks": list(ranks),
                        "alphas": list(alphas), "n_anchors": n_anchors, "shift_degrees": SHIFT_DEGREES,
                        "models": MODELS},
           "seconds": time.perf_counter() - t0}
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        write_text_atomically(os.path.join(out_dir, "adapters.json"), json.dumps(out, indent=1))
        plot(out, os.path.join(out_dir, "retention_vs_drift.png"))
        log(summary(out))
        log(diagnostics_summary(out))
    return out


def _variants(records) -> dict:
    """{(method, rank, anchors, pairing, maps): {alpha: [records over seeds]}}."""
    out = {}
    for r in records:
        if r.get("rank") is not None:
            key = (r["method"], r["rank"], r.get("anchors"), r.get("pairing"), r.get("maps"))
            out.setdefault(key, {}).setdefault(r["alpha"], []).append(r)
    return out


def _mean_std(values) -> tuple[float, float]:
    t = torch.tensor([v for v in values if v == v], dtype=torch.float64)
    if t.numel() == 0:
        return float("nan"), float("nan")
    return float(t.mean()), float(t.std(unbiased=False))


def best_alpha_rows(out: dict) -> list[dict]:
    """Per variant, the alpha with the best mean shifted accuracy over seeds: mean and std of each metric."""
    rows = []
    for key, by_alpha in _variants(out["records"]).items():
        alpha, rs = max(by_alpha.items(), key=lambda kv: _mean_std(r["shifted"] for r in kv[1])[0])
        row = dict(zip(("method", "rank", "anchors", "pairing", "maps"), key), alpha=alpha, seeds=len(rs))
        for metric in ("shifted", "original", "retention", "drift"):
            row[metric], row[metric + "_std"] = _mean_std(r.get(metric, float("nan")) for r in rs)
        rows.append(row)
    return sorted(rows, key=lambda r: (r["rank"], r["method"], str(r["anchors"]), str(r["pairing"]), str(r["maps"])))


def plot(out: dict, path: str) -> None:
    """Retention against drift (means over seeds), one point per variant and alpha."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    groups = {}
    for (method, _, _, _, maps), by_alpha in _variants(out["records"]).items():
        if method == "direct LoRA on B":
            continue
        label = f"transported ({maps} maps)" if method == "transported" else method
        for rs in by_alpha.values():
            groups.setdefault(label, []).append((_mean_std(r["drift"] for r in rs)[0],
                                                 _mean_std(r["retention"] for r in rs)[0]))
    for (label, pts), marker in zip(sorted(groups.items()), "osx^v"):
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=label, alpha=0.7)
    ax.axhline(0, color="grey", lw=0.5)
    ax.axvline(0, color="grey", lw=0.5)
    ax.set_xlabel("drift (drop of B's accuracy on the original digits)")
    ax.set_ylabel("retention (of the direct LoRA's gain)")
    ax.set_title(f"LoRA carried from ViT A (48 x 4) to ViT B (64 x 3), mean of {len(out['settings']['seeds'])} seeds")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)


def _strip(factors: dict) -> dict:
    """{"path#k": (A, B)} -> {path: (A, B)}: merging sums what lands on one layer (_merged_accuracy)."""
    out = {}
    for key, (A, B) in factors.items():
        path = key.split("#")[0]
        if path in out:
            A0, B0 = out[path]
            out[path] = (torch.cat([A0, A]), torch.cat([B0, B], 1))
        else:
            out[path] = (A, B)
    return out


def _retention(acc: dict, direct: dict, base: dict) -> dict:
    gain = direct["shifted"] - base["shifted"]
    return {"retention": (acc["shifted"] - base["shifted"]) / gain if gain > 0 else float("nan"),
            "drift": base["original"] - acc["original"]}


def _pm(mean: float, std: float) -> str:
    return f"{mean:.3f} ± {std:.3f}"


def summary(out: dict, rank: int | None = None) -> str:
    """Markdown: B alone, then every variant at its best alpha (mean ± std over seeds), one rank or all."""
    base = [r for r in out["records"] if r["method"] == "B alone (no-op)"]
    lines = [f"B alone: shifted {_pm(*_mean_std(r['shifted'] for r in base))}, original "
             f"{_pm(*_mean_std(r['original'] for r in base))} ({len(base)} seeds)", ""]
    rows = [r for r in best_alpha_rows(out) if rank is None or r["rank"] == rank]
    cols = ["method", "rank", "anchors", "pairing", "maps", "alpha", "shifted", "original", "retention", "drift"]
    shown = [{**{c: r[c] for c in cols[:6]}, **{m: _pm(r[m], r[m + "_std"]) for m in cols[6:]}} for r in rows]
    return "\n".join(lines) + table(shown, cols)


def diagnostics_summary(out: dict) -> str:
    """Markdown: the maps' diagnostics per (anchors, pairing), averaged over layer pairs and seeds."""
    keys = ("layer_map_score", "residual_in_mean", "residual_out_mean", "roughness_in", "roughness_out",
            "coverage_in", "coverage_out", "span_in", "span_out")
    rows = []
    for kind in ANCHOR_KINDS:
        for pairing in PAIRINGS:
            ds = [d for d in out["diagnostics"] if d["anchors"] == kind and d["pairing"] == pairing]
            if not ds:
                continue
            row = {"anchors": kind, "pairing": pairing,
                   "reflections": f"{sum(d['reflection_in'] + d['reflection_out'] for d in ds)}/{2 * len(ds)}"}
            for k in keys:
                row[k] = round(_mean_std(d[k] for d in ds if d[k] is not None)[0], 3)
            rows.append(row)
    return table(rows, ["anchors", "pairing", "reflections", *keys])
