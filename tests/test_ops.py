"""torch.ops.tcfa softmin / softmin_dense / cost / barycentric against the naive reference."""
import pytest
import torch

import reference as ref
from tcfa import ops

# parity with the reference at every compiled CPU level (conftest.cpu_level)
pytestmark = pytest.mark.usefixtures("cpu_level")

# (dtype, atol, rtol): fp32 differs from the fp64 reference by the affine
# cost form's rounding (|x|^2 + |y|^2 - 2 x.y) and the polynomial exp (~1 ulp);
# fp16/bf16 are computed in fp32 and rounded once on output (half an ulp:
# 2^-11 relative for fp16, 2^-8 for bf16).
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-4, 2e-5), torch.float16: (2e-2, 2e-3),
       torch.bfloat16: (2e-2, 8e-3)}
SIZES = [  # (x rows per problem, y rows per problem): a 1-row problem, primes, one past a tile
    ([1, 19, 17], [17, 1, 35]),
    ([7], [11]),
    ([257, 13], [131, 600]),
]


def offsets(sizes):
    return torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], dtype=torch.int64)


def sample_inputs(device, dtype, d=5):
    """(x, y, x_offsets, y_offsets, h, log_b, eps) cases, incl. zero-weight rows (log_b = -inf)."""
    cases = []
    for nx, ny in SIZES:
        x = torch.randn(sum(nx), d, dtype=dtype, device=device)
        y = torch.randn(sum(ny), d, dtype=dtype, device=device) + 0.5
        h = torch.randn(sum(ny), dtype=dtype, device=device)
        log_b = torch.rand(sum(ny), dtype=dtype, device=device).log()
        if sum(ny) > 3:
            log_b[2] = -float("inf")
        cases.append((x, y, offsets(nx).to(device), offsets(ny).to(device), h, log_b, 0.3))
    return cases


def wide(t):
    return t.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["sqeuclidean", "cosine"])
def test_softmin_matches_reference(dtype, kind):
    atol, rtol = TOL[dtype]
    for x, y, xo, yo, h, log_b, eps in sample_inputs("cpu", dtype):
        out = ops.softmin(x, y, xo, yo, h, log_b, eps, kind)
        assert out.dtype == dtype
        want = ref.softmin(wide(x), wide(y), xo, yo, wide(h), wide(log_b), eps, kind)
        torch.testing.assert_close(wide(out), want, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["sqeuclidean", "cosine"])
def test_dense_softmin_both_dims(dtype, kind):
    atol, rtol = TOL[dtype]
    for x, y, xo, yo, h, log_b, eps in sample_inputs("cpu", dtype):
        C = ops.cost_matrix(x, y, xo, yo, kind)
        torch.testing.assert_close(wide(C), ref.cost_flat(wide(x), wide(y), xo, yo, kind), atol=atol * 10, rtol=rtol)
        log_a = torch.rand(x.shape[0], dtype=dtype).log()
        hx = torch.randn(x.shape[0], dtype=dtype)
        rows = ops.softmin_dense(C, xo, yo, log_a, log_b, h, eps, 1)
        torch.testing.assert_close(wide(rows), ref.softmin(wide(x), wide(y), xo, yo, wide(h), wide(log_b), eps, kind),
                                   atol=atol, rtol=rtol)
        cols = ops.softmin_dense(C, xo, yo, log_a, log_b, hx, eps, 0)  # the column half-step = swapped roles
        torch.testing.assert_close(wide(cols), ref.softmin(wide(y), wide(x), yo, xo, wide(hx), wide(log_a), eps, kind),
                                   atol=atol, rtol=rtol)


def test_dense_column_sweep_splits_large_problems():
    # 300 x rows are split into one chunk per thread and merged: same answer as one chunk.
    x, y = torch.randn(300, 4, dtype=torch.float64), torch.randn(70, 4, dtype=torch.float64)
    xo, yo = offsets([300]), offsets([70])
    C = ops.cost_matrix(x, y, xo, yo)
    la, lb, hx = torch.full((300,), -5.7, dtype=torch.float64), torch.zeros(70, dtype=torch.float64), torch.randn(300, dtype=torch.float64)
    want = ref.softmin(y, x, yo, xo, hx, la, 0.2)
    for threads in (1, 2):
        prev = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            got = ops.softmin_dense(C, xo, yo, la, lb, hx, 0.2, 0)
        finally:
            torch.set_num_threads(prev)
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dv", [1, 3, 70])
def test_barycentric_matches_reference(dtype, dv):
    atol, rtol = TOL[dtype]
    for kind in ("sqeuclidean", "cosine"):
        for x, y, xo, yo, g, log_b, eps in sample_inputs("cpu", dtype):
            v = torch.randn(y.shape[0], dv, dtype=dtype)
            out = ops.barycentric(x, y, xo, yo, g, log_b, v, eps, kind)
            want = ref.barycentric(wide(x), wide(y), xo, yo, wide(g), wide(log_b), wide(v), eps, kind)
            torch.testing.assert_close(wide(out), want, atol=atol, rtol=rtol)


