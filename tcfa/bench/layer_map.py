"""All-pairs layer CKA map: tcfa.layer_map against torch-cka and pytorch-cka, in the same run.

Case (the layer-map issue): two MLPs of widths 256 and 512 -- Linear(64, w), then 8 blocks
Linear(w, w) + ReLU, the children of the nn.Sequential ``blocks`` -- fp32, 4096 seeded random
inputs in batches of 256 from one DataLoader(TensorDataset, shuffle=False) that every
implementation consumes, linear CKA of every pair of the 8 block outputs of A and of B, with the
peers' estimator: the unbiased HSIC (Song et al. 2012) of each batch, summed over the batches.
He init keeps every block's activations at unit scale; PyTorch's default init shrinks their spread
about 2.5x per block (a gain of sqrt(1/6)), until the HSICs of the deep blocks fall below the fp32
resolution of the peers' uncentred Grams and torch-cka's compare() stops on its NaN assertion.
  tcfa minibatch / full   tcfa.layer_map(..., estimator=...) end to end (mode "flatten")
  torch-cka 0.21          CKA(a, b, model1_layers=..., model2_layers=...).compare(loader), as its
                          README runs it (autograd on: it does not turn it off), and inside torch.no_grad()
  pytorch-cka 1.1.3       cka.compute_cka(a, b, loader, layers=..., model2_layers=..., device="cpu")
  forwards only           both models over every batch through tcfa.capture with the same taps, no
                          metric: "CKA work" = end to end - forwards, for every implementation
  GEMMs                   what the full estimator must compute on the same features: X_A^T X_B of
                          the centred, concatenated layers and each layer's X_l^T X_l; the ratio
                          tcfa.similarity.pairwise_cka / GEMMs is the full estimator's overhead
Accuracy: max |entry difference| of tcfa minibatch against each peer, and of every row against an
fp64 evaluation of its own estimator (the peers' own fp32 error shows what "equal" can mean); and
against torch-cka's own code run on fp64 copies of the models and inputs (untimed), beside tcfa
minibatch in fp64 against that: the two estimators agree to fp64 rounding.
Sweep: time and peak extra memory of tcfa full and minibatch vs the number of anchors (inputs) N,
for 4, 8 and 12 blocks, every point in a fresh process (common.run_sweep).

Peers that are not installed are reported as such (`make bench` installs them).
Run: tcfa bench layer_map  (or python -m tcfa.bench.layer_map; a checkout also has benchmarks/bench_layer_map.py)
TCFA_BENCH_QUICK=1 runs everything at toy sizes (widths 16 and 32, 4 blocks, 256 inputs in batches
of 64; a check of the plumbing, not a measurement).
"""
from __future__ import annotations

import copy
import importlib.metadata
import math
from collections import OrderedDict

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tcfa.bench import common as bc

import tcfa
from tcfa import similarity

D_IN, WIDTH_A, WIDTH_B, BLOCKS, N, BATCH = bc.pick((64, 256, 512, 8, 4096, 256), (16, 16, 32, 4, 256, 64))
DEBIASED = True  # the peers' estimator (unbiased HSIC); the full estimator uses it too, so both tcfa rows agree
REPEAT, PEER_REPEAT = bc.pick((5, 3), (1, 1))
# The releases the peer calls below were written against (their source was read; Makefile BENCH_NODEPS).
PEERS = {"torch-cka": "0.21", "pytorch-cka": "1.1.3"}
SWEEP_BLOCKS = bc.pick((4, 8, 12), (2, 4))
SWEEP_N = bc.sweep_sizes((1024, 2048, 4096), (128, 256))


