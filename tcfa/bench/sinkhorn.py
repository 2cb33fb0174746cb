"""Sinkhorn benchmark: tcfa against POT (numpy and torch backends), OTT-JAX and GeomLoss, same run.

Cases (issue 2, fp32, all threads):
  A. N=M=4096, d=64: time per iteration (tcfa dense and online; peers)
  B. the same problem solved to L1 marginal error 1e-4 at tcfa's defaults (no annealing, omega
     1.3) and with eps-scaling / omega 1.5, against the loop as it was before over-relaxation
     (legacy_solve: scaling 0.5, a call per stage), GeomLoss and OTT-JAX's whole solve with its defaults
  E. the debiased divergence of case B in one call ((x, x), (y, y) by the symmetric update), against
     three solves of the old loop
  C. 64 problems 256x256, d=256, 100 iterations in one call vs a POT loop and ot.batch
  D. online mode N=M=30,000, d=64: time per iteration vs the GEMM bound, peak extra memory
  sweep: time per iteration and peak extra memory vs N, dense and online (one subprocess each,
         so every point's memory high-water mark starts clean; common.run_sweep)

Peers that are not installed are reported as such (pip install POT geomloss ott-jax).
Run:  tcfa bench sinkhorn   (writes <results>/sinkhorn.json; see tcfa.bench.common.results_dir)
TCFA_BENCH_QUICK=1 runs every case and the sweep at toy sizes, with fewer timed runs per length
(a check of the plumbing, not a measurement).
"""
from __future__ import annotations

import importlib.util

import numpy as np
import torch

from tcfa.bench import common as bc

import tcfa
from tcfa.ot_checks import DEFAULT_OMEGA

EPS_A = 1.0  # case A/C regularisation (timing per iteration does not depend on it)
N_A, N_D, D = bc.pick(4096, 256), bc.pick(30000, 1024), 64  # rows of cases A/B and of case D; dimension
REPEAT = bc.pick(3, 1)  # timed runs of each length in per_iteration
rows: list[dict] = []


def has(mod: str) -> bool:
    return importlib.util.find_spec(mod) is not None


def per_iteration(run, k1: int, k2: int, repeat: int = REPEAT) -> float:
    """Seconds per iteration, setup excluded: (T(k2) - T(k1)) / (k2 - k1)."""
    t1 = bc.timeit(lambda: run(k1), repeat=repeat)
    t2 = bc.timeit(lambda: run(k2), repeat=repeat)
    return max(t2 - t1, 0.0) / (k2 - k1)


def record(case, impl, seconds, unit="ms/iter", note="", ref=None):
    row = dict(case=case, impl=impl, value=seconds * 1e3, unit=unit, note=note)
    rows.append(row)
    return row


def ratios(case: str, tcfa_impl: str):
    base = next(r for r in rows if r["case"] == case and r["impl"] == tcfa_impl)["value"]
    for r in rows:
        if r["case"] == case:
            r["tcfa_speedup"] = r["value"] / base if base > 0 else float("nan")


def case_a(x, y):
    n, d = x.shape
    case = f"A {n}^2 d{d}"
    run_dense = lambda k: tcfa.sinkhorn(x, y, eps=EPS_A, tol=0, max_iter=k, mode="dense")  # noqa: E731
    run_online = lambda k: tcfa.sinkhorn(x, y, eps=EPS_A, tol=0, max_iter=k, mode="online")  # noqa: E731
    record(case, "tcfa dense", per_iteration(run_dense, 10, 60))
    record(case, "tcfa online", per_iteration(run_online, 2, 7))
    # unbalanced OT (reach): the same fused loop with each half-step relaxed; goal within 10 % of balanced
    run_unbalanced = lambda k: tcfa.sinkhorn(x, y, eps=EPS_A, tol=0, max_iter=k, mode="dense", reach=10 * EPS_A)  # noqa: E731
    record(case, "tcfa dense unbalanced", per_iteration(run_unbalanced, 10, 60))
    if has("ot"):
        import ot

        a = np.full(n, 1 / n, dtype=np.float32)
        M = ot.dist(x.numpy(), y.numpy())
        t = per_iteration(lambda k: ot.bregman.sinkhorn_log(a, a, M, EPS_A, numItermax=k, stopThr=0), 2, 7)
        record(case, "POT sinkhorn_log numpy", t)
        at, Mt = torch.from_numpy(a), torch.from_numpy(M)
        t = per_iteration(lambda k: ot.bregman.sinkhorn_log(at, at, Mt, EPS_A, numItermax=k, stopThr=0), 2, 12)
        record(case, "POT sinkhorn_log torch", t)
    else:
        record(case, "POT", float("nan"), note="not installed")
    if has("ott"):
        import jax
        import jax.numpy as jnp
        from ott.geometry import pointcloud
        from ott.problems.linear import linear_problem
        from ott.solvers.linear import sinkhorn as ott_sinkhorn

        xj, yj = jnp.asarray(x.numpy()), jnp.asarray(y.numpy())

        def make(k):
            solver = ott_sinkhorn.Sinkhorn(min_iterations=k, max_iterations=k, threshold=0.0, inner_iterations=1)
            f = jax.jit(lambda xx, yy: solver(linear_problem.LinearProblem(
                pointcloud.PointCloud(xx, yy, epsilon=EPS_A))).f)
            f(xj, yj).block_until_ready()  # compile
            return lambda: f(xj, yj).block_until_ready()

        f1, f2 = make(10), make(30)
        t = (bc.timeit(f2, repeat=REPEAT) - bc.timeit(f1, repeat=REPEAT)) / 20
        record(case, "OTT-JAX (jit)", t)
    else:
        record(case, "OTT-JAX", float("nan"), note="not installed")
    ratios(case, "tcfa dense")


