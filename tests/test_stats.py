"""Moments op, accumulator and CKA against the independent references in tests/stats_reference.py."""
import numpy as np
import pytest
import torch

import tcfa
from stats_reference import MOMENT_TOL, assert_moments, cca_inputs, kornblith_cka, numpy_moments, sample_inputs
from tcfa import stats


# ------------------------------------------------------------------ moments
# widths inside one 64-row Gram panel of the C++ kernel, and over several with a ragged last one
@pytest.mark.usefixtures("cpu_level")
@pytest.mark.parametrize("dims", [(4, 7), (131, 70)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_moments_match_numpy_cov_per_segment(dtype, dims):
    x, y, labels, C = sample_inputs(dtype=dtype, dx=dims[0], dy=dims[1])
    m = tcfa.segment_moments(x, y, labels, C)
    assert_moments(m, numpy_moments(x, y, labels, C), dtype)
    assert m.valid.tolist() == [True, True, False, False, True]


def test_empty_and_single_row_segments():
    x, y, labels, C = sample_inputs()
    m = tcfa.segment_moments(x, y, labels, C)
    assert int(m.count[2]) == 0 and int(m.count[3]) == 1
    for k in ("mean_x", "mean_y", "sxx", "syy", "sxy"):
        assert not bool(getattr(m, k)[2].any()), k  # empty: zeros, not NaN
    assert torch.equal(m.mean_x[3], x[labels == 3][0])
    assert not bool(m.sxx[3].any()) and not bool(m.sxy[3].any())


def test_fp32_large_offset_stays_accurate():
    x, y, labels, C = sample_inputs(dtype=torch.float32, offset=1e4)
    m = tcfa.segment_moments(x, y, labels, C)
    ref = numpy_moments(x, y, labels, C)  # float64 on the same fp32 values
    assert_moments(m, ref, torch.float32)
    # the test can fail: the naive fp32 E[x^2] - E[x]^2 misses by far more than the tolerance
    xs, lab = x.numpy(), labels.numpy()
    naive = np.stack([xs[lab == c].T @ xs[lab == c] - np.outer(xs[lab == c].sum(0), xs[lab == c].mean(0))
                      for c in (0, 1, 4)])
    err = np.abs(naive - ref["sxx"][[0, 1, 4]]).max()
    assert err > 100 * MOMENT_TOL[torch.float32][0] * np.abs(ref["sxx"]).max()


def test_unsorted_labels_equal_sorted():
    x, y, labels, C = sample_inputs()
    order = torch.argsort(labels, stable=True)
    a = tcfa.segment_moments(x, y, labels, C)
    b = tcfa.segment_moments(x[order], y[order], labels[order], C)
    for k in ("count", "mean_x", "sxx", "syy", "sxy"):
        torch.testing.assert_close(getattr(a, k), getattr(b, k), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("dims", [(3, 2), (67, 130)])
def test_one_large_segment_split_across_threads(dims):
    # a single segment of many rows is split into row chunks whose partial sums are added
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2000, dims[0], generator=g, dtype=torch.float64) + 5
    y = torch.randn(2000, dims[1], generator=g, dtype=torch.float64)
    labels = torch.zeros(2000, dtype=torch.int64)
    assert_moments(tcfa.segment_moments(x, y, labels, 1), numpy_moments(x, y, labels, 1), torch.float64)


def test_selected_blocks_only():
    x, y, labels, C = sample_inputs()
    full = tcfa.segment_moments(x, y, labels, C)
    only = tcfa.segment_moments(x, y, labels, C, blocks=("xy",))
    assert only.sxx is None and only.syy is None
    torch.testing.assert_close(only.sxy, full.sxy, atol=0, rtol=0)
    raw = torch.ops.tcfa.segment_moments(x, y, labels, C, False, True, False)
    assert raw[3].shape == (C, 0, 0) and raw[5].shape == (C, 0, 0)
    with pytest.raises(ValueError, match="cca needs the moment blocks"):
        tcfa.cca(only, 1)


# ------------------------------------------------------------------ accumulator
@pytest.mark.parametrize("cuts", [(0, 114), (10, 50, 51, 90), (1, 2, 3, 100), (57,)])
def test_accumulator_any_split_equals_one_pass(cuts):
    x, y, labels, C = sample_inputs()
    one = tcfa.segment_moments(x, y, labels, C)
    bounds = [0, *cuts, x.shape[0]]
    parts = []
    for a, b in zip(bounds[:-1], bounds[1:]):  # one accumulator per part (some empty), then merged
        acc = tcfa.MomentAccumulator(C, x.shape[1], y.shape[1])
        mid = (a + b) // 2
        acc.update(x[a:mid], y[a:mid], labels[a:mid]).update(x[mid:b], y[mid:b], labels[mid:b])
        parts.append(acc)
    total = parts[-1]
    for p in parts[:-1]:
        total.merge(p)
    r = total.result()
    for k in ("count", "mean_x", "mean_y", "sxx", "syy", "sxy"):
        torch.testing.assert_close(getattr(r, k), getattr(one, k), atol=1e-10, rtol=1e-10, msg=k)


def test_accumulator_state_dict_roundtrip_and_blocks():
    x, y, labels, C = sample_inputs()
    acc = tcfa.MomentAccumulator(C, 4, 7, blocks=("xx", "xy")).update(x[:60], y[:60], labels[:60])
    fresh = tcfa.MomentAccumulator(C, 4, 7, blocks=("xy", "xx"))
    fresh.load_state_dict(acc.state_dict())
    fresh.update(x[60:], y[60:], labels[60:])
    r, one = fresh.result(), tcfa.segment_moments(x, y, labels, C)
    assert r.syy is None
    torch.testing.assert_close(r.sxy, one.sxy, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(r.sxx, one.sxx, atol=1e-10, rtol=1e-10)
    with pytest.raises(ValueError, match="num_segments, dx, dy, blocks"):
        tcfa.MomentAccumulator(C, 4, 7).load_state_dict(acc.state_dict())
    with pytest.raises(ValueError, match="num_segments, dx, dy, blocks"):
        tcfa.MomentAccumulator(C, 4, 7).merge(acc)


def test_accumulator_memory_budget_raises_before_allocating():
    # 1000 x (4000 + 4000)^2 fp64 = 512 GB: a real allocation would fail with RuntimeError, not this
    with pytest.raises(ValueError, match="memory_budget"):
        tcfa.MomentAccumulator(1000, 4000, 4000, memory_budget=2**30)
    need = tcfa.MomentAccumulator.state_bytes(3, 4, 5, ("xx", "yy", "xy"), torch.float64)
    assert need == 8 * 3 * (16 + 25 + 20 + 4 + 5) + 8 * 3
    tcfa.MomentAccumulator(3, 4, 5, memory_budget=need)  # exactly fits
    with pytest.raises(ValueError, match="memory_budget"):
        tcfa.MomentAccumulator(3, 4, 5, memory_budget=need - 1)
    tcfa.MomentAccumulator(3, 4, 5, blocks=("xy",), memory_budget=need // 2)  # fewer blocks fit


# ------------------------------------------------------------------ CKA
@pytest.mark.parametrize("debiased", [False, True])
def test_linear_cka_matches_kornblith(debiased):
    x, y, labels, C = cca_inputs(C=1, n=40)
    got = float(tcfa.linear_cka(x, y, debiased=debiased))
    assert got == pytest.approx(kornblith_cka(x.numpy(), y.numpy(), debiased), abs=1e-12)


def test_cka_invariances():
    x, y, _, _ = cca_inputs(C=1, n=50, dx=5, dy=6)
    base = float(tcfa.linear_cka(x, y))
    Q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    assert float(tcfa.linear_cka(x, y @ Q)) == pytest.approx(base, abs=1e-12)
    assert float(tcfa.linear_cka(3.7 * x, y)) == pytest.approx(base, abs=1e-12)
    A = torch.randn(6, 6, dtype=torch.float64) + 2 * torch.eye(6, dtype=torch.float64)  # invertible, not orthogonal
    assert abs(float(tcfa.linear_cka(x, y @ A)) - base) > 1e-3
    assert float(tcfa.rbf_cka(x, y @ Q)) == pytest.approx(float(tcfa.rbf_cka(x, y)), abs=1e-12)
    assert float(tcfa.rbf_cka(2.0 * x, y)) == pytest.approx(float(tcfa.rbf_cka(x, y)), abs=1e-12)


@pytest.mark.parametrize("n", [4, 5, 6])
def test_debiased_cka_never_nan(n):
    g = torch.Generator().manual_seed(n)
    for trial in range(50):
        x = torch.randn(n, 3, generator=g, dtype=torch.float64)
        y = torch.randn(n, 2, generator=g, dtype=torch.float64)
        assert bool(torch.isfinite(tcfa.linear_cka(x, y, debiased=True)))
    const = torch.ones(n, 3, dtype=torch.float64)
    assert float(tcfa.linear_cka(const, y, debiased=True)) == 0.0
    with pytest.raises(ValueError, match="at least 4 rows"):
        tcfa.linear_cka(x[:3], y[:3], debiased=True)


def test_cka_from_moments_equals_per_condition_cka():
    x, y, labels, C = cca_inputs()
    got = tcfa.cka_from_moments(tcfa.segment_moments(x, y, labels, C))
    ref = [kornblith_cka(x[labels == c].numpy(), y[labels == c].numpy()) for c in range(C)]
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-12)
    x, y, labels, C = sample_inputs()  # empty and single-row segments: 0, not NaN
    got = tcfa.cka_from_moments(tcfa.segment_moments(x, y, labels, C))
    assert got[2] == 0 and got[3] == 0 and bool(torch.isfinite(got).all())


def test_rbf_cka_matches_numpy_median_bandwidth():
    x, y, _, _ = cca_inputs(C=1, n=30)

    def gram(a):
        d2 = ((a[:, None] - a[None]) ** 2).sum(-1)
        med = np.median(np.sqrt(d2[np.triu_indices(len(a), 1)]))
        return np.exp(-d2 / (2 * med**2))

    K, L = gram(x.numpy()), gram(y.numpy())
    H = np.eye(30) - 1.0 / 30
    Kc, Lc = H @ K @ H, H @ L @ H
    ref = np.sum(Kc * Lc) / np.sqrt(np.sum(Kc * Kc) * np.sum(Lc * Lc))
    assert float(tcfa.rbf_cka(x, y)) == pytest.approx(ref, abs=1e-12)


# ------------------------------------------------------------------ op registration, Triton, errors
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_opcheck(dtype):
    x, y, labels, C = sample_inputs(dtype=dtype)
    torch.library.opcheck(torch.ops.tcfa.segment_moments, (x, y, labels, C))
    torch.library.opcheck(torch.ops.tcfa.segment_moments, (x, y, labels, C, True, False, True))


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_triton_kernel_equals_cpp_op(dtype):
    from tcfa.kernels import segment_moments as tk

    x, y, labels, C = sample_inputs(dtype=dtype, C=6, dx=5, dy=19)
    want = torch.ops.tcfa.segment_moments(x, y, labels, C)
    got = tk.segment_moments_forward(x, y, labels, C)
    atol, rtol = MOMENT_TOL[dtype]
    for name, g, w in zip(("count", "mean_x", "mean_y", "sxx", "syy", "sxy"), got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        scale = 1.0 if dtype == torch.float64 else max(float(w.abs().max()), 1.0)
        torch.testing.assert_close(g, w, atol=atol * scale, rtol=rtol, msg=name)
    got = tk.segment_moments_forward(x, y, labels, C, False, True, False)
    assert got[3].shape == (C, 0, 0) and got[5].shape == (C, 0, 0)
    torch.testing.assert_close(got[4], want[4], atol=atol * max(float(want[4].abs().max()), 1.0), rtol=rtol)


def test_bad_input_raises_named_errors():
    x, y, labels, C = sample_inputs()
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\), got 5"):
        tcfa.segment_moments(x, y, torch.where(labels == 4, 5, labels), C)
    with pytest.raises(ValueError, match="labels must lie"):  # the C++ op checks too
        torch.ops.tcfa.segment_moments(x, y, torch.where(labels == 4, -1, labels), C)
    with pytest.raises(ValueError, match="x and y must have the same number of rows"):
        tcfa.segment_moments(x, y[1:], labels, C)
    with pytest.raises(ValueError, match="x and y must have the same number of rows"):
        torch.ops.tcfa.segment_moments(x, y[1:], labels, C)
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="x must be finite"):
        tcfa.segment_moments(bad, y, labels, C)
    # checked through the segment means: every value, either dtype, names its index
    for name, value in (("x", float("inf")), ("y", -float("inf")), ("y", float("nan"))):
        for dt in (torch.float32, torch.float64):
            xb, yb = x.to(dt, copy=True), y.to(dt, copy=True)
            (xb if name == "x" else yb)[5, 2] = value
            with pytest.raises(ValueError, match=rf"{name} must be finite, found {value} at index \(5, 2\)"):
                tcfa.segment_moments(xb, yb, labels, C)
    with pytest.raises(ValueError, match="y must be finite"):
        tcfa.MomentAccumulator(C, 4, 7).update(x, y * float("inf"), labels)
    with pytest.raises(TypeError, match="labels must be int64"):
        tcfa.segment_moments(x, y, labels.int(), C)
    with pytest.raises(TypeError, match="y has dtype"):
        tcfa.segment_moments(x, y.float(), labels, C)
    with pytest.raises(ValueError, match="labels must have shape"):
        tcfa.segment_moments(x, y, labels[:-1], C)
    with pytest.raises(ValueError, match="blocks must be a non-empty subset"):
        tcfa.segment_moments(x, y, labels, C, blocks=("zz",))
    with pytest.raises(ValueError, match="x and y must have widths"):
        tcfa.MomentAccumulator(C, 5, 7).update(x, y, labels)
    assert stats.BLOCKS == ("xx", "yy", "xy")
