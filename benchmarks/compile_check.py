"""Compiles every Triton kernel of tcfa for an H100 (sm_90), on the CPU, exactly as its launcher would launch it.

    python benchmarks/compile_check.py [--quick] [--write]      (`make compile-check` writes the table)

The tests run the kernels under TRITON_INTERPRET=1, which never compiles them: a kernel that does
not lower, a tile that needs more shared memory than an H100 block has, or register spills show
only on a GPU. This script needs none. It calls the public launchers on CPU tensors with
JITFunction.run replaced by a recorder, so nothing is hard-coded about the kernels: each launch is
specialised by triton's own runtime binder for the CUDA backend (argument types, the constexprs
such as block sizes, the 16-divisibility of pointers and ints, num_warps/num_stages), which is
what `kernel[grid](...)` would hand to triton.compile on the GPU. Each distinct launch is then
compiled for GPUTarget("cuda", 90, 32) down to a cubin, its shared memory checked against the
227 KB one H100 block may use, and its registers and spills read from `ptxas -v`.

Cases: the benchmark shapes (tcfa.bench / benchmarks/gpu_smoke.py), then the extremes one at a
time (C 5000, rank 300, widths 4096, tiny widths), each in fp32 and fp64, the stitch's fp32 cases
again with torch's TF32 matmul setting (its kernels then use TF32 dots), and fp16 stored costs. --quick: the benchmark shapes
in fp32, one compile per kernel. --write: docs/kernel_compile.md. Exit status 1 if a launcher
raises, a kernel fails to compile or does not fit, or a kernel of tcfa/kernels is never launched.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import pkgutil
import math
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
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

import tcfa  # noqa: E402,F401  (registers the ops the launchers validate against)

TARGET = GPUTarget("cuda", 90, 32)
BACKEND = make_backend(TARGET)  # the CUDA backend, usable without a GPU or driver
H100_SHARED = 227 * 1024  # bytes of shared memory one block may use on sm_90 (232,448)
NEAR = 0.9  # a kernel above this share of H100_SHARED is flagged: one more stage or tile would not fit
ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "kernel_compile.md"
f32, f64, f16 = torch.float32, torch.float64, torch.float16
TYPE_NAMES = {f32: "fp32", f64: "fp64", f16: "fp16"}


# ------------------------------------------------------------------ recording launches
class Recorder:
    """Stands in for JITFunction.run: specialises each launch as the runtime would, runs nothing."""

    def __init__(self):
        self.launches = []  # dicts: case, fn, signature, constexprs, attrs, options
        self.case = ""
        self._binders = {}

    def __call__(self, fn, *args, grid, warmup, **kwargs):
        # The same two steps as JITFunction.run before it compiles (triton/runtime/jit.py): the binder
        # types every argument and marks 16-divisible pointers and ints ("tt.divisibility", which
        # decides vectorised loads and so registers and spills), _pack_args splits out the options.
        if fn not in self._binders:
            self._binders[fn] = create_function_from_signature(fn.signature, fn.params, BACKEND)
        bound, specialization, _ = self._binders[fn](*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(BACKEND, kwargs, bound, specialization, None)
        self.launches.append(dict(case=self.case, fn=fn, signature=signature, constexprs=constexprs, attrs=attrs,
                                  options=options))
        # The routed gate kernel's (N, k) int64 condition index is the only integer tensor a kernel
        # writes; unwritten (torch.empty garbage), the launcher's bincount/sort on it would fail.
        # Every other int64 argument is a 1-D table the kernels only read, and is left alone.
        for a in args:
            if isinstance(a, torch.Tensor) and a.dtype == torch.int64 and a.dim() == 2:
                a.zero_()


# ------------------------------------------------------------------ the launchers' cases
def ot_case(dtype, n, m, d, costs=("sqeuclidean",)):
    """softmin, cost, barycentric (values as wide as the points: a transport map), softmin_dense and
    sinkhorn_dense (one iteration: later ones would only repeat the launches) on one n x m problem."""
    from tcfa.kernels import barycentric, softmin
    ct = f32 if dtype == f16 else dtype  # fp16/bf16 points are computed in fp32; the stored cost stays fp16
    x, y = torch.randn(n, d, dtype=dtype), torch.randn(m, d, dtype=dtype)
    xo, yo = torch.tensor([0, n]), torch.tensor([0, m])
    log_a, log_b = torch.full((n,), -math.log(n), dtype=ct), torch.full((m,), -math.log(m), dtype=ct)
    f, g = torch.zeros(n, dtype=ct), torch.zeros(m, dtype=ct)
    softmin.softmin_forward(x, y, xo, yo, g, log_b, 0.1)
    barycentric.barycentric_forward(x, y, xo, yo, g, log_b, y, 0.1)
    for cost in costs:  # the cost kernel's GAMMA is a constexpr: one compile per cost
        softmin.cost_forward(x, y, xo, yo, cost)
    cost = torch.rand(n * m, dtype=dtype)
    softmin.softmin_dense_forward(cost, xo, yo, log_a, log_b, g, 0.1, 1)
    softmin.sinkhorn_dense_forward(cost, xo, yo, log_a, log_b, f, g, 0.1, 1)


def moments_case(dtype, n, dx, dy, C):
    from tcfa.kernels import segment_moments
    x, y = torch.randn(n, dx, dtype=dtype), torch.randn(n, dy, dtype=dtype)
    segment_moments.segment_moments_forward(x, y, torch.arange(n) % C, C)


def stitch_case(dtype, N, dx, dy, C, r, top_ks):
    """gated_stitch forward and backward, dense (top_k None) and routed, for each top_k."""
    from tcfa.kernels import gated_stitch, gated_stitch_backward
    params = (torch.randn(dx, C, dtype=dtype), torch.zeros(C, dtype=dtype), torch.randn(C, dx, r, dtype=dtype),
              torch.randn(C, r, dy, dtype=dtype), torch.zeros(C, dx, dtype=dtype), torch.zeros(C, dy, dtype=dtype))
    x, dout = torch.randn(N, dx, dtype=dtype), torch.randn(N, dy, dtype=dtype)
    for k in top_ks:
        _, gates, index, z = gated_stitch.gated_stitch_forward(x, *params, k, 1.0)
        gated_stitch_backward.gated_stitch_backward_forward(dout, x, *params, gates, index, z, k, 1.0)


@contextlib.contextmanager
def tf32_matmul():
    """torch's fp32 matmuls in TF32: then the fp32 stitch kernels take PRECISION=tf32 (kernels/_precision.py),
    tensor-core dots, a different compile from IEEE's."""
    previous = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.fp32_precision = previous


