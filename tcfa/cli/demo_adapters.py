"""`tcfa demo --adapters`: a LoRA trained on one timm ViT carried to another of a different width and depth.

1. Train ViT A (4 blocks, width 48) and ViT B (3 blocks, width 64) on the digits (cached, as `tcfa demo`).
2. The shifted task: the same digits rotated by 45 degrees. Train a LoRA (MLP fc1 and fc2 of every
   block) on A for it, and, as the upper bound, one directly on B; ranks 4, 8, 16.
3. Pair A's blocks with B's: along the layer map's monotone path (tcfa.layer_map, linear CKA of pooled
   tokens), or by proportional depth. Fit the input and output maps of each paired linear layer on
   anchor images (their tokens as rows, tcfa.anchor_map, proper rotations): random or class-stratified.
4. Transport A's adapter (tcfa.transport_lora) and merge alpha * Delta W into B for alpha in
   0.2 ... 0.8. Report B's accuracy on the shifted task and on the original one for: B alone (no-op),
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

from ..lora import anchor_map, transport_lora
from ..pipeline import data, evaluate
from ..pipeline.adapters import add_lora, adapter_factors, merge_adapter, unmerge_adapter
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
# each adapted linear layer with the taps giving its input and its output
LINEARS = {"mlp.fc1": ("norm2", "mlp.fc1"), "mlp.fc2": ("mlp.act", "mlp.fc2")}


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
    for path, m in layers.items():  # back to the plain model
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent), name, m.base)
    return factors


def anchors(y: torch.Tensor, n: int, kind: str, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.randperm(y.shape[0], generator=gen)[:n]
    per = n // int(y.max() + 1)
    return torch.cat([idx[torch.randperm(idx.numel(), generator=gen)[:per]]
                      for idx in (torch.nonzero(y == c).flatten() for c in range(int(y.max()) + 1))])


def block_pairs(model_a, model_b, x_anchor, pairing: str) -> list[tuple[int, int]]:
    L_a, L_b = len(model_a.blocks), len(model_b.blocks)
    if pairing == "proportional":
        return [(i, round(i * (L_b - 1) / (L_a - 1))) for i in range(L_a)]
    m = layer_map(model_a, [f"blocks.{i}" for i in range(L_a)], model_b, [f"blocks.{j}" for j in range(L_b)],
                  x_anchor, num_anchors=x_anchor.shape[0], progress=False)
    return [(int(a.split('.')[1]), int(b.split('.')[1])) for a, b in m.path()]


def layer_maps(model_a, model_b, pairs, x_anchor) -> tuple[dict, list[dict]]:
    """{path_a: (path_b, R_in, R_out)} for every adapted linear of A's paired blocks, and diagnostics."""
    taps = lambda blk, tap: f"blocks.{blk}.{tap}"  # noqa: E731
    maps, diags = {}, []
    for i, j in pairs:
        got_a = capture(model_a, [taps(i, t) for pair in LINEARS.values() for t in pair], x_anchor)
        got_b = capture(model_b, [taps(j, t) for pair in LINEARS.values() for t in pair], x_anchor)
        for name, (t_in, t_out) in LINEARS.items():
            rows = lambda got, blk, t: got[taps(blk, t)].detach().reshape(-1, got[taps(blk, t)].shape[-1]).double()  # noqa: E731
            m_in = anchor_map(rows(got_a, i, t_in), rows(got_b, j, t_in))
            m_out = anchor_map(rows(got_a, i, t_out), rows(got_b, j, t_out))
            maps[taps(i, name)] = (taps(j, name), m_in.R.float(), m_out.R.float())
            diags.append({"a": taps(i, name), "b": taps(j, name), "residual_in": m_in.residual_mean,
                          "residual_out": m_out.residual_mean, "reflection": m_in.reflection or m_out.reflection})
    return maps, diags


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


