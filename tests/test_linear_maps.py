"""CCA, ridge and Procrustes maps against NumPy/SciPy float64 references (svcca recipe, lstsq,
scipy.linalg.orthogonal_procrustes), never tcfa itself."""
import numpy as np
import pytest
import scipy.linalg
import torch

import tcfa
from stats_reference import cca_inputs, numpy_cov_blocks, sample_inputs, svcca_rho


@pytest.mark.parametrize("dims", [(5, 6), (6, 4)])
def test_cca_rho_matches_numpy_svcca(dims):
    x, y, labels, C = cca_inputs(dx=dims[0], dy=dims[1])
    k, reg = 3, 1e-3
    c = tcfa.cca(tcfa.segment_moments(x, y, labels, C), k, reg)
    for cond in range(C):
        ref = svcca_rho(x[labels == cond].numpy(), y[labels == cond].numpy(), reg)[:k]
        np.testing.assert_allclose(c.rho[cond].numpy(), ref, atol=1e-6, rtol=0)
    assert bool((c.rho[:, :-1] >= c.rho[:, 1:]).all())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cca_whitening_identities(dtype):
    x, y, labels, C = cca_inputs(dtype=dtype)
    reg = 1e-2
    m = tcfa.segment_moments(x, y, labels, C)
    c = tcfa.cca(m, 4, reg)
    assert c.wx.shape == (C, 5, 4) and c.wy.shape == (C, 6, 4) and c.rho.shape == (C, 4)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    eye = torch.eye(4, dtype=torch.float64).expand(C, 4, 4)
    for cond in range(C):
        sxx, syy, sxy = numpy_cov_blocks(x[labels == cond].double().numpy(), y[labels == cond].double().numpy(), reg)
        wx, wy = c.wx[cond].double().numpy(), c.wy[cond].double().numpy()
        np.testing.assert_allclose(wx.T @ sxx @ wx, eye[cond], atol=tol)
        np.testing.assert_allclose(wy.T @ syy @ wy, eye[cond], atol=tol)
        np.testing.assert_allclose(wx.T @ sxy @ wy, np.diag(c.rho[cond].double().numpy()), atol=tol)


def test_cca_k_too_large_names_the_condition():
    x, y, labels, C = sample_inputs()  # segment 2 is empty
    with pytest.raises(ValueError, match=r"k=1 must be <= min\(dx, dy, count - 1\).*condition 2"):
        tcfa.cca(tcfa.segment_moments(x, y, labels, C), 1)
    x, y, labels, C = cca_inputs()
    with pytest.raises(ValueError, match="k=6"):
        tcfa.cca(tcfa.segment_moments(x, y, labels, C), 6)  # dx = 5


def test_cca_map_is_least_squares_on_canonical_variates():
    x, y, labels, C = cca_inputs()
    k = 3
    m = tcfa.segment_moments(x, y, labels, C)
    maps = tcfa.cca_maps(m, k, reg=0.0)
    assert isinstance(maps, tcfa.LowRankMaps) and maps.rank == k
    got = maps.apply(x, labels).numpy()
    c = tcfa.cca(m, k, reg=0.0)
    for cond in range(C):
        xc, yc = x[labels == cond].numpy(), y[labels == cond].numpy()
        u = (xc - xc.mean(0)) @ c.wx[cond].numpy()  # canonical variates of x
        coef, *_ = np.linalg.lstsq(u, yc - yc.mean(0), rcond=None)
        np.testing.assert_allclose(got[labels.numpy() == cond], yc.mean(0) + u @ coef, atol=1e-10)


# ------------------------------------------------------------------ ridge, Procrustes
def numpy_ridge(xc, yc, reg):
    """Ridge of centred Y on centred X as least squares on the augmented system [X; sqrt(lam) I] B = [Y; 0],
    lam = reg * (tr(Sigma_xx) / dx) * (n - 1). Returns X, the augmented matrix and B."""
    X, Y = xc - xc.mean(0), yc - yc.mean(0)
    n, dx = X.shape
    lam = reg * np.trace(X.T @ X / (n - 1)) / dx * (n - 1)
    A = np.vstack([X, np.sqrt(lam) * np.eye(dx)])
    B, *_ = np.linalg.lstsq(A, np.vstack([Y, np.zeros((dx, Y.shape[1]))]), rcond=None)
    return X, A, B


def test_ridge_matches_lstsq_on_augmented_system():
    x, y, labels, C = cca_inputs()
    reg = 0.3
    maps = tcfa.ridge_map(tcfa.segment_moments(x, y, labels, C), reg)
    got = maps.apply(x, labels).numpy()
    for cond in range(C):
        xc, yc = x[labels == cond].numpy(), y[labels == cond].numpy()
        X, A, B = numpy_ridge(xc, yc, reg)
        np.testing.assert_allclose(got[labels.numpy() == cond], yc.mean(0) + X @ B, atol=1e-10)
        np.testing.assert_allclose((maps.U[cond] @ maps.V[cond]).numpy(), B, atol=1e-10)


