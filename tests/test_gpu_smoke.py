"""benchmarks/gpu_smoke.py, the script a GPU owner runs, exercised here on the CPU.

Its checks run the Triton launchers under the interpreter (--device cpu --quick, ~18 s); its
timing section, which needs CUDA events, is run with a wall-clock stand-in so that every timed
call is at least executed once on tiny shapes.
"""
import os
import pathlib
import subprocess
import sys

import pytest

BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
pytestmark = pytest.mark.interpreter


def test_smoke_checks_every_op_on_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_smoke.py"), "--device", "cpu", "--quick"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for op in ("softmin", "cost", "barycentric", "softmin_dense dim=0", "softmin_dense dim=1", "sinkhorn_dense",
               "segment_moments sxy", "gated_stitch top_k=2 out", "gated_stitch_backward top_k=None dU"):
        assert f"| {op}" in proc.stdout, op
    assert "56 of 56 checks passed" in proc.stdout


def test_smoke_timings_run(monkeypatch):
    sys.path.insert(0, str(BENCH))
    try:
        import gpu_smoke
    finally:
        sys.path.remove(str(BENCH))
    calls = []
    monkeypatch.setattr(gpu_smoke, "cuda_ms", lambda fn: calls.append(fn()) or 1.0)
    rows = gpu_smoke.run_timings("cpu", quick=True)
    assert [r[0].split()[0] for r in rows] == ["sinkhorn", "sinkhorn", "segment_moments", "gated_stitch"]
    assert len(calls) == 2 * len(rows)


def test_smoke_without_a_gpu_says_so():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_smoke.py")], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr
