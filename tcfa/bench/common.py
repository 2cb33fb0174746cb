"""Shared benchmark plumbing: timing, machine info, the printed table and the JSON record.

Every benchmark module (tcfa.bench.<op>, run by `tcfa bench` or a checkout's
benchmarks/bench_<op>.py) times tcfa and its peers in the same run on the same
inputs, prints a table with ratios, and writes <results>/<op>.json.
"""
from __future__ import annotations

import ctypes
import json
import os
import platform
import re
import subprocess
import sys
import time

import torch

# Every README block (benchmark tables, bad inputs, the demo) is spliced by this one function.
from tcfa.cli.report import cpu_model, splice  # noqa: F401

RESULTS_ENV = "TCFA_BENCH_RESULTS"


def results_dir() -> str:
    """Where results/<op>.json go: $TCFA_BENCH_RESULTS, else the checkout's
    benchmarks/results when tcfa runs from a checkout, else ./tcfa-bench-results."""
    if os.environ.get(RESULTS_ENV):
        return os.environ[RESULTS_ENV]
    checkout = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                            "benchmarks", "results")
    return checkout if os.path.isdir(checkout) else os.path.abspath("tcfa-bench-results")

# TCFA_BENCH_QUICK=1: every N-sweep runs at toy sizes, to check the plumbing
# (fresh processes, JSON, plots, report) in seconds; its numbers mean nothing,
# and the JSON says so ("quick": true).
QUICK = os.environ.get("TCFA_BENCH_QUICK", "") not in ("", "0")


def timeit(fn, *, repeat: int = 5, warmup: int = 1, min_time: float = 0.0) -> float:
    """Minimum wall time of fn() in seconds over `repeat` runs after `warmup` runs.

    The minimum, as Python's timeit reports: on this shared 2-core VM other
    tenants only ever add time (the same call swung by 20-50 % from minute to
    minute, and the median of 3-5 runs with it), so the fastest run is the
    stable estimate of what the code itself costs. Every implementation, peers
    included, is timed by this function.
    """
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < repeat or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def gemm_rate(n: int = 2048, dtype=torch.float32) -> float:
    """This machine's measured matmul rate in FLOP/s (the roofline's compute roof)."""
    a = torch.randn(n, n, dtype=dtype)
    t = timeit(lambda: a @ a, repeat=5)
    return 2 * n**3 / t


def bandwidth(nbytes: int = 256 * 2**20) -> float:
    """This machine's measured memory bandwidth in bytes/s (the roofline's memory roof).

    A copy of a buffer far larger than the caches (L2 is 1 MB/core here) reads
    and writes every byte once: 2 * nbytes per copy, on all torch threads.
    """
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    t = timeit(lambda: dst.copy_(src), repeat=5)
    return 2 * nbytes / t


_ROOFS: dict | None = None


def roofs() -> dict:
    """Both roofs, measured once per process (about a second)."""
    global _ROOFS
    if _ROOFS is None:
        _ROOFS = {"gemm_flops": gemm_rate(), "bandwidth": bandwidth()}
    return _ROOFS


def reset_peak_rss() -> int:
    """Lowers VmHWM to what is live now and returns that resident size in bytes.

    Without the reset, memory touched and freed earlier (building the inputs)
    would hide a smaller peak of the work measured after it; without the trim,
    heap that malloc keeps after a free would stay resident and the work would
    reuse it unseen. Linux >= 4.0 and glibc; elsewhere the high-water mark
    stays and a difference from it is a lower bound.
    """
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass
    return peak_rss()


def peak_rss() -> int:
    """This process's resident-memory high-water mark in bytes (VmHWM).

    Not ru_maxrss: Linux carries that across execve, so a child started from
    a big benchmark process would inherit the parent's peak.
    """
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not in /proc/self/status")