def test_reduced_rank_ridge_matches_numpy_recipe():
    x, y, labels, C = cca_inputs()
    reg, r = 0.3, 2
    maps = tcfa.ridge_map(tcfa.segment_moments(x, y, labels, C), reg, rank=r)
    assert maps.U.shape == (C, 5, r) and maps.V.shape == (C, r, 6)
    for cond in range(C):
        xc, yc = x[labels == cond].numpy(), y[labels == cond].numpy()
        X, A, B = numpy_ridge(xc, yc, reg)
        _, _, vt = np.linalg.svd(A @ B)  # principal directions of the augmented fitted values
        ref = B @ vt[:r].T @ vt[:r]
        np.testing.assert_allclose((maps.U[cond] @ maps.V[cond]).numpy(), ref, atol=1e-10)


@pytest.mark.parametrize("dims", [(4, 7), (7, 4), (5, 5)])
def test_procrustes_matches_scipy_with_zero_padding(dims):
    dx, dy = dims
    x, y, labels, C = cca_inputs(dx=dx, dy=dy)
    maps = tcfa.procrustes(x, y, labels, C)
    d = max(dx, dy)
    for cond in range(C):
        xc, yc = x[labels == cond].numpy(), y[labels == cond].numpy()
        X = np.zeros((len(xc), d))
        Y = np.zeros((len(yc), d))
        X[:, :dx], Y[:, :dy] = xc - xc.mean(0), yc - yc.mean(0)
        R, _ = scipy.linalg.orthogonal_procrustes(X, Y)
        np.testing.assert_allclose((maps.U[cond] @ maps.V[cond]).numpy(), R[:dx, :dy], atol=1e-10)


def test_procrustes_anchors_and_uncentered():
    x, y, labels, C = cca_inputs(dx=5, dy=5, C=1)
    anchors = torch.arange(0, 80, 3)
    maps = tcfa.procrustes(x, y, anchors=anchors, center=False)
    R, _ = scipy.linalg.orthogonal_procrustes(x[anchors].numpy(), y[anchors].numpy())
    np.testing.assert_allclose((maps.U[0] @ maps.V[0]).numpy(), R, atol=1e-10)
    np.testing.assert_allclose(maps.apply(x, labels).numpy(), x.numpy() @ R, atol=1e-10)
    mask = torch.zeros(80, dtype=torch.bool)
    mask[anchors] = True
    torch.testing.assert_close(tcfa.procrustes(x, y, anchors=mask, center=False).V, maps.V)



def test_bad_input_raises_named_errors():
    x, y, labels, C = sample_inputs()
    m = tcfa.segment_moments(*cca_inputs()[:3], 3)
    with pytest.raises(ValueError, match="reg must be >= 0"):
        tcfa.cca(m, 2, reg=-1.0)
    with pytest.raises(TypeError, match="k must be an int"):
        tcfa.cca(m, 2.0)
    with pytest.raises(ValueError, match="rank must be <= min"):
        tcfa.ridge_map(m, 0.1, rank=6)
    with pytest.raises(ValueError, match="ridge_map needs count >= 2 .* condition 2"):
        tcfa.ridge_map(tcfa.segment_moments(x, y, labels, C), 0.1)
    with pytest.raises(ValueError, match="procrustes needs count >= 1 .* condition 2"):
        tcfa.procrustes(x, y, labels, C)
    with pytest.raises(ValueError, match="anchors must index rows"):
        tcfa.procrustes(x, y, anchors=torch.tensor([0, 10**6]))
    with pytest.raises(ValueError, match="Sigma_xx of condition 0 is not positive definite"):
        xd = torch.cat([x[:, :1], x[:, :1]], 1)  # rank-deficient, reg = 0
        tcfa.cca(tcfa.segment_moments(xd, y, torch.zeros_like(labels), 1), 1, reg=0.0)
    # conditions are split over threads: the error still names the global index
    with pytest.raises(ValueError, match="Sigma_xx of condition 3 is not positive definite"):
        xd = torch.cat([x[:, :1], x[:, :1]], 1).repeat(4, 1)
        xd[: 3 * x.shape[0]] = torch.randn(3 * x.shape[0], 2, dtype=x.dtype)
        four = torch.arange(4).repeat_interleave(x.shape[0])
        tcfa.cca(tcfa.segment_moments(xd, y.repeat(4, 1), four, 4), 1, reg=0.0)


def test_apply_computes_in_the_wider_of_the_inputs_and_maps_dtypes():
    gen = torch.Generator().manual_seed(5)
    maps = tcfa.LowRankMaps(*(torch.randn(*s, generator=gen, dtype=torch.float64) for s in ((2, 4, 2), (2, 2, 3), (2, 4), (2, 3))))
    x, labels = torch.randn(6, 4, generator=gen, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1, 0])
    want = maps.apply(x, labels)
    for got in (maps.to(torch.float32).apply(x, labels), maps.apply(x.float(), labels)):  # fp64 either way
        assert got.dtype == torch.float64
    torch.testing.assert_close(maps.apply(x.float(), labels), want, atol=1e-6, rtol=0)
    torch.testing.assert_close(maps.to(torch.float32).apply(x, labels), want, atol=1e-5, rtol=0)
    assert maps.to(torch.float32).apply(x.float(), labels).dtype == torch.float32
