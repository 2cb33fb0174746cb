"""Compiles every Triton kernel of tcfa for an H100 (sm_90), on the CPU, at the block sizes its launcher picks.

    python benchmarks/compile_check.py [--quick] [--write]      (`make compile-check` writes the table)

The interpreter that runs the kernels in the tests never compiles them, so it cannot see a kernel
that fails to lower, or a tile that needs more shared memory than the GPU has. This script calls
every launcher on CPU tensors of the benchmark shapes and of extreme ones (many conditions, large
rank and widths, fp64) with the kernel launch replaced by a recorder: the recorded arguments,
block sizes (constexprs) and launch options are exactly the launcher's. Each distinct launch is
then compiled by triton.compile for GPUTarget("cuda", 90, 32) down to a cubin (triton's bundled
ptxas), its shared memory checked against the 227 KB an H100 block may use, and its registers and
spills read from `ptxas -v`. --write puts the table in docs/kernel_compile.md. Exit status 1 if a
kernel fails to compile or does not fit.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run without TRITON_INTERPRET: under the interpreter @triton.jit kernels cannot be compiled")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import tcfa  # noqa: E402,F401  (loads the ops the launchers validate against)
from tcfa.kernels import barycentric, gated_stitch, gated_stitch_backward, segment_moments, softmin  # noqa: E402

H100_SHARED = 227 * 1024  # bytes of shared memory one block may use on sm_90 (232,448)
TARGET = GPUTarget("cuda", 90, 32)
DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "kernel_compile.md"
TYPES = {torch.float32: "fp32", torch.float64: "fp64", torch.float16: "fp16", torch.bfloat16: "bf16",
         torch.int64: "i64", torch.int32: "i32", torch.bool: "i1", torch.uint8: "u8"}


# ------------------------------------------------------------------ recording launches
class Recorder:
    """Replaces JITFunction.run: records (kernel, args, kwargs) of every launch instead of running it."""

    def __init__(self):
        self.launches = []
        self.case = ""

    def __call__(self, fn, *args, grid, warmup, **kwargs):
        self.launches.append((self.case, fn, args, kwargs))
        for a in args:  # routed stitch: the host sorts the conditions the gate kernel "wrote"
            if isinstance(a, torch.Tensor) and a.dtype == torch.int64 and a.dim() == 2:
                a.zero_()


def signature_of(fn, args, kwargs):
    """(signature, constexprs, options) of one recorded launch, as triton.compile takes them."""
    kwargs = dict(kwargs)
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    bound = dict(zip(fn.arg_names, args)) | kwargs
    signature, constexprs = {}, {}
    for p in fn.params:
        value = bound[p.name] if p.name in bound else p.default
        if p.is_constexpr:
            signature[p.name], constexprs[p.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[p.name] = "*" + TYPES[value.dtype]
        elif isinstance(value, bool):
            signature[p.name] = "i1"
        elif isinstance(value, int):
            signature[p.name] = "i32" if -2**31 <= value < 2**31 else "i64"
        elif isinstance(value, float):
            signature[p.name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {p.name} of type {type(value).__name__}")
    return signature, constexprs, {"num_warps": 4, "num_stages": 3} | options


# ------------------------------------------------------------------ the launchers' cases
def ot_cases(dtype, n, m, d, quick):
    """softmin, softmin_dense (both dims), cost, barycentric on one n x m problem of width d."""
    x, y = torch.randn(n, d, dtype=dtype), torch.randn(m, d, dtype=dtype)
    xo, yo = torch.tensor([0, n]), torch.tensor([0, m])
    h, log_b = torch.zeros(m, dtype=dtype), torch.full((m,), -float(torch.log(torch.tensor(float(m)))), dtype=dtype)
    softmin.softmin_forward(x, y, xo, yo, h, log_b, 0.1)
    softmin.cost_forward(x, y, xo, yo, "sqeuclidean")
    barycentric.barycentric_forward(x, y, xo, yo, h, log_b, torch.randn(m, 3 if quick else 200, dtype=dtype), 0.1)
    cost = torch.rand(n * m, dtype=dtype)
    log_a = torch.zeros(n, dtype=dtype)
    for dim, hh in ((1, h), (0, torch.zeros(n, dtype=dtype))):
        softmin.softmin_dense_forward(cost, xo, yo, log_a, log_b, hh, 0.1, dim)


def moments_cases(dtype, n, dx, dy, C):
    x, y = torch.randn(n, dx, dtype=dtype), torch.randn(n, dy, dtype=dtype)
    segment_moments.segment_moments_forward(x, y, torch.arange(n) % C, C)


def stitch_cases(dtype, N, dx, dy, C, r, top_ks):
    args = (torch.randn(N, dx, dtype=dtype), torch.randn(dx, C, dtype=dtype), torch.zeros(C, dtype=dtype),
            torch.randn(C, dx, r, dtype=dtype), torch.randn(C, r, dy, dtype=dtype), torch.zeros(C, dx, dtype=dtype),
            torch.zeros(C, dy, dtype=dtype))
    dout = torch.randn(N, dy, dtype=dtype)
    for k in top_ks:
        _, gates, index, z = gated_stitch.gated_stitch_forward(*args, k, 1.0)
        gated_stitch_backward.gated_stitch_backward_forward(dout, *args, gates, index, z, k, 1.0)


def cases(quick: bool):
    """(name, thunk): the benchmark shapes, then the extremes."""
    f32, f64 = torch.float32, torch.float64
    out = [("OT 4096^2 d64 fp32 (benchmark)", lambda: ot_cases(f32, 4096, 4096, 64, quick)),
           ("moments 8192 rows 768x768 C64 fp32", lambda: moments_cases(f32, 8192, 768, 768, 64)),
           ("stitch N8192 768->768 C64 r32 fp32 (benchmark)", lambda: stitch_cases(f32, 8192, 768, 768, 64, 32, (None, 2)))]
    if quick:
        return out
    return out + [
        ("OT 512^2 d4096 fp64", lambda: ot_cases(f64, 512, 512, 4096, quick)),
        ("OT 256^2 d3 fp16", lambda: ot_cases(torch.float16, 256, 256, 3, quick)),
        # the extremes one at a time (all at once would not fit in memory: U alone would be C dx r values)
        ("moments C5000 fp64", lambda: moments_cases(f64, 5000, 64, 48, 5000)),
        ("moments 4096x4096 fp64", lambda: moments_cases(f64, 64, 4096, 4096, 2)),
        ("stitch C5000 fp32", lambda: stitch_cases(f32, 64, 64, 64, 5000, 4, (None, 1, 8))),
        ("stitch r300 4096->4096 fp32", lambda: stitch_cases(f32, 64, 4096, 4096, 2, 300, (None, 1))),
        ("stitch C1025 r129 fp64", lambda: stitch_cases(f64, 64, 160, 160, 1025, 129, (None, 2, 64))),
        ("stitch C2 r3 dy1 fp32", lambda: stitch_cases(f32, 5, 7, 1, 2, 3, (None, 2))),
    ]


# ------------------------------------------------------------------ compiling
def ptxas_report(ptx: str) -> tuple[int, int]:
    """(registers, spill bytes stored + loaded) of the kernel, from `ptxas -v` on its PTX."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        pathlib.Path(src).write_text(ptx)
        res = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name", "sm_90a", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True)
    regs = int(re.search(r"Used (\d+) registers", res.stderr).group(1))
    spills = sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", res.stderr))
    return regs, spills


