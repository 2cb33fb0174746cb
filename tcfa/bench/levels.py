"""The CPU kernels at every compiled instruction-set level, side by side, with the peers.

Workloads (fp32, all threads): the dense Sinkhorn on a stored 4096^2 cost (ms per
iteration), the routed top-2 gated stitch 8192 rows 768 -> 768, C = 64, r = 32
(forward + backward), and per-condition moments + CCA (32 conditions x 1024 rows,
256 / 384 wide). Each is timed at every level this CPU runs (tcfa.ops.set_cpu_capability,
one process, levels interleaved round by round so that a change in machine load hits
them alike) and against its peer from the other benchmarks. A build made with
TCFA_BUILD_NATIVE=1 also has a ``native`` (-march=native) level: the ratio to it is
what the portable build costs.

Run: tcfa bench levels   (or python -m tcfa.bench.levels); TCFA_BENCH_QUICK=1: toy sizes.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import torch

import tcfa
from tcfa import ops
from tcfa.bench import cca as cca_bench
from tcfa.bench import common
from tcfa.bench import sinkhorn as sinkhorn_bench
from tcfa.bench import stitch as stitch_bench

ROUNDS = common.pick(5, 2)


def sinkhorn_workload():
    n = common.pick(4096, 256)
    k1, k2 = common.pick((10, 60), (5, 105))
    x, y = torch.randn(n, 64), torch.randn(n, 64) + 0.5

    # A difference of two times: at toy sizes one run each is within another tenant's noise,
    # which can make it 0 or negative, so quick mode takes the fastest of 5 (toy runs are cheap).
    repeat = common.pick(1, 5)

    def per_iteration(solve):
        return sinkhorn_bench.per_iteration(solve, k1, k2, repeat=repeat)

    def tcfa_run():
        return per_iteration(lambda k: tcfa.sinkhorn(x, y, eps=1.0, tol=0, max_iter=k, mode="dense"))

    peer = None
    if importlib.util.find_spec("ot") is not None:
        import ot

        a = torch.full((n,), 1 / n)
        M = torch.cdist(x, y) ** 2

        def peer():
            return per_iteration(lambda k: ot.bregman.sinkhorn_log(a, a, M, 1.0, numItermax=k, stopThr=0))

    return f"sinkhorn dense {n}^2 d64 (ms/iter)", tcfa_run, ("POT sinkhorn_log torch", peer)


def stitch_workload():
    n = common.pick(8192, 256)
    torch.manual_seed(0)
    args = [t.requires_grad_() for t in stitch_bench.inputs(n, stitch_bench.DX, stitch_bench.DY, stitch_bench.C,
                                                             stitch_bench.R)]

    def fwd_bwd(fn):
        def run():
            fn(*args).sum().backward()
            for t in args:
                t.grad = None
        return lambda: common.timeit(run, repeat=1)

    return (f"routed top-2 stitch N={n} fwd+bwd (ms)", fwd_bwd(lambda *t: ops.gated_stitch(*t, top_k=2)),
            ("torch top-2 loop", fwd_bwd(lambda *t: stitch_bench.torch_routed(*t, k=2))))


def cca_workload():
    n_per = cca_bench.N_PER
    x, y, labels = cca_bench.make_data(n_per)
    xn, yn, ln = x.double().numpy(), y.double().numpy(), labels.numpy()
    return (f"moments+CCA {cca_bench.C}x{n_per} rows (ms)",
            lambda: common.timeit(lambda: cca_bench.tcfa_cca(x, y, labels), repeat=1),
            ("numpy svcca loop (fp64)", lambda: common.timeit(lambda: cca_bench.numpy_svcca(xn, yn, ln), repeat=1)))


def measure(name, tcfa_run, peer, levels):
    """Fastest time of each level (and the peer) over ROUNDS interleaved rounds."""
    best = {level: float("inf") for level in levels}
    peer_name, peer_run = peer
    peer_best = float("inf")
    previous = ops.cpu_capability()
    try:
        for _ in range(ROUNDS):
            for level in levels:
                ops.set_cpu_capability(level)
                best[level] = min(best[level], tcfa_run())
            if peer_run is not None:
                peer_best = min(peer_best, peer_run())
    finally:
        ops.set_cpu_capability(previous)
    rows = []
    for level in levels:
        rows.append({"workload": name, "impl": f"tcfa {level}", "ms": 1e3 * best[level],
                     "time / first level": best[level] / best[levels[0]],
                     "peer speedup": peer_best / best[level] if peer_run else float("nan")})
    rows.append({"workload": name, "impl": peer_name, "ms": 1e3 * peer_best if peer_run else float("nan"),
                 "note": "peer" if peer_run else "peer, not installed"})
    return rows


def main():
    levels = ops.cpu_capabilities()
    # native (when built) first: every other level is compared with it
    levels = (["native"] if "native" in levels else []) + [lv for lv in levels if lv != "native"]
    torch.manual_seed(0)
    np.random.seed(0)
    rows = []
    for workload in (sinkhorn_workload, stitch_workload, cca_workload):
        rows += measure(*workload(), levels)
    print(f"CPU levels {levels} (time / first level: against {levels[0]}); {common.machine()}")
    print(common.table(rows, ["workload", "impl", "ms", "time / first level", "peer speedup", "note"]))
    print("wrote", common.write("levels", rows, {"levels": levels}, measure_roofs=False))


if __name__ == "__main__":
    main()
