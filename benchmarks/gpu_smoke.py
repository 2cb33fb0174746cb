"""Five minutes on a GPU: every Triton kernel against the C++ op, then Sinkhorn, moments and stitch timed against torch.

    python benchmarks/gpu_smoke.py                    # on cuda (a GPU owner's check; prints one table)
    TRITON_INTERPRET=1 python benchmarks/gpu_smoke.py --device cpu --quick   # the script itself, here

Checks: each launcher (tcfa/kernels) on the device against the C++ op on the CPU, fp32 and fp64,
max |error| relative to the output's scale, against the precision policy's tolerance
(tcfa/kernels/_precision.py, docs/precision.md). Timings (cuda only): median of CUDA-event timed
runs after a warm-up, tcfa against plain torch on the same device and inputs. Exit status 1 if a
check fails.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

# fp32 tolerances follow the policy: IEEE kernels agree with the C++ op to fp32 rounding; the
# stitch under TF32 (when torch allows it) to its measured 3e-4..5e-4, with a margin.
TOL = {torch.float64: 1e-9, "ieee": 1e-4, "tf32": 2e-3}


def relative_error(got, want) -> float:
    got, want = got.detach().cpu().double(), want.detach().cpu().double()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1.0)) if want.numel() else 0.0


# ------------------------------------------------------------------ checks: launcher vs C++ op
def normalised(log_w, offsets):
    """log weights normalised to mass 1 within each problem."""
    index = torch.repeat_interleave(torch.arange(offsets.numel() - 1), offsets.diff())
    mass = torch.zeros(offsets.numel() - 1, dtype=log_w.dtype).index_add_(0, index, log_w.exp())
    return log_w - mass.log()[index]


def ot_checks(dev, dtype, n, m, d):
    from tcfa.kernels import barycentric, softmin

    x, y = torch.randn(n, d, dtype=dtype), torch.randn(m, d, dtype=dtype) + 0.5
    xo, yo = torch.tensor([0, n // 3, n]), torch.tensor([0, m // 2, m])
    h, log_b = torch.randn(m, dtype=dtype), torch.rand(m, dtype=dtype).log()
    values = torch.randn(m, 5, dtype=dtype)
    D = lambda *ts: [t.to(dev) for t in ts]  # noqa: E731
    yield "softmin", softmin.softmin_forward(*D(x, y), xo, yo, *D(h, log_b), 0.3), \
        torch.ops.tcfa.softmin(x, y, xo, yo, h, log_b, 0.3, "sqeuclidean")
    yield "cost", softmin.cost_forward(*D(x, y), xo, yo, "sqeuclidean"), torch.ops.tcfa.cost(x, y, xo, yo, "sqeuclidean")
    yield "barycentric", barycentric.barycentric_forward(*D(x, y), xo, yo, *D(h, log_b, values), 0.3), \
        torch.ops.tcfa.barycentric(x, y, xo, yo, h, log_b, values, 0.3, "sqeuclidean")
    cost = torch.ops.tcfa.cost(x, y, xo, yo, "sqeuclidean").to(dtype)
    log_a = torch.rand(n, dtype=dtype).log()
    for dim, hh in ((1, h), (0, torch.randn(n, dtype=dtype))):
        yield f"softmin_dense dim={dim}", softmin.softmin_dense_forward(*D(cost), xo, yo, *D(log_a, log_b, hh), 0.3, dim), \
            torch.ops.tcfa.softmin_dense(cost, xo, yo, log_a, log_b, hh, 0.3, dim)
    f0, g0 = torch.zeros(n, dtype=dtype), torch.zeros(m, dtype=dtype)
    la, lb = normalised(log_a, xo), normalised(log_b, yo)  # balanced problems: equal mass per problem
    got = softmin.sinkhorn_dense_forward(*D(cost), xo, yo, *D(la, lb, f0, g0), 0.3, 50, 0.0)
    want = torch.ops.tcfa.sinkhorn_dense(cost, xo, yo, la, lb, f0, g0, 0.3, 50, 0.0)
    yield "sinkhorn_dense (f)", got[0], want[0]


def moments_checks(dev, dtype, n, dx, dy, C):
    from tcfa.kernels import segment_moments

    x, y, labels = torch.randn(n, dx, dtype=dtype) + 2, torch.randn(n, dy, dtype=dtype), torch.randint(0, C, (n,))
    got = segment_moments.segment_moments_forward(x.to(dev), y.to(dev), labels.to(dev), C)
    want = torch.ops.tcfa.segment_moments(x, y, labels, C)
    for name, g, w in zip(("mean_x", "sxx", "syy", "sxy"), (got[1], *got[3:]), (want[1], *want[3:])):
        yield f"segment_moments {name}", g, w


def stitch_checks(dev, dtype, N, dx, dy, C, r):
    from tcfa.kernels import gated_stitch, gated_stitch_backward

    args = (torch.randn(N, dx, dtype=dtype), torch.randn(dx, C, dtype=dtype) / dx**0.5, torch.randn(C, dtype=dtype),
            torch.randn(C, dx, r, dtype=dtype) / dx**0.5, torch.randn(C, r, dy, dtype=dtype) / r**0.5,
            0.3 * torch.randn(C, dx, dtype=dtype), torch.randn(C, dy, dtype=dtype))
    dout = torch.randn(N, dy, dtype=dtype)
    on_dev = [a.to(dev) for a in args]
    for k in (None, 2):
        got = gated_stitch.gated_stitch_forward(*on_dev, k, 0.7)
        want = torch.ops.tcfa.gated_stitch(*args, k, 0.7)
        yield f"gated_stitch top_k={k} out", got[0], want[0]
        yield f"gated_stitch top_k={k} gates", got[1], want[1]
        saved = [t.to(dev) for t in want[1:]]
        grads = gated_stitch_backward.gated_stitch_backward_forward(dout.to(dev), *on_dev, *saved, k, 0.7)
        want_grads = torch.ops.tcfa.gated_stitch_backward(dout, *args, *want[1:], k, 0.7)
        for name, g, w in zip(("dx", "dW", "db", "dU", "dV", "dmu_x", "dmu_y"), grads, want_grads):
            yield f"gated_stitch_backward top_k={k} {name}", g, w


def tolerance(name, dtype):
    from tcfa.kernels import _precision

    if dtype == torch.float64:
        return TOL[torch.float64]
    bulk_stitch = name.startswith("gated_stitch") and "gates" not in name
    return TOL[_precision.stitch(dtype)] if bulk_stitch else TOL["ieee"]


def run_checks(dev, quick):
    sizes = dict(ot=(70, 90, 5), moments=(300, 9, 7, 4), stitch=(40, 20, 12, 5, 3)) if quick else \
        dict(ot=(1500, 1300, 64), moments=(20000, 300, 200, 70), stitch=(2000, 256, 192, 70, 129))
    rows = []
    for dtype in (torch.float32, torch.float64):
        for checks in (ot_checks(dev, dtype, *sizes["ot"]), moments_checks(dev, dtype, *sizes["moments"]),
                       stitch_checks(dev, dtype, *sizes["stitch"])):
            for name, got, want in checks:
                err, tol = relative_error(got, want), tolerance(name, dtype)
                rows.append((name, str(dtype).removeprefix("torch."), err, tol, err <= tol))
    return rows


# ------------------------------------------------------------------ timings (cuda)
def cuda_ms(fn, repeat=7) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def torch_sinkhorn(x, y, eps, iters):
    """Log-domain Sinkhorn on the full (B, n, m) cost with torch.logsumexp: the plain-torch baseline."""
    C = torch.cdist(x, y) ** 2
    log_a = torch.full(x.shape[:2], -torch.log(torch.tensor(float(x.shape[1]))).item(), device=x.device)
    log_b = torch.full(y.shape[:2], -torch.log(torch.tensor(float(y.shape[1]))).item(), device=x.device)
    f, g = torch.zeros_like(log_a), torch.zeros_like(log_b)
    for _ in range(iters):
        g = -eps * torch.logsumexp(log_a[:, :, None] + (f[:, :, None] - C) / eps, dim=1)
        f = -eps * torch.logsumexp(log_b[:, None, :] + (g[:, None, :] - C) / eps, dim=2)
    return f, g


def run_timings(dev, quick=False):
    import tcfa

    rows = []
    B, n, d, iters = (2, 32, 8, 3) if quick else (64, 1024, 64, 100)
    x, y = torch.randn(B, n, d, device=dev), torch.randn(B, n, d, device=dev)
    for mode in ("dense", "online"):
        rows.append((f"sinkhorn {B} x {n}^2, d {d}, {iters} it, {mode}", cuda_ms(
            lambda: tcfa.sinkhorn(x, y, eps=0.1, max_iter=iters, tol=0.0, mode=mode)),
            cuda_ms(lambda: torch_sinkhorn(x, y, 0.1, iters))))
    N, dx, dy, C = (300, 12, 10, 4) if quick else (65536, 768, 768, 64)
    xs, ys, labels = torch.randn(N, dx, device=dev), torch.randn(N, dy, device=dev), torch.randint(0, C, (N,), device=dev)

    def torch_moments():
        out = []
        for c in range(C):
            a, b = xs[labels == c], ys[labels == c]
            out.append((a - a.mean(0)).T @ (b - b.mean(0)))
        return out

    rows.append((f"segment_moments {N} rows {dx}x{dy} C {C}", cuda_ms(lambda: tcfa.segment_moments(xs, ys, labels, C)),
                 cuda_ms(torch_moments)))
    (N, dx, dy, C, r) = (50, 12, 10, 4, 3) if quick else (8192, 768, 768, 64, 32)
    stitch = tcfa.GatedMultiStitch(dx, dy, C, r).to(dev)
    xin = torch.randn(N, dx, device=dev)

    def torch_stitch():
        g = torch.softmax(xin @ stitch.gate_weight + stitch.gate_bias, dim=1)
        z = torch.einsum("nd,cdr->ncr", xin, stitch.U) - torch.einsum("cd,cdr->cr", stitch.mu_x, stitch.U)
        out = g @ stitch.mu_y + torch.einsum("ncr,cre->ne", g[:, :, None] * z, stitch.V)
        out.sum().backward()

    rows.append((f"gated_stitch fwd+bwd {N}, {dx}->{dy}, C {C}, r {r}", cuda_ms(lambda: stitch(xin).sum().backward()),
                 cuda_ms(torch_stitch)))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="small shapes (the CPU self-test)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: this script is for a GPU machine (--device cpu with TRITON_INTERPRET=1 tests "
              "the script itself)", file=sys.stderr)
        return 2
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("--device cpu runs the Triton kernels under the interpreter: set TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    import triton

    import tcfa  # noqa: F401  (registers the ops)

    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (Triton interpreter)"
    print(f"# tcfa GPU smoke: {name}, torch {torch.__version__}, triton {triton.__version__}")
    torch.manual_seed(0)
    checks = run_checks(args.device, args.quick)
    print("| check | dtype | max error / scale | tolerance | ok |\n|---|---|---|---|---|")
    for name, dtype, err, tol, ok in checks:
        print(f"| {name} | {dtype} | {err:.1e} | {tol:.0e} | {'yes' if ok else 'NO'} |")
    if args.device == "cuda":
        print("\n| timed (fp32) | tcfa ms | torch ms | torch / tcfa |\n|---|---|---|---|")
        for name, t_tcfa, t_torch in run_timings(args.device, args.quick):
            print(f"| {name} | {t_tcfa:.2f} | {t_torch:.2f} | {t_torch / t_tcfa:.1f}x |")
    else:
        print("\ntimings: skipped (interpreter)")
    failed = [c for c in checks if not c[4]]
    print(f"\n{len(checks) - len(failed)} of {len(checks)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