def compile_all(launches):
    """One row per distinct (kernel, signature, constexprs, options): compiled, measured, checked."""
    rows, seen = [], set()
    for case, fn, args, kwargs in launches:
        signature, constexprs, options = signature_of(fn, args, kwargs)
        key = (fn.__name__, tuple(signature.items()), tuple((k, str(v)) for k, v in constexprs.items()),
               tuple(options.items()))
        if key in seen:
            continue
        seen.add(key)
        row = dict(kernel=fn.__name__, case=case, dtype=next((t[1:] for t in signature.values() if t.startswith("*f")
                                                              or t.startswith("*bf")), ""),
                   blocks=", ".join(f"{k}={v}" for k, v in constexprs.items() if k != "LOWEST"),
                   **options)
        try:
            compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                      target=TARGET, options=options)
            row["shared"] = compiled.metadata.shared
            row["registers"], row["spills"] = ptxas_report(compiled.asm["ptx"])
            row["ok"] = row["shared"] <= H100_SHARED
            row["error"] = "" if row["ok"] else f"shared memory {row['shared']} B > {H100_SHARED} B"
        except Exception as err:  # a kernel that does not lower is the finding this script exists for
            row.update(shared=None, registers=None, spills=None, ok=False, error=f"{type(err).__name__}: {err}"[:300])
        rows.append(row)
    return rows


def table(rows) -> str:
    lines = ["| kernel | case | dtype | constexprs (block sizes, modes) | warps | stages | shared (B) | registers | spills (B) | fits |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r['kernel']}` | {r['case']} | {r['dtype']} | {r['blocks']} | {r['num_warps']} | "
                     f"{r['num_stages']} | {r['shared']} | {r['registers']} | {r['spills']} | "
                     f"{'yes' if r['ok'] else 'NO: ' + r['error']} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the benchmark shapes only")
    parser.add_argument("--write", action="store_true", help=f"write the table to {DOC}")
    args = parser.parse_args()
    start = time.perf_counter()
    recorder = Recorder()
    original, JITFunction.run = JITFunction.run, lambda fn, *a, **k: recorder(fn, *a, **k)
    try:
        for name, thunk in cases(args.quick):
            recorder.case = name
            thunk()
    finally:
        JITFunction.run = original
    rows = compile_all(recorder.launches)
    text = table(rows)
    print(text)
    kernels = {fn.__name__ for _, fn, _, _ in recorder.launches}
    seconds = time.perf_counter() - start
    print(f"{len(rows)} compiles of {len(kernels)} kernels for sm_90 in {seconds:.0f} s")
    if args.write:
        DOC.write_text(
            "# Triton kernels compiled for sm_90 (H100)\n\n"
            "Produced by `make compile-check` (benchmarks/compile_check.py) on a machine without a GPU: every\n"
            "launch the launchers make at these shapes, compiled by triton.compile for GPUTarget(\"cuda\", 90, 32)\n"
            f"down to a cubin; shared memory checked against {H100_SHARED} B per block; registers and spills\n"
            f"from `ptxas -v`. triton {triton.__version__}, "
            f"{subprocess.run([get_ptxas(90).path, '--version'], capture_output=True, text=True).stdout.split()[-1]}.\n\n"
            + text + "\n")
        print(f"wrote {DOC}")
    failed = [r for r in rows if not r["ok"]]
    for r in failed:
        print(f"FAILED {r['kernel']} ({r['case']}): {r['error']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
