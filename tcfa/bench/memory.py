"""Memory of a large online Sinkhorn: 100,000 x 100,000 points, d = 64, fp32, a few iterations.

Stored, the cost matrix alone would take 40 GB (more than this machine's 24 GB, and what POT or
GeomLoss's tensorized backend would allocate); the online mode recomputes it in tiles, so its
extra memory is O((N + M) d). Measured: the process's resident high-water mark (VmHWM, reset after
the inputs are built) minus what was resident before the solve; the goal is <= 1 GiB. Also shown:
mode="auto" choosing online by itself (the cost does not fit a quarter of free memory), and a
mode="dense" request failing before it allocates anything.

Run: tcfa bench memory   (or python -m tcfa.bench.memory); TCFA_BENCH_QUICK=1: 10,000 points.
"""
from __future__ import annotations

import time

import torch

import tcfa
from tcfa.bench import common

N = common.pick(100_000, 10_000)
D, ITERS = 64, common.pick(3, 2)
GOAL_GIB = 1.0


def main():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(N, D, generator=g), torch.randn(N, D, generator=g) + 0.1
    before = common.reset_peak_rss()
    start = time.perf_counter()
    r = tcfa.sinkhorn(x, y, eps=1.0, max_iter=ITERS, tol=0.0)  # mode="auto"
    seconds = time.perf_counter() - start
    extra = common.peak_rss() - before
    start = time.perf_counter()
    try:
        tcfa.sinkhorn(x, y, eps=1.0, max_iter=1, mode="dense")
        refused = "allocated (it fit)"
    except MemoryError as err:
        refused = f"MemoryError after {1e3 * (time.perf_counter() - start):.1f} ms: {err}"
    cost_gib = N * N * 4 / 2**30
    rows = [{"case": f"{N} x {N}, d {D}, fp32, {ITERS} iterations", "mode chosen by auto": r.mode,
             "seconds": seconds, "extra peak GiB": extra / 2**30, "goal GiB": GOAL_GIB,
             "stored cost would take GiB": cost_gib, "met": extra / 2**30 <= GOAL_GIB}]
    print(common.table(rows, list(rows[0])))
    print(f"mode='dense': {refused}")
    common.write("memory", rows, {"dense_request": refused}, measure_roofs=False)


if __name__ == "__main__":
    main()
