"""The Triton precision policy (tcfa/kernels/_precision.py): who picks TF32, and that emulation measures it."""
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl

from tcfa.kernels import _precision
from test_stitch import reference, sample_inputs


def round_tf32(t):
    """Host reference: nearest TF32 value, ties away from zero (benchmarks/precision_policy.py's)."""
    bits = t.float().view(torch.int32)
    return ((bits + 0x1000) & -8192).view(torch.float32)


@pytest.mark.parametrize("setting, expected", [
    ("", "ieee"),
    ("torch.backends.cuda.matmul.fp32_precision = 'tf32'", "tf32"),
    ("torch.backends.cuda.matmul.fp32_precision = 'ieee'", "ieee"),
    ("torch.set_float32_matmul_precision('high')", "tf32"),
    ("torch.backends.cuda.matmul.allow_tf32 = True", "tf32"),
])
def test_stitch_follows_torch_matmul_setting(setting, expected):
    """TF32 only when the user allowed it for torch's own fp32 matmuls; fp64 and the OT/gate dots never.

    Each setting runs in a fresh process: torch refuses to read a setting made through the other API."""
    code = ("import torch\n" + setting + "\nfrom tcfa.kernels import _precision as p\n"
            "print(p.stitch(torch.float32), p.stitch(torch.float64), p.ieee(torch.float32))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [expected, "ieee", "ieee"]


@triton.jit
def _mma_kernel(a_ptr, b_ptr, out_ptr, PRECISION: tl.constexpr):
    i = tl.arange(0, 16)
    a = tl.load(a_ptr + i[:, None] * 16 + i[None, :])
    b = tl.load(b_ptr + i[:, None] * 16 + i[None, :])
    tl.store(out_ptr + i[:, None] * 16 + i[None, :], _precision.mma(a, b, tl.zeros((16, 16), tl.float32), PRECISION))


@pytest.mark.interpreter
def test_emulated_tf32_dot_rounds_both_operands():
    a, b = torch.randn(16, 16), torch.randn(16, 16)
    a[0, 0] = 1.0 + 2.0**-11  # exactly halfway between two TF32 values: rounds away from zero
    out = torch.empty(16, 16)
    _mma_kernel[(1,)](a, b, out, PRECISION=_precision.EMULATED_TF32)
    want = round_tf32(a).double() @ round_tf32(b).double()
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    assert round_tf32(a)[0, 0] == 1.0 + 2.0**-10
    _mma_kernel[(1,)](a, b, out, PRECISION=_precision.IEEE)
    torch.testing.assert_close(out.double(), a.double() @ b.double(), atol=1e-5, rtol=1e-5)
    assert (round_tf32(a) != a).any()


@pytest.mark.interpreter
@pytest.mark.parametrize("top_k", [None, 2])
def test_stitch_under_tf32_keeps_ieee_gates(top_k):
    """Emulated TF32 moves the output by ~1e-4 (docs/precision.md), never the gates or the routing."""
    from tcfa.kernels.gated_stitch import gated_stitch_forward

    args64 = sample_inputs(shape=(70, 40, 33, 5, 16))
    args = [a.float() for a in args64]
    want = reference(*args64, top_k=top_k)
    exact = gated_stitch_forward(*args, top_k, 1.0)
    with _precision.emulate_tf32():
        tf32 = gated_stitch_forward(*args, top_k, 1.0)
    assert _precision.stitch(torch.float32) == _precision.IEEE  # the context is left
    scale = want.abs().max()
    err_exact = float((exact[0].double() - want).abs().max() / scale)
    err_tf32 = float((tf32[0].double() - want).abs().max() / scale)
    assert err_exact < 1e-6 and 1e-5 < err_tf32 < 2e-3, (err_exact, err_tf32)
    torch.testing.assert_close(tf32[1], exact[1], atol=0, rtol=0)  # the gates: IEEE dots either way
    assert torch.equal(tf32[2], exact[2])