def legacy_solve(x, y, eps, tol, scaling, max_iter=10000):
    """The solver as it was before the annealing stages moved into the kernel (commit 2cab5d1):
    one ops.sinkhorn_dense call per eps stage, each opening with its own column pass, then
    plain (omega 1) iterations at eps. Same kernel passes as that commit's _iterate."""
    from tcfa import ops
    from tcfa.ot import _eps_schedule, _HalfSteps, _prepare

    prob, _, _ = _prepare(x, y, None, None, eps, "sqeuclidean", None, None)
    cost = _HalfSteps(prob, dense=True).cost
    f, g = torch.zeros_like(prob.a), torch.zeros_like(prob.b)
    args = (cost, prob.x.offsets, prob.y.offsets, prob.log_a, prob.log_b)
    schedule = _eps_schedule(prob, scaling)
    n = 0
    for e in schedule:
        f, g, it, _ = ops.sinkhorn_dense(*args, f, g, e, 1, 0.0)
        n += int(it.max())
    f, g, it, err = ops.sinkhorn_dense(*args, f, g, eps, max_iter - len(schedule), tol)
    return prob, f, g, n + int(it.max()), float(err.max())


def plan_error(x, y, f, g, eps) -> float:
    """|P 1 - a|_1 + |P^T 1 - b|_1 of the plan of potentials (f, g), uniform weights, fp64."""
    x, y, f, g = x.double(), y.double(), f.double().reshape(-1), g.double().reshape(-1)
    C = torch.cdist(x - x.mean(0), y - x.mean(0)) ** 2
    n, m = C.shape
    P = torch.exp((f[:, None] + g[None, :] - C) / eps) / (n * m)
    return float((P.sum(1) - 1 / n).abs().sum() + (P.sum(0) - 1 / m).abs().sum())