def test_active_mask_skips_problems():
    x, y, xo, yo, h, log_b, eps = sample_inputs("cpu", torch.float64)[0]
    active = torch.tensor([True, False, True])
    out = ops.softmin(x, y, xo, yo, h, log_b, eps, "sqeuclidean", active)
    full = ops.softmin(x, y, xo, yo, h, log_b, eps, "sqeuclidean")
    assert torch.all(out[1:20] == 0)
    torch.testing.assert_close(out[:1], full[:1])
    torch.testing.assert_close(out[20:], full[20:])


def test_many_problems_in_one_call():
    # B = 257 problems of 1..5 rows: one launch, each equal to the reference.
    nx = [1 + k % 5 for k in range(257)]
    ny = [1 + (3 * k) % 4 for k in range(257)]
    x, y = torch.randn(sum(nx), 3, dtype=torch.float64), torch.randn(sum(ny), 3, dtype=torch.float64)
    h, lb = torch.randn(sum(ny), dtype=torch.float64), torch.zeros(sum(ny), dtype=torch.float64)
    out = ops.softmin(x, y, offsets(nx), offsets(ny), h, lb, 0.5)
    torch.testing.assert_close(out, ref.softmin(x, y, offsets(nx), offsets(ny), h, lb, 0.5), atol=1e-10, rtol=1e-10)


def test_large_magnitude_exponents_stay_finite():
    # eps tiny against the cost: exponents around -1e6 must not overflow or give NaN.
    x, y = torch.randn(40, 3) * 30, torch.randn(50, 3) * 30
    xo, yo = offsets([40]), offsets([50])
    out = ops.softmin(x, y, xo, yo, torch.zeros(50), torch.full((50,), -3.9), 1e-3)
    want = ref.softmin(x.double(), y.double(), xo, yo, torch.zeros(50, dtype=torch.float64),
                       torch.full((50,), -3.9, dtype=torch.float64), 1e-3)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), want, atol=2e-2, rtol=1e-4)


def _opcheck_cases():
    x, y, xo, yo, h, log_b, eps = sample_inputs("cpu", torch.float64)[0]
    C = ops.cost_matrix(x, y, xo, yo)
    la = torch.zeros(x.shape[0], dtype=torch.float64)
    v = torch.randn(y.shape[0], 2, dtype=torch.float64)
    return [
        (torch.ops.tcfa.softmin.default, (x, y, xo, yo, h, log_b, eps, "sqeuclidean", None)),
        (torch.ops.tcfa.softmin.default, (x, y, xo, yo, h, log_b, eps, "cosine", torch.tensor([True, False, True]))),
        (torch.ops.tcfa.softmin_dense.default, (C, xo, yo, la, log_b, h, eps, 1, None)),
        (torch.ops.tcfa.softmin_dense.default, (C, xo, yo, la, log_b, torch.randn(x.shape[0], dtype=torch.float64), eps, 0, None)),
        (torch.ops.tcfa.barycentric.default, (x, y, xo, yo, h, log_b, v, eps, "sqeuclidean")),
    ]


@pytest.mark.parametrize("case", range(5))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


def test_opcheck_cost_dynamic_shape():
    # the flat cost's length depends on the offsets' values: the fake kernel
    # returns an unbacked size
    x, y, xo, yo, *_ = sample_inputs("cpu", torch.float64)[0]
    torch.library.opcheck(torch.ops.tcfa.cost.default, (x, y, xo, yo, "sqeuclidean"))


@pytest.mark.parametrize("bad, match", [
    (dict(x_offsets=torch.tensor([0, 5, 3, 37])), "x_offsets must be non-decreasing"),
    (dict(x_offsets=torch.tensor([0, 1, 20, 36])), "x_offsets must end at the number of rows"),
    (dict(x_offsets=torch.tensor([1, 1, 20, 37])), "x_offsets must start at 0"),
    (dict(x_offsets=torch.tensor([0, 20, 37])), "same number of problems"),
    (dict(cost="manhattan"), "cost must be"),
    (dict(eps=0.0), "eps must be > 0"),
    (dict(h=torch.zeros(3, dtype=torch.float64)), "h must have shape"),
    (dict(y=torch.zeros(53, 4, dtype=torch.float64)), "same width"),
])
def test_direct_op_calls_are_bounds_checked(bad, match):
    x, y, xo, yo, h, log_b, eps = sample_inputs("cpu", torch.float64)[0]
    args = dict(x=x, y=y, x_offsets=xo, y_offsets=yo, h=h, log_b=log_b, eps=eps, cost="sqeuclidean")
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        ops.softmin(**args)


@pytest.mark.parametrize("name", ["softmin", "softmin_dense", "sinkhorn_dense", "cost", "barycentric", "segment_moments", "gated_stitch",
                                  "gated_stitch_backward"])
def test_triton_launchers_are_registered_for_cuda(name):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"tcfa::{name}", "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"tcfa::{name}", "CPU")


def test_failed_extension_load_says_how_to_build(monkeypatch):
    from tcfa.ops import _C_loader

    def broken(name):
        raise ImportError("undefined symbol: _ZN2at4_ops")

    monkeypatch.setattr(_C_loader.importlib, "import_module", broken)
    with pytest.raises(ImportError, match="make build") as info:
        _C_loader.load()
    assert "undefined symbol" in str(info.value)
