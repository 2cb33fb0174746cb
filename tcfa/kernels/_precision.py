"""The precision policy of the Triton kernels' dot products, written once.

fp64 dots are always IEEE fp64. For fp32 inputs an H100 offers three modes:
"ieee" (exact fp32 products, CUDA cores), "tf32x3" (three TF32 products,
about fp32 accuracy) and "tf32" (inputs rounded to a 10-bit mantissa, ~8x the
IEEE throughput on tensor cores). Which kernel uses which, and why:

* OT kernels (softmin, softmin_dense, sinkhorn_dense, cost, barycentric):
  "ieee". Their dot is the x.y term of the cost, and the cost enters the
  kernel divided by eps: a TF32 cost error of ~1e-3 |x||y| becomes an error of
  1e-3 |x||y| / eps in the potentials (e.g. 0.2 for unit-norm points at
  eps = 0.005), which no Sinkhorn user would accept.
* segment_moments: "ieee". CCA whitens the co-moments; a TF32 relative error
  of ~1e-3 in them is amplified by the condition number of S_xx.
* gated_stitch gate logits: "ieee". Top-k routing and the softmax act on the
  logits; TF32 logits pick a different condition than the C++ op on near-ties.
* gated_stitch shrink/expand products and the whole backward: "tf32" when the
  user allows TF32 for fp32 matmuls in torch
  (torch.backends.cuda.matmul.fp32_precision = "tf32", or the legacy
  torch.set_float32_matmul_precision("high"): the settings that make nn.Linear
  use TF32), "ieee" otherwise (torch's default). These are the
  stitch's bulk FLOPs and a plain linear map, which is what nn.Linear under
  TF32 computes. Measured error of each mode: docs/precision.md
  (benchmarks/precision_policy.py, by emulation: operands rounded to TF32 in
  the kernel, then an exact dot).

The interpreter ignores input_precision (every fp32 dot is an exact numpy
matmul), so emulation is how the CPU measures what a GPU in TF32 computes:
inside :func:`emulate_tf32` the stitch kernels round both operands of every
bulk dot to TF32 (round to nearest, ties away from zero, as cvt.rna.tf32.f32
does) and then multiply exactly.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

IEEE = "ieee"
TF32 = "tf32"
EMULATED_TF32 = "tf32_emulated"  # a kernel-side mode of :func:`mma`, for measurement on the CPU
_override: str | None = None


def ieee(dtype: torch.dtype) -> str:
    """The OT, moments and gate-logit dots: IEEE for every dtype."""
    return IEEE


def stitch(dtype: torch.dtype) -> str:
    """The stitch's bulk dots: TF32 only for fp32 and only when torch's matmul setting allows it."""
    if dtype != torch.float32:
        return IEEE
    if _override is not None:
        return _override
    return TF32 if torch_allows_tf32() else IEEE


def torch_allows_tf32() -> bool:
    """Whether torch would run an fp32 CUDA matmul in TF32.

    torch has two APIs for this (fp32_precision, new; set_float32_matmul_precision / allow_tf32,
    legacy) and raises when one reads a setting made with the other, so each is asked in turn;
    anything unreadable counts as "not allowed" (IEEE, the accurate side).
    """
    for read in (lambda: torch.backends.cuda.matmul.fp32_precision, lambda: torch.backends.fp32_precision):
        try:
            value = read()
        except (AttributeError, RuntimeError):
            continue
        if value in ("tf32", "ieee"):
            return value == "tf32"
    try:
        return torch.get_float32_matmul_precision() != "highest"
    except RuntimeError:
        return False


@contextlib.contextmanager
def emulate_tf32():
    """Within the block the stitch kernels compute as a GPU in TF32 would (see the module docstring)."""
    global _override
    saved, _override = _override, EMULATED_TF32
    try:
        yield
    finally:
        _override = saved


@triton.jit
def _round_tf32(t):
    """fp32 -> the nearest TF32 value (10-bit mantissa), ties away from zero."""
    bits = t.to(tl.int32, bitcast=True)
    return ((bits + 0x1000) & -8192).to(tl.float32, bitcast=True)


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b with the policy's input precision (EMULATED_TF32: rounded operands, exact product)."""
    if PRECISION == "tf32_emulated":
        return tl.dot(_round_tf32(a), _round_tf32(b), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)