def case_b(x, y):
    eps, tol = 0.05, 1e-4
    xs, ys = x / 8, y / 8  # |x - y|^2 averages 2: eps is 1/40 of the mean cost
    case = "B solve to 1e-4"
    for scaling, omega in ((None, DEFAULT_OMEGA), (0.5, DEFAULT_OMEGA), (None, 1.5), (0.5, 1.5)):
        res = {}

        def solve():
            res["r"] = tcfa.sinkhorn(xs, ys, eps=eps, tol=tol, scaling=scaling, max_iter=10000, mode="auto",
                                     omega=omega)

        t = bc.timeit(solve, repeat=5)
        r = res["r"]
        record(case, _label(scaling, omega), t, unit="ms",
               note=f"{int(r.n_iter[0])} iters, err {float(r.error[0]):.1e}, "
                    f"plan error {plan_error(xs, ys, r.f, r.g, eps):.1e}")
    out = {}
    t = bc.timeit(lambda: out.update(r=legacy_solve(xs, ys, eps, tol, 0.5)), repeat=5)
    prob, f, g, n, err = out["r"]
    record(case, "tcfa before (2cab5d1 loop: a call per eps stage, omega 1; scaling 0.5)", t, unit="ms",
           note=f"{n} iters, err {err:.1e}, plan error {plan_error(xs, ys, f, g, eps):.1e}")
    if has("geomloss"):
        from geomloss import SamplesLoss

        # GeomLoss p=2 uses |x-y|^2 / 2 and blur^p = eps: the same problem with eps/2
        loss = SamplesLoss("sinkhorn", p=2, blur=(eps / 2) ** 0.5, scaling=0.9, backend="tensorized", debias=False)
        record(case, "GeomLoss tensorized (scaling 0.9)", bc.timeit(lambda: loss(xs, ys), repeat=1), unit="ms",
               note="its own stopping rule (annealing schedule)")
    else:
        record(case, "GeomLoss", float("nan"), unit="ms", note="not installed")
    if has("ott"):
        import jax
        import jax.numpy as jnp
        from ott.geometry import pointcloud
        from ott.problems.linear import linear_problem
        from ott.solvers.linear import sinkhorn as ott_sinkhorn

        xj, yj = jnp.asarray(xs.numpy()), jnp.asarray(ys.numpy())
        for label, solver in (("OTT-JAX Sinkhorn() defaults (threshold 1e-3)", ott_sinkhorn.Sinkhorn()),
                              ("OTT-JAX Sinkhorn(threshold=1e-4)", ott_sinkhorn.Sinkhorn(threshold=tol))):
            run = jax.jit(lambda a, b, solver=solver: solver(linear_problem.LinearProblem(
                pointcloud.PointCloud(a, b, epsilon=eps))))
            o = run(xj, yj)
            o.f.block_until_ready()  # compile
            t = bc.timeit(lambda: run(xj, yj).f.block_until_ready(), repeat=3)
            perr = float(np.abs(np.asarray(o.matrix).sum(1) - 1 / len(xs)).sum() +
                         np.abs(np.asarray(o.matrix).sum(0) - 1 / len(ys)).sum())
            record(case, label, t, unit="ms", note=f"{int(o.n_iters)} iters, plan error {perr:.1e} (jit, compile excluded)")
    else:
        record(case, "OTT-JAX", float("nan"), unit="ms", note="not installed")
    ratios(case, _label(None, DEFAULT_OMEGA))


def _label(scaling, omega) -> str:
    return f"tcfa{' defaults' if (scaling, omega) == (None, DEFAULT_OMEGA) else ''} (scaling {scaling}, omega {omega})"


def case_divergence(x, y):
    """The debiased divergence: one ragged call (xy, and xx, yy by the symmetric update) against three
    solves of the old loop, at tcfa's defaults and at the old loop's own setting (scaling 0.5)."""
    eps, tol = 0.05, 1e-4
    xs, ys = x / 8, y / 8
    case = "E divergence to 1e-4"
    for scaling in (None, 0.5):
        t = bc.timeit(lambda: tcfa.sinkhorn_divergence(xs, ys, eps=eps, tol=tol, scaling=scaling, max_iter=10000),
                      repeat=3)
        record(case, f"tcfa sinkhorn_divergence (one call, scaling {scaling}, omega {DEFAULT_OMEGA})", t, unit="ms")
    t = bc.timeit(lambda: [legacy_solve(p, q, eps, tol, 0.5) for p, q in ((xs, ys), (xs, xs), (ys, ys))], repeat=3)
    record(case, "tcfa before (three solves of the 2cab5d1 loop, scaling 0.5)", t, unit="ms")
    ratios(case, f"tcfa sinkhorn_divergence (one call, scaling None, omega {DEFAULT_OMEGA})")