# ------------------------------------------------------------------ the case
def make_model(width: int, blocks: int = BLOCKS, seed: int = 0) -> nn.Module:
    """Linear(D_IN, width), then ``blocks`` blocks Linear + ReLU (paths "blocks.0", ...); He init, eval mode."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(OrderedDict(stem=nn.Linear(D_IN, width), blocks=nn.Sequential(
        *(nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(blocks)))))
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu", generator=g)
            nn.init.zeros_(m.bias)
    return model.eval()


def layer_names(blocks: int = BLOCKS) -> list[str]:
    return [f"blocks.{i}" for i in range(blocks)]


def make_loader(n: int = N, seed: int = 0) -> DataLoader:
    x = torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed))
    return DataLoader(TensorDataset(x), batch_size=BATCH, shuffle=False)


def tcfa_map(a, b, la, lb, loader, estimator: str) -> torch.Tensor:
    return tcfa.layer_map(a, la, b, lb, loader, metric="cka", estimator=estimator, debiased=DEBIASED,
                          batch_size=BATCH, mode="flatten", progress=False).scores


def forwards(a, b, la, lb, loader, keep: bool = False):
    """Both models over every batch with the taps, in eval mode under no_grad (what layer_map runs);
    with ``keep``, each layer's features concatenated over the batches: (list for A, list for B)."""
    kept: tuple[list, list] = ([], [])
    with torch.no_grad():
        for (x,) in loader:
            for model, layers, out in ((a, la, kept[0]), (b, lb, kept[1])):
                acts = tcfa.capture(model, layers, x)
                if keep:
                    out.append([acts[p].flatten(1) for p in layers])
    return tuple([torch.cat(parts) for parts in zip(*k)] for k in kept) if keep else None


def gemms(xa: torch.Tensor, xb: torch.Tensor, xs: list[torch.Tensor]) -> None:
    """The full estimator's GEMMs: centred concatenations X_A^T X_B, and X_l^T X_l of every layer."""
    xa.T @ xb
    for x in xs:
        x.T @ x


# ------------------------------------------------------------------ peers
def peer_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _no_bar(iterable, **_):
    return iterable


def torch_cka_map(a, b, la, lb, loader) -> torch.Tensor:
    """torch-cka as its README runs it, without its progress bar (always on; tcfa's is off).

    It hooks the modules named in model*_layers and keeps no handles, so its hooks are removed here
    after each run (else repeated runs would stack them). Its rows follow the order in which the
    hooks fire (the forward's), which is layers' order here."""
    import torch_cka

    torch_cka.cka.tqdm = _no_bar
    c = torch_cka.CKA(a, b, model1_name="A", model2_name="B", model1_layers=la, model2_layers=lb, device="cpu")
    try:
        c.compare(loader, loader)  # the same loader for model 2, passed so that it does not warn
    finally:
        for model, layers in ((a, la), (b, lb)):
            for p in layers:
                hooks = model.get_submodule(p)._forward_hooks
                for key in [k for k, h in hooks.items() if getattr(getattr(h, "func", None), "__self__", None) is c]:
                    del hooks[key]
    return c.hsic_matrix


def torch_cka_no_grad_map(a, b, la, lb, loader) -> torch.Tensor:
    with torch.no_grad():
        return torch_cka_map(a, b, la, lb, loader)


def pytorch_cka_map(a, b, la, lb, loader) -> torch.Tensor:
    from cka import compute_cka  # pytorch-cka's import name

    return compute_cka(a, b, loader, layers=la, model2_layers=lb, device="cpu", progress=False)[0]


def fp64_case(a, b, loader):
    """Copies of the models and the loader's inputs in fp64 (the same batches)."""
    x = loader.dataset.tensors[0].double()
    return (copy.deepcopy(a).double(), copy.deepcopy(b).double(),
            DataLoader(TensorDataset(x), batch_size=loader.batch_size, shuffle=False))


# (row label, distribution, run)
PEER_RUNS = [("torch-cka", "torch-cka", torch_cka_map),
             ("torch-cka in no_grad", "torch-cka", torch_cka_no_grad_map),
             ("pytorch-cka", "pytorch-cka", pytorch_cka_map)]


# ------------------------------------------------------------------ fp64 references
def _centred_grams(feats: list[torch.Tensor], debiased: bool) -> torch.Tensor:
    """(L, n*n): each layer's Gram U-centred (Szekely & Rizzo 2014) and scaled so that <A_l, B_m> is
    Song et al.'s unbiased HSIC_u, or double-centred so that it is |X_c^T Y_c|^2 / (n-1)^2."""
    k = torch.stack([c @ c.T for c in (f - f.mean(0) for f in feats)])
    n = k.shape[-1]
    if not debiased:
        row = k.mean(-1, keepdim=True)
        return ((k - row - row.mT + k.mean((-2, -1), keepdim=True)) / (n - 1)).flatten(1)
    k.diagonal(dim1=-2, dim2=-1).zero_()
    row = k.sum(-1, keepdim=True) / (n - 2)
    u = k - row - row.mT + k.sum((-2, -1), keepdim=True) / ((n - 1) * (n - 2))
    u.diagonal(dim1=-2, dim2=-1).zero_()
    return u.flatten(1) / math.sqrt(n * (n - 3))


