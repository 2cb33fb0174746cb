"""Shared benchmark plumbing: timing, machine info, the printed table and the JSON record.

Every bench_<op>.py times tcfa and its peers in the same run on the same
inputs, prints a table with ratios, and writes benchmarks/results/<op>.json.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def timeit(fn, *, repeat: int = 5, warmup: int = 1, min_time: float = 0.0) -> float:
    """Median wall time of fn() in seconds over `repeat` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < repeat or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def gemm_rate(n: int = 2048, dtype=torch.float32) -> float:
    """This machine's measured matmul rate in FLOP/s (the roofline's compute roof)."""
    a = torch.randn(n, n, dtype=dtype)
    t = timeit(lambda: a @ a, repeat=5)
    return 2 * n**3 / t


def machine() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
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


def write(name: str, rows: list[dict], extra: dict | None = None) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.json")
    with open(path + ".tmp", "w") as fh:
        json.dump({"benchmark": name, "machine": machine(), "rows": rows, **(extra or {})}, fh, indent=2)
    os.replace(path + ".tmp", path)
    return path