def case_c():
    B, n, d, iters = bc.pick((64, 256, 256, 100), (8, 64, 32, 20))
    case = f"C {B} x {n}^2 d{d}, {iters} it"
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(B, n, d, generator=g)
    ys = torch.randn(B, n, d, generator=g)
    eps = float(d)  # costs average 2d; the timing runs a fixed number of iterations
    # the ragged form the issue names: flat rows + offsets (equal sizes here, so POT's batch applies too)
    x_flat, y_flat = xs.reshape(-1, d), ys.reshape(-1, d)
    offsets = torch.arange(B + 1) * n
    record(case, "tcfa one call",
           bc.timeit(lambda: tcfa.sinkhorn(x_flat, y_flat, eps=eps, x_offsets=offsets, y_offsets=offsets, tol=0,
                                           max_iter=iters), repeat=7), unit="ms",
           note="flat rows + offsets; includes the cost GEMMs")
    if has("ot"):
        import ot

        a = np.full(n, 1 / n, dtype=np.float32)
        Ms = [ot.dist(xs[k].numpy(), ys[k].numpy()) for k in range(B)]
        record(case, "POT loop sinkhorn_log",
               bc.timeit(lambda: [ot.bregman.sinkhorn_log(a, a, M, eps, numItermax=iters, stopThr=0) for M in Ms],
                         repeat=1), unit="ms", note="costs precomputed")
        if hasattr(ot, "batch"):
            from ot.batch import solve_batch

            Mb = np.stack(Ms)
            ab = np.full((B, n), 1 / n, dtype=np.float32)
            record(case, "POT ot.batch",
                   bc.timeit(lambda: solve_batch(M=Mb, reg=eps, a=ab, b=ab, max_iter=iters, tol=0), repeat=1),
                   unit="ms", note="costs precomputed")
    ratios(case, "tcfa one call")


def case_d():
    n, d = N_D, D
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, d, generator=g)
    y = torch.randn(n, d, generator=g)
    gemm = bc.gemm_rate(bc.pick(2048, 512))
    bound = 2 * 2 * n * n * d / gemm  # two half-steps, each an (n x d) @ (d x n) product
    base = bc.peak_rss()
    t = per_iteration(lambda k: tcfa.sinkhorn(x, y, eps=float(d), tol=0, max_iter=k, mode="online"), 1, 3)
    peak = bc.peak_rss()
    extra = max(peak - base, 0)
    # VmHWM is the process's high-water mark: "extra" is how far the solve
    # pushed it beyond what the process had already touched (inputs, the GEMM
    # probe); the whole process's peak bounds it from above.
    row = record(f"D online {n}^2 d{d}", "tcfa online", t,
                 note=f"GEMM bound {bound * 1e3:.0f} ms at {gemm / 1e9:.0f} GFLOP/s measured; "
                      f"ratio to bound {t / bound:.2f}; peak extra memory {extra / 2**20:.0f} MiB "
                      f"(whole process peak RSS {peak / 2**20:.0f} MiB; a dense cost would be "
                      f"{n * n * 4 / 2**30:.1f} GiB)")
    row.update(gemm_bound_ms=bound * 1e3, ratio_to_bound=t / bound, peak_extra_mib=extra / 2**20,
               peak_rss_mib=peak / 2**20)
    row["tcfa_speedup"] = 1.0


def _sweep_maker(mode):
    def make(n):
        x, y = torch.randn(n, 64), torch.randn(n, 64)
        return lambda k=1: tcfa.sinkhorn(x, y, eps=64.0, tol=0, max_iter=k, mode=mode)
    return make


def _sweep_timer(run) -> float:
    # one timed run per length: an online iteration at the largest N takes most of a second
    return per_iteration(run, 2, 12, repeat=1)


SWEEP = {"tcfa dense": _sweep_maker("dense"), "tcfa online": _sweep_maker("online")}
SWEEP_SIZES = {"tcfa dense": bc.sweep_sizes((1024, 2048, 4096, 8192), (256, 512)),
               "tcfa online": bc.sweep_sizes((1024, 2048, 4096, 8192, 16384), (256, 512))}


def sweep() -> list[dict]:
    """Seconds per iteration and peak extra MiB vs N (d=64), each point in a fresh process."""
    return bc.run_sweep("tcfa.bench.sinkhorn", SWEEP_SIZES)


def main():
    torch.manual_seed(0)
    print(bc.machine())
    case_d()  # first: the memory baseline is cleanest in a fresh process
    x = torch.randn(N_A, D)
    y = torch.randn(N_A, D)
    case_a(x, y)
    case_b(x, y)
    case_divergence(x, y)
    case_c()
    print(bc.table(rows, ["case", "impl", "value", "unit", "tcfa_speedup", "note"]))
    print("tcfa_speedup = peer time / tcfa time in the same case (> 1: tcfa faster)")
    print("wrote", bc.write("sinkhorn", rows, {"sweep": sweep(),
                                               "sweep_axes": {"N": "N = M rows, d = 64", "time": "ms per iteration"}}))



def run():
    """The module's entry: one sweep point when run_sweep started this process, else the benchmark."""
    if not bc.sweep_child(SWEEP, warm_n=64, timer=_sweep_timer):
        main()


if __name__ == "__main__":
    run()