def run(out_dir: str | None = "demo_adapters_output", *, seed: int = 0, epochs: int = 12, lora_steps: int = 300,
        ranks=RANKS, alphas=ALPHAS, n_anchors: int = 200, n_train: int | None = None, cache: bool = True,
        log=print) -> dict:
    """Runs the experiment; returns {"records", "diagnostics", "machine", "settings"} (also out_dir/adapters.json)."""
    t0 = time.perf_counter()
    x, y = data.digits_images(IMAGE)
    tr, te = data.split(x.shape[0], 0.25, seed)
    tr = tr if n_train is None else tr[:n_train]
    rot = lambda t: data.rotate(t, torch.full((t.shape[0],), SHIFT_DEGREES))  # noqa: E731
    x_tr, y_tr, x_te, y_te = x[tr], y[tr], x[te], y[te]
    xs_tr, xs_te = rot(x_tr), rot(x_te)
    model_a, _ = trained_model(MODELS["A"], x_tr, y_tr, epochs=epochs, lr=3e-3, seed=seed, cache=cache, log=log)
    model_b, _ = trained_model(MODELS["B"], x_tr, y_tr, epochs=epochs, lr=3e-3, seed=seed, cache=cache, log=log)
    tests = {"shifted": (xs_te, y_te), "original": (x_te, y_te)}
    base = {name: evaluate.accuracy(model_b, xx, yy) for name, (xx, yy) in tests.items()}
    records = [{"method": "B alone (no-op)", "rank": None, "alpha": None, "anchors": None, "pairing": None, **base}]
    applicable, why = merge_applicability(model_a, model_b)
    records.append({"method": "weight averaging / TIES", "note": why if not applicable else "applicable"})
    diagnostics = []
    for rank in ranks:
        lora_a = train_lora(model_a, len(model_a.blocks), rank, xs_tr, y_tr, steps=lora_steps, seed=seed)
        lora_b = train_lora(model_b, len(model_b.blocks), rank, xs_tr, y_tr, steps=lora_steps, seed=seed + 1)
        maps_by = {}
        for alpha in alphas:
            direct = _merged_accuracy(model_b, lora_b, alpha, tests)
            records.append({"method": "direct LoRA on B", "rank": rank, "alpha": alpha, **direct})
            for kind in ("random", "stratified"):
                idx = anchors(y_tr, n_anchors, kind, seed)
                for pairing in ("layer map", "proportional"):
                    pairs = block_pairs(model_a, model_b, x_tr[idx], pairing)
                    maps, diags = layer_maps(model_a, model_b, pairs, torch.cat([x_tr[idx], xs_tr[idx]]))
                    maps_by[kind, pairing] = maps
                    if alpha == alphas[0]:
                        diagnostics += [{"rank": rank, "anchors": kind, "pairing": pairing, **d} for d in diags]
                    acc = _merged_accuracy(model_b, _strip(_transported(lora_a, maps)), alpha, tests)
                    records.append({"method": "transported", "rank": rank, "alpha": alpha, "anchors": kind,
                                    "pairing": pairing, **acc, **_retention(acc, direct, base)})
            null, naive = _null_and_naive(lora_a, maps_by["random", "layer map"], model_b, seed)
            for name, f in (("random LoRA, same norm (null)", null), ("naive transport (truncate/pad)", naive)):
                acc = _merged_accuracy(model_b, _strip(f), alpha, tests)
                records.append({"method": name, "rank": rank, "alpha": alpha, **acc, **_retention(acc, direct, base)})
    out = {"records": records, "diagnostics": diagnostics, "machine": machine(),
           "settings": {"seed": seed, "epochs": epochs, "lora_steps": lora_steps, "ranks": list(ranks),
                        "alphas": list(alphas), "n_anchors": n_anchors, "shift_degrees": SHIFT_DEGREES,
                        "models": MODELS},
           "seconds": time.perf_counter() - t0}
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "adapters.json"), "w") as fh:
            json.dump(out, fh, indent=1)
        plot(out, os.path.join(out_dir, "retention_vs_drift.png"))
        log(summary(out))
    return out


def plot(out: dict, path: str) -> None:
    """Retention against drift of every transported, null and naive record (one point per alpha)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, marker in (("transported", "o"), ("random LoRA, same norm (null)", "x"),
                           ("naive transport (truncate/pad)", "s")):
        rs = [r for r in out["records"] if r.get("method") == method and r["retention"] == r["retention"]]
        ax.scatter([r["drift"] for r in rs], [r["retention"] for r in rs], marker=marker, label=method, alpha=0.7)
    ax.axhline(0, color="grey", lw=0.5)
    ax.axvline(0, color="grey", lw=0.5)
    ax.set_xlabel("drift (drop of B's accuracy on the original digits)")
    ax.set_ylabel("retention (of the direct LoRA's gain)")
    ax.set_title("LoRA carried from ViT A (48 x 4) to ViT B (64 x 3)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
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


def summary(out: dict) -> str:
    """The records at each rank's best alpha per method, as a markdown table."""
    best = {}
    for r in out["records"]:
        if r.get("rank") is None:
            continue
        key = (r["method"], r["rank"], r.get("anchors"), r.get("pairing"))
        if key not in best or r["shifted"] > best[key]["shifted"]:
            best[key] = r
    rows = [r for r in out["records"] if r.get("rank") is None and "shifted" in r] + sorted(
        best.values(), key=lambda r: (r["rank"], r["method"], str(r.get("anchors")), str(r.get("pairing"))))
    cols = ["method", "rank", "alpha", "anchors", "pairing", "shifted", "original", "retention", "drift"]
    return table([{c: r.get(c) for c in cols} for r in rows], cols)
