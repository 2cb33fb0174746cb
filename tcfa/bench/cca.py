"""Moments + CCA for 32 conditions from flat rows + labels, against the usual recipes.

Shape of issue 3: 32 conditions x 1024 samples, dx = 256, dy = 384, k = 32.
Peers, in the same run on the same rows:
  * the NumPy float64 svcca recipe looped over conditions (covariances, reg,
    inverse square roots by eigh, SVD);
  * the same recipe batched in torch float64 (bmm covariances, batched eigh, SVD);
  * sklearn's iterative CCA on one condition, scaled by the number of conditions.
Also: moments throughput (rows/s) against a per-condition torch loop of x.T @ x.
Sweep: time and peak extra memory of tcfa moments+CCA (fp32 rows) and of the NumPy
loop (fp64 rows) vs the total number of rows N (32 conditions, N / 32 rows each),
every point in a fresh process (common.run_sweep).

Run: tcfa bench cca  (or python -m tcfa.bench.cca; a checkout also has benchmarks/bench_cca.py)
TCFA_BENCH_QUICK=1 runs everything at toy sizes (8 conditions x 128 rows, dx = 32, dy = 48, k = 8;
a check of the plumbing, not a measurement).
"""
from __future__ import annotations

import time

import numpy as np
import torch

from tcfa.bench import common as _common

import tcfa

C, N_PER, DX, DY, K = _common.pick((32, 1024, 256, 384, 32), (8, 128, 32, 48, 8))
REG = 1e-4


