"""Every op on a CUDA device, fed the CPU tests' own sample inputs, against the C++ op on the CPU.

Skipped without a GPU (there is none on the machine that builds tcfa). On a GPU machine run the
compiled kernels, not the interpreter:  TRITON_INTERPRET=0 python -m pytest -q tests/test_cuda.py
(`make test-cuda`). fp32 tolerances follow the precision policy (tcfa/kernels/_precision.py,
measured in docs/precision.md): IEEE kernels get the CPU tests' tolerances, the stitch under TF32
gets 4x the measured TF32 error. Benchmarks and a one-table check: benchmarks/gpu_smoke.py.
"""
import pytest
import torch

import test_ops
import test_sinkhorn_dense
import stats_reference
import test_stitch
from tcfa.kernels import _precision

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
DTYPES = [torch.float64, torch.float32]
TF32_STITCH = (2e-3, 2e-3)  # docs/precision.md: 3e-4 (forward) to 5e-4 (backward) relative, x4


def cuda(*tensors):
    return [t.cuda() if isinstance(t, torch.Tensor) else t for t in tensors]


def close(got, want, tol, msg=""):
    """got (on the GPU) against want (C++ on the CPU), (atol, rtol) scaled by want's largest entry."""
    atol, rtol = tol
    scale = max(float(want.abs().max()), 1.0) if want.is_floating_point() and want.numel() else 1.0
    torch.testing.assert_close(got.cpu(), want, atol=atol * scale, rtol=rtol, msg=msg)


def stitch_tol(dtype):
    if dtype == torch.float32 and _precision.stitch(dtype) == _precision.TF32:
        return TF32_STITCH
    return test_stitch.TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["sqeuclidean", "cosine"])
def test_softmin_cost_barycentric(dtype, kind):
    for x, y, xo, yo, h, log_b, eps in test_ops.sample_inputs("cpu", dtype):
        args = (x, y, xo, yo, h, log_b, eps, kind)
        close(torch.ops.tcfa.softmin(*cuda(*args)), torch.ops.tcfa.softmin(*args), test_ops.TOL[dtype])
        close(torch.ops.tcfa.cost(*cuda(x, y, xo, yo, kind)), torch.ops.tcfa.cost(x, y, xo, yo, kind),
              test_ops.TOL[dtype])
        values = torch.randn(y.shape[0], 3, dtype=dtype)
        log_b = log_b.clamp_min(-30)  # every problem keeps mass
        bary = (x, y, xo, yo, h, log_b, values, eps, kind)
        close(torch.ops.tcfa.barycentric(*cuda(*bary)), torch.ops.tcfa.barycentric(*bary), test_ops.TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmin_dense_and_sinkhorn_dense(dtype):
    C, xo, yo, la, lb, f, g = test_sinkhorn_dense.problem([1, 19, 40], [17, 1, 35], dtype)
    for dim, h in ((1, g), (0, f)):
        args = (C, xo, yo, la, lb, h, 0.3, dim)
        close(torch.ops.tcfa.softmin_dense(*cuda(*args)), torch.ops.tcfa.softmin_dense(*args), test_ops.TOL[dtype])
    args = (C, xo, yo, la, lb, f, g, 0.3, 200, 1e-7)
    got, want = torch.ops.tcfa.sinkhorn_dense(*cuda(*args)), torch.ops.tcfa.sinkhorn_dense(*args)
    for name, a, b in zip(("f", "g"), got[:2], want[:2]):
        close(a, b, test_sinkhorn_dense.TOL[dtype], name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_segment_moments(dtype):
    x, y, labels, C = stats_reference.sample_inputs(dtype=dtype, C=6, dx=5, dy=19)
    got = torch.ops.tcfa.segment_moments(*cuda(x, y, labels), C)
    want = torch.ops.tcfa.segment_moments(x, y, labels, C)
    for name, a, b in zip(("count", "mean_x", "mean_y", "sxx", "syy", "sxy"), got, want):
        close(a, b, stats_reference.MOMENT_TOL[dtype], name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", test_stitch.SHAPES + [(9, 20, 7, 2, 129), (6, 10, 5, 1025, 3)])
def test_gated_stitch_forward_and_backward(shape, dtype):
    args = test_stitch.sample_inputs(dtype=dtype, shape=shape)
    for top_k in (None, 1, min(2, shape[3])):
        got = torch.ops.tcfa.gated_stitch(*cuda(*args), top_k, 0.7)
        want = torch.ops.tcfa.gated_stitch(*args, top_k, 0.7)
        close(got[0], want[0], stitch_tol(dtype), f"out, top_k={top_k}")
        close(got[1], want[1], test_stitch.TOL[dtype], "gates (IEEE logits)")
        assert torch.equal(got[2].cpu(), want[2]), "routing"
        dout = torch.randn(shape[0], shape[2], dtype=dtype)
        g_got = torch.ops.tcfa.gated_stitch_backward(*cuda(dout, *args, *want[1:]), top_k, 0.7)
        g_want = torch.ops.tcfa.gated_stitch_backward(dout, *args, *want[1:], top_k, 0.7)
        for name, a, b in zip(test_stitch.ARGS, g_got, g_want):
            close(a, b, stitch_tol(dtype), f"d{name}, top_k={top_k}")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensors_on_a_non_current_device():
    """The launchers make the tensors' device current (Triton launches on the current one)."""
    args = test_stitch.sample_inputs(shape=test_stitch.SHAPES[0])
    with torch.cuda.device(0):
        got = torch.ops.tcfa.gated_stitch(*[t.to("cuda:1") for t in args], 2, 1.0)
    close(got[0], torch.ops.tcfa.gated_stitch(*args, 2, 1.0)[0], test_stitch.TOL[torch.float64])