def reference_minibatch(fa, fb, batch: int = BATCH, debiased: bool = DEBIASED) -> torch.Tensor:
    """fp64 minibatch CKA over consecutive batches of the features (the loader's order, no shuffle):
    sum_b HSIC(A_l, B_m) / sqrt(sum_b HSIC(A_l, A_l) sum_b HSIC(B_m, B_m))."""
    hxy = hxx = hyy = 0.0
    for s in range(0, fa[0].shape[0], batch):
        ua = _centred_grams([f[s:s + batch].double() for f in fa], debiased)
        ub = _centred_grams([f[s:s + batch].double() for f in fb], debiased)
        hxy, hxx, hyy = hxy + ua @ ub.T, hxx + ua.square().sum(1), hyy + ub.square().sum(1)
    return hxy / (hxx[:, None] * hyy[None]).sqrt()


def reference_full(fa, fb, debiased: bool = DEBIASED) -> torch.Tensor:
    """fp64 CKA on all rows at once, in feature space (tcfa.linear_cka's formulas, every pair)."""
    xa = [f.double() - f.double().mean(0) for f in fa]
    xb = [f.double() - f.double().mean(0) for f in fb]
    n = xa[0].shape[0]
    cross = torch.cat(xa, 1).T @ torch.cat(xb, 1)
    hxy = torch.stack([torch.stack([blk.square().sum() for blk in row.split([x.shape[1] for x in xb], 1)])
                       for row in cross.split([x.shape[1] for x in xa], 0)])
    hxx = torch.stack([(x.T @ x).square().sum() for x in xa])
    hyy = torch.stack([(x.T @ x).square().sum() for x in xb])
    if debiased:  # centred rows: K~ 1 = -diag(K), 1^T K~ 1 = -tr(K); ka, kb: the Gram diagonals
        ka, kb = torch.stack([x.square().sum(1) for x in xa]), torch.stack([x.square().sum(1) for x in xb])

        def u(h, kk, s1, s2):
            return (h - kk + s1 * s2 / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * kk) / (n * (n - 3))

        hxy = u(hxy, ka @ kb.T, ka.sum(1)[:, None], kb.sum(1)[None])
        hxx = u(hxx, ka.square().sum(1), ka.sum(1), ka.sum(1))
        hyy = u(hyy, kb.square().sum(1), kb.sum(1), kb.sum(1))
    return hxy / (hxx[:, None] * hyy[None]).sqrt()


def max_diff(x, y) -> float:
    if x is None or y is None:
        return float("nan")
    return float((torch.as_tensor(x).double() - torch.as_tensor(y).double()).abs().max())


# ------------------------------------------------------------------ roofline
def _roofline(doc):
    """The full estimator's compute on extracted features: the GEMMs it needs (X^T X counted whole)."""
    s, out = doc.get("shape"), []
    if not s:
        return out
    n, la, lb, wa, wb = s["N"], s["blocks"], s["blocks"], s["width_a"], s["width_b"]
    flops = 2 * n * (la * wa) * (lb * wb) + 2 * n * (la * wa * wa + lb * wb * wb)
    nbytes = n * (la * wa + lb * wb) * bc.F32 + la * lb * 8
    for row in doc["rows"]:
        if row.get("method", "").startswith("tcfa full compute") and "compute ms" in row:
            out.append((row["method"], flops, nbytes, row["compute ms"] / 1e3))
    return out


bc.MODELS.setdefault("layer_map", _roofline)


# ------------------------------------------------------------------ the benchmark
def _timed(fn, repeat: int):
    """(fastest seconds, fn's last result)."""
    out = {}

    def once():
        out["r"] = fn()

    return bc.timeit(once, repeat=repeat), out["r"]


