"""Gated multi-stitch: tcfa.ops.gated_stitch against plain torch compositions of the same math.

N = 8192 rows, 768 -> 768, C = 64 conditions, rank r = 32, fp32, in one run:
  torch dense   logits, softmax, z = x.U_c - mu_x[c].U_c for all c (einsum), out = g.mu_y + (g z).V
  torch top-2   top-2 gates, then a Python loop over conditions: gather the rows that picked c,
                two GEMMs, index_add into out
  tcfa dense / tcfa top-2   the fused CPU op (through the validating wrapper)
forward and forward+backward (sum of outputs as the loss). Targets (issue 4): routed top-2 forward
<= 20 ms, its forward+backward <= 3x its forward, tcfa dense forward no slower than torch dense.
Sweep: forward time and peak extra memory of all four vs the number of rows N, every point in a
fresh process (common.run_sweep).

    python -m tcfa.bench.stitch [--rows 8192] [--repeat 10]   (or tcfa bench stitch)

TCFA_BENCH_QUICK=1 runs the case (N = 256, 64 -> 64, C = 8, r = 8, 2 repeats) and the sweep at toy
sizes (a check of the plumbing, not a measurement).
"""
from __future__ import annotations

import argparse

import torch

from tcfa.bench import common as _common
from tcfa import ops


def torch_dense(x, W, b, U, V, mu_x, mu_y, tau=1.0):
    g = torch.softmax((x @ W + b) / tau, dim=1)
    z = torch.einsum("nd,cdr->ncr", x, U) - torch.einsum("cd,cdr->cr", mu_x, U)
    return g @ mu_y + torch.einsum("ncr,crd->nd", g.unsqueeze(2) * z, V)


def torch_routed(x, W, b, U, V, mu_x, mu_y, k=2, tau=1.0):
    logits = x @ W + b
    top, index = logits.topk(k, dim=1)
    gates = torch.softmax(top / tau, dim=1)
    out = x.new_zeros(x.shape[0], V.shape[2])
    for c in range(U.shape[0]):
        rows, slot = (index == c).nonzero(as_tuple=True)
        if rows.numel():
            g = gates[rows, slot].unsqueeze(1)
            y = mu_y[c] + ((x[rows] - mu_x[c]) @ U[c]) @ V[c]
            out = out.index_add(0, rows, g * y)
    return out


def inputs(N, dx, dy, C, r):
    return (torch.randn(N, dx), torch.randn(dx, C) / dx**0.5, torch.zeros(C), torch.randn(C, dx, r) / dx**0.5,
            torch.randn(C, r, dy) / r**0.5, 0.1 * torch.randn(C, dx), torch.randn(C, dy))


DX, DY, C, R = _common.pick((768, 768, 64, 32), (64, 64, 8, 8))
CASES = {
    "torch dense": lambda *t: torch_dense(*t),
    "tcfa dense": lambda *t: ops.gated_stitch(*t),
    "torch top-2 loop": lambda *t: torch_routed(*t, k=2),
    "tcfa top-2": lambda *t: ops.gated_stitch(*t, top_k=2),
}


def _sweep_forward(fn):
    def make(n):
        torch.manual_seed(0)
        args = inputs(n, DX, DY, C, R)

        def run():
            with torch.no_grad():
                fn(*args)
        return run
    return make


SWEEP = {name: _sweep_forward(fn) for name, fn in CASES.items()}
SWEEP_N = _common.sweep_sizes((1024, 2048, 4096, 8192, 16384), (64, 128))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=_common.pick(8192, 256))
    ap.add_argument("--repeat", type=int, default=_common.pick(10, 2))
    a = ap.parse_args()
    N, dx, dy, r = a.rows, DX, DY, R
    torch.manual_seed(0)
    args = inputs(N, dx, dy, C, r)
    grad_args = [t.clone().requires_grad_() for t in args]

    def fwd_bwd(fn):
        def run():
            fn(*grad_args).sum().backward()
            for t in grad_args:
                t.grad = None
        return run

    # The implementations agree before anything is timed.
    small = inputs(256, dx, dy, C, r)
    torch.testing.assert_close(ops.gated_stitch(*small), torch_dense(*small), atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(ops.gated_stitch(*small, top_k=2), torch_routed(*small), atol=1e-3, rtol=1e-3)

    rows = []
    for name, fn in CASES.items():
        with torch.no_grad():
            t_f = _common.timeit(lambda: fn(*args), repeat=a.repeat)
        t_fb = _common.timeit(fwd_bwd(fn), repeat=a.repeat)
        rows.append({"impl": name, "forward ms": 1e3 * t_f, "fwd+bwd ms": 1e3 * t_fb, "fwd+bwd / fwd": t_fb / t_f})
    by = {row["impl"]: row for row in rows}
    for row in rows:
        peer = by["torch dense" if "dense" in row["impl"] else "torch top-2 loop"]
        row["fwd speedup vs torch"] = peer["forward ms"] / row["forward ms"]
        row["fwd+bwd speedup vs torch"] = peer["fwd+bwd ms"] / row["fwd+bwd ms"]
    flops = 2 * N * dx * C + 2 * 2 * N * C * r * (dx + dy) // 2  # gate + shrink + expand (dense)
    machine = _common.machine()
    print(f"gated stitch N={N} {dx}->{dy} C={C} r={r} fp32; {machine}")
    print(f"dense forward: {flops / 1e9:.1f} GFLOP")
    print(_common.table(rows, ["impl", "forward ms", "fwd+bwd ms", "fwd+bwd / fwd", "fwd speedup vs torch",
                               "fwd+bwd speedup vs torch"]))
    targets = {"routed top-2 forward <= 20 ms": by["tcfa top-2"]["forward ms"] <= 20,
               "routed fwd+bwd <= 3x forward": by["tcfa top-2"]["fwd+bwd / fwd"] <= 3,
               "dense forward <= torch dense": by["tcfa dense"]["forward ms"] <= by["torch dense"]["forward ms"]}
    for k, ok in targets.items():
        print(f"  {'met ' if ok else 'MISSED'}  {k}")
    sweep = _common.run_sweep("tcfa.bench.stitch", {impl: SWEEP_N for impl in SWEEP})
    path = _common.write("stitch", rows, {"shape": {"N": N, "dx": dx, "dy": dy, "C": C, "r": r, "dtype": "float32"},
                                          "targets": targets, "sweep": sweep,
                                          "sweep_axes": {"N": f"rows N ({dx} -> {dy}, {C} conditions, rank {r})",
                                                         "time": "ms per forward"}})
    print(f"wrote {path}")



def run():
    """The module's entry: one sweep point when run_sweep started this process, else the benchmark."""
    if not _common.sweep_child(SWEEP, warm_n=64):
        main()


if __name__ == "__main__":
    run()