def make_data(n_per=N_PER, seed=0):
    """Correlated (x, y) per condition, rows shuffled so labels arrive unsorted."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(C).repeat_interleave(n_per)
    labels = labels[torch.randperm(C * n_per, generator=g)]
    x = torch.randn(C * n_per, DX, generator=g)
    mix = torch.randn(C, DX, DY, generator=g) / DX**0.5
    # y = x @ mix[label] one condition at a time (gathering mix per row would take N * DX * DY floats)
    order = torch.argsort(labels, stable=True)
    y = torch.empty(C * n_per, DY)
    y[order] = torch.bmm(x[order].view(C, n_per, DX), mix).view(-1, DY)
    return x, y + torch.randn(C * n_per, DY, generator=g), labels


def tcfa_cca(x, y, labels):
    return tcfa.cca(tcfa.segment_moments(x, y, labels, C), K, REG).rho


def _reg(s):
    return s + REG * np.trace(s) / s.shape[0] * np.eye(s.shape[0])


def numpy_svcca(x, y, labels):
    """svcca recipe, float64, one condition at a time."""
    rho = np.empty((C, K))
    for c in range(C):
        xc, yc = x[labels == c], y[labels == c]
        cov = np.cov(np.hstack([xc, yc]).T)
        sxx, syy, sxy = _reg(cov[:DX, :DX]), _reg(cov[DX:, DX:]), cov[:DX, DX:]

        def inv_sqrt(a):
            w, v = np.linalg.eigh(a)
            return (v / np.sqrt(w)) @ v.T

        rho[c] = np.linalg.svd(inv_sqrt(sxx) @ sxy @ inv_sqrt(syy), compute_uv=False)[:K]
    return rho


def torch_eigh_batched(x, y, labels):
    """The same recipe batched over conditions in torch float64 (grouping by a sort)."""
    order = torch.argsort(labels, stable=True)
    n_per = x.shape[0] // C
    xs = x[order].double().reshape(C, n_per, DX)
    ys = y[order].double().reshape(C, n_per, DY)
    xs, ys = xs - xs.mean(1, keepdim=True), ys - ys.mean(1, keepdim=True)
    sxx, syy, sxy = (a.mT @ b / (n_per - 1) for a, b in ((xs, xs), (ys, ys), (xs, ys)))

    def inv_sqrt(a):
        d = a.shape[-1]
        a = a + REG * a.diagonal(dim1=-2, dim2=-1).sum(-1)[:, None, None] / d * torch.eye(d, dtype=a.dtype)
        w, v = torch.linalg.eigh(a)
        return (v / w.sqrt()[:, None, :]) @ v.mT

    return torch.linalg.svd(inv_sqrt(sxx) @ sxy @ inv_sqrt(syy))[1][:, :K]


def sklearn_one_condition(x, y, labels):
    from sklearn.cross_decomposition import CCA

    xc, yc = x[labels == 0], y[labels == 0]
    CCA(n_components=K, max_iter=500, scale=False).fit(xc, yc)


def moments_loop(x, y, index):
    """Per-condition torch loop: gather, center, x.T @ x, y.T @ y, x.T @ y."""
    for idx in index:
        xc, yc = x[idx], y[idx]
        xc, yc = xc - xc.mean(0), yc - yc.mean(0)
        xc.T @ xc, yc.T @ yc, xc.T @ yc


def _sweep_tcfa(n):
    x, y, labels = make_data(n // C)
    return lambda: tcfa_cca(x, y, labels)


def _sweep_numpy(n):
    xn, yn, ln = (t.double().numpy() if t.is_floating_point() else t.numpy() for t in make_data(n // C))
    return lambda: numpy_svcca(xn, yn, ln)


SWEEP = {"tcfa moments+cca": _sweep_tcfa, "numpy svcca loop": _sweep_numpy}  # fp32 rows; fp64, its recipe
# N = all rows, N / C of them per condition
SWEEP_N = _common.sweep_sizes([C * k for k in (256, 512, 1024, 2048, 4096)], [C * 64, C * 128])


def main():
    x, y, labels = make_data()
    xn, yn, ln = x.double().numpy(), y.double().numpy(), labels.numpy()
    rows = []

    t_tcfa = _common.timeit(lambda: tcfa_cca(x, y, labels), repeat=7)
    t_tcfa64 = _common.timeit(lambda: tcfa_cca(x.double(), y.double(), labels), repeat=3)
    t_numpy = _common.timeit(lambda: numpy_svcca(xn, yn, ln), repeat=3)
    t_torch = _common.timeit(lambda: torch_eigh_batched(x, y, labels), repeat=3)
    t0 = time.perf_counter()
    sklearn_one_condition(xn, yn, ln)
    t_sklearn = (time.perf_counter() - t0) * C

    rho_ref = numpy_svcca(xn, yn, ln)
    err32 = float(np.abs(tcfa_cca(x, y, labels).double().numpy() - rho_ref).max())
    err64 = float(np.abs(tcfa_cca(x.double(), y.double(), labels).numpy() - rho_ref).max())
    err_torch = float(np.abs(torch_eigh_batched(x, y, labels).numpy() - rho_ref).max())

    for name, t, err in [("tcfa moments+cca (fp32 rows)", t_tcfa, err32),
                         ("tcfa moments+cca (fp64 rows)", t_tcfa64, err64),
                         ("numpy svcca loop (fp64)", t_numpy, 0.0),
                         ("torch batched eigh (fp64)", t_torch, err_torch),
                         (f"sklearn CCA (1 cond x {C})", t_sklearn, float("nan"))]:
        rows.append({"method": name, "seconds": t, "numpy_loop/this": t_numpy / t, "max|rho-numpy|": err})

    index = [(labels == c).nonzero().flatten() for c in range(C)]
    t_mom = _common.timeit(lambda: tcfa.segment_moments(x, y, labels, C), repeat=7)
    t_loop = _common.timeit(lambda: moments_loop(x, y, index), repeat=5)
    n = C * N_PER
    moments = [{"method": "tcfa.segment_moments (fp32)", "seconds": t_mom, "rows_per_s": n / t_mom},
               {"method": "torch per-condition x.T@x loop (fp32)", "seconds": t_loop, "rows_per_s": n / t_loop}]

    print(f"moments + CCA, {C} conditions x {N_PER} rows, dx={DX}, dy={DY}, k={K}, reg={REG}")
    print(_common.table(rows, ["method", "seconds", "numpy_loop/this", "max|rho-numpy|"]))
    print()
    print(_common.table(moments, ["method", "seconds", "rows_per_s"]))
    print(f"\nmoments speedup over the loop: {t_loop / t_mom:.2f}x")
    target = {"tcfa_seconds<=0.2": t_tcfa <= 0.2, "speedup>=5x": t_numpy / t_tcfa >= 5, "rho_err<=1e-4": err32 <= 1e-4}
    print("targets:", target)
    print("machine:", _common.machine())
    sweep = _common.run_sweep("tcfa.bench.cca", {impl: SWEEP_N for impl in SWEEP})
    path = _common.write("cca", rows + moments, {"shape": {"C": C, "n": N_PER, "dx": DX, "dy": DY, "k": K},
                                                 "targets": target, "sweep": sweep,
                                                 "sweep_axes": {"N": f"rows N ({C} conditions)",
                                                                "time": "ms per call"}})
    print("wrote", path)



def run():
    """The module's entry: one sweep point when run_sweep started this process, else the benchmark."""
    if not _common.sweep_child(SWEEP, warm_n=C * 2 * K):  # tcfa.cca needs more than K rows per condition
        main()


if __name__ == "__main__":
    run()