def main():
    a, b = make_model(WIDTH_A, seed=1), make_model(WIDTH_B, seed=2)
    la = lb = layer_names()
    loader = make_loader()
    print(f"layer map: {BLOCKS} x {BLOCKS} blocks, widths {WIDTH_A} / {WIDTH_B}, {N} inputs of {D_IN} in batches "
          f"of {BATCH}, linear CKA, {'unbiased' if DEBIASED else 'biased'} HSIC, fp32")
    print("machine:", bc.machine())

    t_loader = bc.timeit(lambda: [None for _ in loader], repeat=REPEAT)
    t_fwd = bc.timeit(lambda: forwards(a, b, la, lb, loader), repeat=REPEAT)
    fa, fb = forwards(a, b, la, lb, loader, keep=True)
    ref = {"minibatch": reference_minibatch(fa, fb), "full": reference_full(fa, fb)}

    rows, maps = [], {}

    def record(method, seconds, scores, ref_key, note=""):
        work = max(seconds - t_fwd, 0.0) if math.isfinite(seconds) else float("nan")
        row = {"method": method, "end-to-end ms": seconds * 1e3, "CKA work ms": work * 1e3,
               "max|diff| vs fp64": max_diff(scores, ref[ref_key]) if ref_key else float("nan"), "note": note}
        rows.append(row)
        maps[method] = scores
        return row

    for est in ("minibatch", "full"):
        t, scores = _timed(lambda: tcfa_map(a, b, la, lb, loader, est), REPEAT)
        record(f"tcfa {est}", t, scores, est, "debiased" if DEBIASED else "")

    versions = {dist: peer_version(dist) for dist in PEERS}
    ran = []  # the peer rows that produced a map
    for label, dist, fn in PEER_RUNS:
        name = f"{label} {versions[dist] or ''}".rstrip()
        if versions[dist] is None:
            if label == dist:  # said once per package
                print(f"{dist} is not installed: `make bench` installs it (pip install --no-deps {dist}=={PEERS[dist]})")
            record(name, float("nan"), None, None, "not installed (make bench installs it)")
            continue
        try:
            t, scores = _timed(lambda: fn(a, b, la, lb, loader), PEER_REPEAT)
        except Exception as err:  # a peer's failure is a result, not the end of the benchmark
            print(f"{name} failed: {type(err).__name__}: {err}")
            record(name, float("nan"), None, None, f"failed: {type(err).__name__}: {err}"[:120])
            continue
        ran.append((label, record(name, t, scores, "minibatch",
                                  "" if versions[dist] == PEERS[dist] else f"written for {PEERS[dist]}")))

    base = rows[0]  # tcfa minibatch
    tc = next((maps[r["method"]] for label, r in ran if label == "torch-cka"), None)
    pc = next((maps[r["method"]] for label, r in ran if label == "pytorch-cka"), None)
    equal64 = None
    if tc is not None:  # both estimators in fp64 (untimed): equal beyond either one's fp32 rounding
        a64, b64, loader64 = fp64_case(a, b, loader)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)  # torch-cka makes its ones vectors and sums in the default dtype
        try:
            tc64 = torch_cka_map(a64, b64, la, lb, loader64)
        finally:
            torch.set_default_dtype(previous)
        equal64 = max_diff(tcfa_map(a64, b64, la, lb, loader64, "minibatch"), tc64)
        base["max|diff| vs torch-cka fp64"] = max_diff(maps[base["method"]], tc64)
        base["note"] += f"; in fp64, tcfa minibatch vs torch-cka: {equal64:.2g}"
    for r in rows:
        r["minibatch speedup e2e"] = r["end-to-end ms"] / base["end-to-end ms"]
        r["minibatch speedup work"] = (r["CKA work ms"] / base["CKA work ms"] if base["CKA work ms"] > 0
                                       else float("nan"))
        if r["method"] != "tcfa full":  # the minibatch estimator's rows (the full one is another estimator)
            r["max|diff| vs torch-cka"] = max_diff(maps[r["method"]], tc)
            r["max|diff| vs pytorch-cka"] = max_diff(maps[r["method"]], pc)

    # the full estimator's compute alone, on the features of the same forwards, against its GEMMs
    t_compute = bc.timeit(lambda: similarity.pairwise_cka(fa, fb, debiased=DEBIASED), repeat=REPEAT)
    xa, xb = (torch.cat([f - f.mean(0) for f in fs], 1) for fs in (fa, fb))
    layers = xa.split([f.shape[1] for f in fa], 1) + xb.split([f.shape[1] for f in fb], 1)  # views
    t_gemm = bc.timeit(lambda: gemms(xa, xb, layers), repeat=REPEAT)
    rows += [{"method": "forwards only (tcfa.capture)", "end-to-end ms": t_fwd * 1e3,
              "note": f"includes iterating the loader: {t_loader * 1e3:.3g} ms"},
             {"method": "tcfa full compute (pairwise_cka)", "compute ms": t_compute * 1e3,
              "compute/GEMM": t_compute / t_gemm, "note": "on the extracted features"},
             {"method": "GEMMs of the full estimator", "compute ms": t_gemm * 1e3,
              "note": "X_A^T X_B (concatenated, centred) + every X_l^T X_l"}]

    cols = ["method", "end-to-end ms", "CKA work ms", "minibatch speedup e2e", "minibatch speedup work",
            "compute ms", "compute/GEMM", "max|diff| vs torch-cka", "max|diff| vs pytorch-cka", "max|diff| vs torch-cka fp64",
            "max|diff| vs fp64", "note"]
    rows = [{c: r[c] for c in cols if c in r} for r in rows]  # the README table takes the first row's key order
    print(bc.table(rows, cols))
    print("minibatch speedup = this row's time / tcfa minibatch's (> 1: tcfa minibatch faster); "
          "CKA work = end to end - forwards only; max|diff| vs fp64: against its own estimator in fp64")

    faster = min((r for _, r in ran), key=lambda r: r["end-to-end ms"], default=None)
    target = {"full_compute/gemm<=2x": t_compute / t_gemm <= 2}
    if faster is None:
        print("no peer ran: the speedup and equality targets need torch-cka and pytorch-cka (`make bench`)")
    else:
        print(f"faster peer: {faster['method']}")
        target.update({"faster_peer": faster["method"],
                       "minibatch_e2e_speedup>=4x": faster["minibatch speedup e2e"] >= 4,
                       "minibatch_work_speedup>=20x": faster["minibatch speedup work"] >= 20})
    if tc is not None:  # torch-cka's own fp32 error (its row's max|diff| vs fp64) may exceed 1e-4 by itself
        target["max|minibatch-torch_cka|<=1e-4"] = base["max|diff| vs torch-cka"] <= 1e-4
        target["max|minibatch-torch_cka_fp64|<=1e-4"] = base["max|diff| vs torch-cka fp64"] <= 1e-4
        target["fp64: max|minibatch-torch_cka|<=1e-10"] = equal64 <= 1e-10
    # the peers square uncentred Grams in fp32: their own error is the table's max|diff| vs fp64
    target["max|minibatch-fp64|<=1e-4"] = base["max|diff| vs fp64"] <= 1e-4
    print("targets:", target)

    sweep = bc.run_sweep("tcfa.bench.layer_map", {impl: SWEEP_N for impl in SWEEP})
    shape = {"N": N, "batch": BATCH, "d_in": D_IN, "width_a": WIDTH_A, "width_b": WIDTH_B, "blocks": BLOCKS,
             "debiased": DEBIASED}
    path = bc.write("layer_map", rows, {"shape": shape, "targets": target, "peers": versions, "sweep": sweep,
                                        "sweep_axes": {"N": f"anchors (inputs; widths {WIDTH_A}/{WIDTH_B}, L blocks)",
                                                       "time": "ms per tcfa.layer_map call"}})
    print("wrote", path)


# ------------------------------------------------------------------ sweep: estimator x blocks, N = anchors
def _sweep_maker(estimator: str, blocks: int):
    def make(n):
        a, b = make_model(WIDTH_A, blocks, seed=1), make_model(WIDTH_B, blocks, seed=2)
        la = layer_names(blocks)
        loader = make_loader(n)
        return lambda: tcfa_map(a, b, la, la, loader, estimator)
    return make


# labels of at most 20 characters: the plots' legends cut there
SWEEP = {f"tcfa {est} L={blocks}": _sweep_maker(est, blocks) for blocks in SWEEP_BLOCKS for est in ("full", "minibatch")}


def run():
    """The module's entry: one sweep point when run_sweep started this process, else the benchmark."""
    if not bc.sweep_child(SWEEP, warm_n=BATCH):
        main()


if __name__ == "__main__":
    run()