def with_tf32(run):
    def thunk():
        with tf32_matmul():
            run(f32)
    return thunk


def cases(quick: bool):
    """(name, thunk) pairs: the benchmark shapes, then (unless quick) the extremes, one at a time
    (all at once would not fit in memory: U alone holds C dx r values)."""
    bench = [("OT 4096^2 d64", lambda dt: ot_case(dt, 4096, 4096, 64)),
             ("moments N32768 256x384 C32", lambda dt: moments_case(dt, 32768, 256, 384, 32)),
             ("stitch N8192 768->768 C64 r32", lambda dt: stitch_case(dt, 8192, 768, 768, 64, 32, (None, 2)))]
    if quick:
        return [(f"{name} fp32", lambda run=run: run(f32)) for name, run in bench]
    extremes = [
        ("OT 256^2 d4096", lambda dt: ot_case(dt, 256, 256, 4096, ("sqeuclidean", "cosine"))),
        ("OT 100x37 d3", lambda dt: ot_case(dt, 100, 37, 3, ("sqeuclidean", "cosine"))),
        ("moments C5000", lambda dt: moments_case(dt, 10000, 64, 48, 5000)),
        ("moments 4096x4096", lambda dt: moments_case(dt, 64, 4096, 4096, 2)),
        ("moments 5x3", lambda dt: moments_case(dt, 10, 5, 3, 2)),
        ("stitch C5000", lambda dt: stitch_case(dt, 64, 64, 64, 5000, 4, (None, 1, 8))),
        ("stitch r300 4096->4096", lambda dt: stitch_case(dt, 64, 4096, 4096, 2, 300, (None, 1))),
        ("stitch C1025 r129 top-64", lambda dt: stitch_case(dt, 64, 160, 160, 1025, 129, (None, 64))),
        ("stitch C2 r3 7->1", lambda dt: stitch_case(dt, 5, 7, 1, 2, 3, (None, 2))),
    ]
    out = [(f"{name} {TYPE_NAMES[dt]}", lambda run=run, dt=dt: run(dt)) for name, run in bench + extremes
           for dt in (f32, f64)]
    out += [(f"{name} fp32 tf32", with_tf32(run)) for name, run in bench + extremes if name.startswith("stitch")]
    return out + [("OT 1024^2 d64 fp16", lambda: ot_case(f16, 1024, 1024, 64))]  # fp16 stored costs