def machine() -> dict:
    from tcfa import ops

    return {
        "cpu": cpu_model(),
        "cpu_level": ops.cpu_capability(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def table(rows: list[dict], columns: list[str]) -> str:
    """Plain-text table (markdown-compatible) of rows keyed by columns."""
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    out = [line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in cells]
    return "\n".join(out)


def write(name: str, rows: list[dict], extra: dict | None = None, *, measure_roofs: bool = True) -> str:
    """Writes results/<name>.json and prints the roofline line(s) of its table.

    The roofs (GEMM rate, bandwidth) are measured here, in the same run, unless
    the script passed its own in extra["roofs"]. An optional extra["sweep"]
    holds N-sweeps for the plots: a list of {"impl", "N", "seconds"[, "peak_mib"]}
    (run_sweep), and extra["sweep_axes"] what N and the time are
    ({"N": "rows", "time": "ms per call"}; plots.py falls back to "N" and "ms").
    """
    doc = {"benchmark": name, "machine": machine(), "rows": rows, **(extra or {})}
    if QUICK:
        doc["quick"] = True
    if measure_roofs and "roofs" not in doc:
        doc["roofs"] = roofs()
    if "roofline" not in doc:
        doc["roofline"] = roofline_lines(doc)
    for r in doc["roofline"]:
        print(roofline_text(r))
    os.makedirs(results_dir(), exist_ok=True)
    path = os.path.join(results_dir(), f"{name}.json")
    with open(path + ".tmp", "w") as fh:
        json.dump(doc, fh, indent=2)
    os.replace(path + ".tmp", path)
    return path


def sweep_point(impl: str, n: int, seconds: float, peak_mib: float | None = None) -> dict:
    """One point of an N-sweep (extra["sweep"] in write): plotted as time vs N and memory vs N."""
    point = {"impl": impl, "N": n, "seconds": seconds}
    if peak_mib is not None:
        point["peak_mib"] = peak_mib
    return point


# ------------------------------------------------------------------ N sweeps
# Every point of a sweep runs in a fresh process (`bench_x.py --sweep-point
# IMPL N`), so that its memory high-water mark is that one implementation's at
# that one size, with no allocator cache or lazy load of an earlier point in it.
# A benchmark declares its sweep as {impl: make}: make(n) builds the inputs of
# size n and returns the work, a callable that runs once when called without
# arguments; a timer (default: sweep_time) turns the work into seconds.

POINT_FLAG = "--sweep-point"


def sweep_sizes(full, quick) -> list[int]:
    """The N values of a sweep: the toy ones under TCFA_BENCH_QUICK=1."""
    return list(quick if QUICK else full)


def pick(full, quick):
    """full, or quick under TCFA_BENCH_QUICK=1: a case's size or repeat count."""
    return quick if QUICK else full


def sweep_time(fn) -> float:
    """A sweep point's seconds: the fastest of 3 runs after a warm-up (1 run under TCFA_BENCH_QUICK=1)."""
    return timeit(fn, repeat=1 if QUICK else 3)


def run_sweep(module: str, sizes: dict) -> list[dict]:
    """Sweep points of every impl at each of its N ({impl: [N, ...]}), each measured by
    `python -m module` in a fresh process.

    The impls are interleaved at each N, so a drift in machine load hits tcfa
    and its peers alike.
    """
    points = []
    for n in sorted({n for ns in sizes.values() for n in ns}):
        for impl in (i for i, ns in sizes.items() if n in ns):
            seconds, peak = _run_point(module, impl, n)
            points.append(sweep_point(impl, n, seconds, peak))
            print(f"sweep {impl} N={n}: {seconds * 1e3:.4g} ms, peak extra {peak:.0f} MiB", flush=True)
    return points


def _run_point(module: str, impl: str, n: int) -> tuple[float, float]:
    proc = subprocess.run([sys.executable, "-m", module, POINT_FLAG, impl, str(n)], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"sweep point {impl} N={n} of {module} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return out["seconds"], out["peak_mib"]


def sweep_child(makers: dict, warm_n: int, timer=sweep_time) -> bool:
    """In a process run_sweep started: measures its one point, prints it as JSON, returns True.

    Any other invocation returns False (the module then runs its benchmark).
    """
    if len(sys.argv) != 4 or sys.argv[1] != POINT_FLAG:
        return False
    impl, n = sys.argv[2], int(sys.argv[3])
    seconds, peak = measure_point(makers[impl], n, warm_n, timer)
    print(json.dumps({"seconds": seconds, "peak_mib": peak}))
    return True


def measure_point(make, n: int, warm_n: int, timer=sweep_time) -> tuple[float, float]:
    """(seconds, peak MiB beyond the inputs) of make(n)'s work.

    One run at the small size warm_n first loads what loads lazily (kernels,
    BLAS and thread pools), so that the memory counted is the work's own:
    its workspace and outputs. The peak is the smaller of the timed runs' and
    one more run's: like time, the resident high-water mark only ever reads
    high (once in a full test-suite process on an AMD EPYC it read the 128 MiB
    that the inputs' construction had freed before the reset, for a 64 MiB
    work; alone the same test read 64 every time).
    """
    make(warm_n)()
    work = make(n)
    base = reset_peak_rss()
    seconds = timer(work)
    peak = peak_rss() - base
    base = reset_peak_rss()
    work()
    peak = min(peak, peak_rss() - base)
    return seconds, max(peak, 0) / 2**20


# ------------------------------------------------------------------ roofline
# What each benchmark's tcfa rows compute and move, from the shapes in its JSON.
# FLOPs count multiply-adds as 2 and each exp as 1; bytes are the compulsory
# traffic (every input read once, every output written once), so the memory
# fraction is an upper bound on how well the kernel could do, not a cache model.
# A model returns (label, flops, bytes, seconds) per row it understands.

F32 = 4
# Per cost entry and iteration of the fused dense Sinkhorn (csrc/cpu/sinkhorn_dense.cpp):
# the exponent's multiply-add, the exp, the row-sum add and the column-sum multiply-add.
DENSE_FLOP_PER_ENTRY = 6


def _sinkhorn_model(doc):
    out = []
    for r in doc["rows"]:
        if not str(r.get("impl", "")).startswith("tcfa") or "ms" not in str(r.get("unit", "")):
            continue
        seconds = r["value"] / 1e3
        m = re.match(r"\w+ (?:online )?(\d+)\^2 d(\d+)", r["case"])
        if m:  # one Sinkhorn iteration = two half-steps on an n x n problem
            n, d = int(m[1]), int(m[2])
            if "online" in r["impl"]:  # cost recomputed: a GEMM per half-step, only the rows move
                out.append((f"{r['case']} {r['impl']}", 2 * 2 * n * n * d, 2 * 2 * n * d * F32, seconds))
            elif "dense" in r["impl"]:  # the fused loop: one pass over the stored cost per iteration
                out.append((f"{r['case']} {r['impl']}", DENSE_FLOP_PER_ENTRY * n * n, n * n * F32, seconds))
        m = re.match(r"C (\d+) x (\d+)\^2 d(\d+), (\d+) it", r["case"])
        if m:  # the cost GEMMs once, then `it` fused dense iterations on B stored costs
            B, n, d, it = (int(g) for g in m.groups())
            flops = B * 2 * n * n * d + it * DENSE_FLOP_PER_ENTRY * B * n * n
            # memory: the rows, the costs written once and read once; a 256 KB
            # cost stays in L2 for all of its problem's iterations (kResidentBytes)
            nbytes = B * 2 * n * d * F32 + 2 * B * n * n * F32
            out.append((f"{r['case']} {r['impl']}", flops, nbytes, seconds))
    return out


def _stitch_model(doc):
    s, out = doc.get("shape"), []
    if not s:
        return out
    N, dx, dy, C, r = s["N"], s["dx"], s["dy"], s["C"], s["r"]
    weights = (dx * C + C + C * r * (dx + dy) + C * (dx + dy)) * F32
    for row in doc["rows"]:
        impl = row.get("impl", "")
        if not impl.startswith("tcfa") or "forward ms" not in row:
            continue
        k = C if "dense" in impl else int(re.search(r"top-(\d+)", impl)[1])
        flops = 2 * N * dx * C + 2 * N * k * r * (dx + dy)  # gate logits + k shrink/expand maps
        out.append((f"{impl} forward", flops, (N * (dx + dy)) * F32 + weights, row["forward ms"] / 1e3))
    return out


def _cca_model(doc):
    s, out = doc.get("shape"), []
    if not s:
        return out
    n, C, dx, dy = s["C"] * s["n"], s["C"], s["dx"], s["dy"]
    for row in doc["rows"]:
        if row.get("method") == "tcfa.segment_moments (fp32)":
            # the math of the three co-moment blocks (the kernel computes the two
            # symmetric ones as upper panels only, so it executes fewer)
            flops = 2 * n * (dx * dx + dy * dy + dx * dy)
            nbytes = n * (dx + dy) * F32 + n * 8 + C * (dx * dx + dy * dy + dx * dy + dx + dy) * F32
            out.append((row["method"], flops, nbytes, row["seconds"]))
    return out


MODELS = {"sinkhorn": _sinkhorn_model, "stitch": _stitch_model, "cca": _cca_model}


def roofline_lines(doc: dict) -> list[dict]:
    """The roofline record of every tcfa row a model understands; fractions need doc["roofs"]."""
    model = MODELS.get(doc.get("benchmark"))
    rf = doc.get("roofs") or {}
    out = []
    for label, flops, nbytes, seconds in (model(doc) if model else []):
        rec = {"label": label, "flops": flops, "bytes": nbytes, "seconds": seconds,
               "flop_per_s": flops / seconds if seconds > 0 else float("nan"),
               "bytes_per_s": nbytes / seconds if seconds > 0 else float("nan")}
        if rf:
            rec["frac_gemm"] = rec["flop_per_s"] / rf["gemm_flops"]
            rec["frac_bandwidth"] = rec["bytes_per_s"] / rf["bandwidth"]
            # The roof that binds: time at the compute roof vs time at the memory roof.
            rec["bound"] = "compute" if flops / rf["gemm_flops"] >= nbytes / rf["bandwidth"] else "memory"
        out.append(rec)
    return out


def roofline_text(r: dict) -> str:
    head = (f"roofline {r['label']}: {r['flops'] / 1e9:.3g} GFLOP, {r['bytes'] / 1e6:.3g} MB in "
            f"{r['seconds'] * 1e3:.3g} ms = {r['flop_per_s'] / 1e9:.3g} GFLOP/s, {r['bytes_per_s'] / 1e9:.3g} GB/s")
    if "frac_gemm" not in r:
        return head + " (roofs not measured in this run)"
    return head + (f"; {r['frac_gemm']:.0%} of measured GEMM, {r['frac_bandwidth']:.0%} of measured "
                   f"bandwidth ({r['bound']}-bound)")

