"""Every Triton kernel compiles for sm_90 within an H100's shared memory, at the benchmark shapes.

benchmarks/compile_check.py --quick (23 s here: 18 compiles of the 13 kernels, the block sizes
their launchers pick for the benchmark shapes) runs in a process without TRITON_INTERPRET, since
interpreted kernels cannot be compiled. The extremes (C 5000, rank 300, widths 4096, fp64, fp16)
take a few minutes: `make compile-check`, whose table is docs/kernel_compile.md.
"""
import os
import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "compile_check.py"


def test_every_kernel_compiles_for_sm90_and_fits():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    kernels = {line.split("`")[1] for line in proc.stdout.splitlines() if line.startswith("| `")}
    assert len(kernels) == 13, sorted(kernels)  # every @triton.jit kernel with a launcher
    assert "NO:" not in proc.stdout