def launched_kernels() -> set[str]:
    """Names of the @triton.jit kernels launched (`name[grid](...)`) in any module of tcfa/kernels."""
    import tcfa.kernels
    names = set()
    for info in pkgutil.iter_modules(tcfa.kernels.__path__):
        mod = importlib.import_module(f"tcfa.kernels.{info.name}")
        source = pathlib.Path(mod.__file__).read_text()
        names |= {name for name, obj in vars(mod).items()
                  if isinstance(obj, JITFunction) and re.search(rf"\b{name}\[", source)}
    return names


# ------------------------------------------------------------------ compiling
def ptxas_report(ptx: str) -> tuple[int, int, int]:
    """(registers, spill bytes stored, spill bytes loaded) per thread, from `ptxas -v` on the PTX."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        pathlib.Path(src).write_text(ptx)
        res = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name", "sm_90a", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True)
    regs = int(re.search(r"Used (\d+) registers", res.stderr).group(1))
    stores, loads = (int(v) for v in re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", res.stderr).groups())
    return regs, stores, loads


def describe(launch) -> dict:
    """A table row's fixed columns. Besides the declared constexprs, the runtime specialises plain
    arguments: ints equal to 1 become constants, ints and pointers divisible by 16 are marked so
    (vectorised loads); launches that differ only there are compiled separately and can differ in
    registers and spills, so the row lists them."""
    fn, signature, constexprs, attrs, options = (launch[k] for k in ("fn", "signature", "constexprs", "attrs",
                                                                       "options"))
    blocks, folded, div16, unaligned = [], [], [], []
    for p in fn.params:
        value = constexprs.get((p.num,))
        if p.is_constexpr:
            blocks.append(f"{p.name}={value:.3g}" if isinstance(value, float) else f"{p.name}={value}")
        elif signature[p.name] == "constexpr":
            folded.append(f"{p.name}={value}")
        elif signature[p.name].startswith("*") and not attrs.get((p.num,)):
            unaligned.append(p.name)
        elif signature[p.name] in ("i32", "i64", "u32", "u64") and attrs.get((p.num,)):  # sizes, strides
            div16.append(p.name)
    special = "; ".join(part for part in ("16-divisible: " + ", ".join(div16) if div16 else "", ", ".join(folded),
                                          "unaligned: " + ", ".join(unaligned) if unaligned else "") if part)
    floats = sorted({t[1:] for t in signature.values() if t.startswith(("*fp", "*bf"))})
    return dict(kernel=fn.__name__, case=launch["case"], dtype="+".join(floats), blocks=", ".join(blocks),
                special=special, num_warps=options.num_warps, num_stages=options.num_stages)


def compile_all(launches, quick: bool):
    """One row per distinct launch (quick: per kernel): compiled, measured, checked."""
    rows, seen = [], set()
    for launch in launches:
        fn = launch["fn"]
        key = fn.__name__ if quick else (fn.__name__, str(launch["signature"]), str(launch["constexprs"]),
                                         str(launch["attrs"]), str(launch["options"]))
        if key in seen:  # launchers repeat launches (slots, loops, both potentials): compile each once
            continue
        seen.add(key)
        row = describe(launch)
        try:
            src = ASTSource(fn=fn, signature=launch["signature"], constexprs=launch["constexprs"], attrs=launch["attrs"])
            compiled = triton.compile(src, target=TARGET, options=launch["options"].__dict__)
            row["shared"] = compiled.metadata.shared
            row["registers"], row["spill_stores"], row["spill_loads"] = ptxas_report(compiled.asm["ptx"])
            row["error"] = "" if row["shared"] <= H100_SHARED else f"shared memory {row['shared']} B > {H100_SHARED} B"
        except Exception as err:  # a kernel that does not lower is the finding this script exists for
            row["error"] = f"does not compile: {type(err).__name__}: {err}"[:400]
        rows.append(row)
    return rows


def status(row) -> str:
    if row["error"]:
        return "NO: " + row["error"].replace("|", "/").replace("\n", " ")
    return f"yes, near the limit ({row['shared'] / H100_SHARED:.0%})" if row["shared"] > NEAR * H100_SHARED else "yes"


def table(rows) -> str:
    lines = ["| kernel | case | dtype | constexprs (block sizes, modes) | int specialisation | warps | stages "
             "| shared (B) | registers | spills st/ld (B) | fits |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        spills = f"{r['spill_stores']}/{r['spill_loads']}" if "spill_stores" in r else "-"
        lines.append(f"| `{r['kernel']}` | {r['case']} | {r['dtype']} | {r['blocks']} | {r['special']} | {r['num_warps']} | "
                     f"{r['num_stages']} | {r.get('shared', '-')} | {r.get('registers', '-')} | {spills} | {status(r)} |")
    return "\n".join(lines)


def ptxas_version() -> str:
    out = subprocess.run([get_ptxas(90).path, "--version"], capture_output=True, text=True).stdout
    return next((line.split(", ", 1)[1] for line in out.splitlines() if "release" in line), out.strip())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the benchmark shapes in fp32, each kernel once")
    parser.add_argument("--write", action="store_true", help=f"write the table to {DOC.relative_to(ROOT)}")
    args = parser.parse_args()
    start = time.perf_counter()

    recorder, failures = Recorder(), []
    original, JITFunction.run = JITFunction.run, lambda fn, *a, **k: recorder(fn, *a, **k)
    try:
        for name, thunk in cases(args.quick):
            recorder.case = name
            try:
                thunk()
            except Exception as err:  # e.g. a kernel file being rewritten: report it, check the others
                failures.append(f"launcher raised in case '{name}': {type(err).__name__}: {err}")
    finally:
        JITFunction.run = original
    rows = compile_all(recorder.launches, args.quick)
    try:
        missing = launched_kernels() - {r["kernel"] for r in rows}
        failures += [f"{k}: never launched (its launcher raised, or no case calls it)" for k in sorted(missing)]
    except Exception as err:
        failures.append(f"could not list the kernels of tcfa/kernels: {type(err).__name__}: {err}")
    failures += [f"{r['kernel']} ({r['case']}): {r['error']}" for r in rows if r["error"]]

    text = table(rows)
    print(text)
    seconds = time.perf_counter() - start
    print(f"{len(rows)} compiles of {len({r['kernel'] for r in rows})} kernels for sm_90 in {seconds:.0f} s")
    if args.write:
        DOC.write_text(
            "# Triton kernels compiled for sm_90 (H100)\n\n"
            "Produced by `make compile-check` (benchmarks/compile_check.py --write) without a GPU: the launchers\n"
            "are called on CPU tensors with the kernel launch replaced by a recorder, and every distinct launch\n"
            "(argument types and 16-divisibility as triton's runtime specialises them, constexpr block sizes,\n"
            "num_warps, num_stages) is compiled by triton.compile for GPUTarget(\"cuda\", 90, 32) to a cubin.\n"
            f"Shared memory is checked against {H100_SHARED} B (227 KB) per block; registers and spill bytes per\n"
            "thread come from `ptxas -v`. Each row names the first case that produced the launch.\n"
            f"triton {triton.__version__}, ptxas (triton's) {ptxas_version()}.\n\n" + text + "\n")
        print(f"wrote {DOC}")
    for line in failures:
        print("FAILED", line, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
