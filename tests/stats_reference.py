"""NumPy float64 references and shared inputs for the statistics tests.

Textbook formulas (numpy.cov, the svcca recipe, Kornblith's Gram-matrix CKA), never tcfa itself.
"""
import numpy as np
import torch

# (dtype, atol, rtol) for the moments against a float64 reference of the same inputs; for fp32 the
# atol is relative to the largest entry of the block (fp32 GEMM rounding scales with it)
MOMENT_TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-6, 0.0)}


def sample_inputs(device="cpu", dtype=torch.float64, C=5, dx=4, dy=7, offset=0.0, seed=0):
    """Paired rows with unsorted labels; segment 2 is empty, segment 3 has a single row."""
    g = torch.Generator().manual_seed(seed)
    sizes = [37, 23, 0, 1, 53][:C] + [11] * max(0, C - 5)
    labels = torch.cat([torch.full((n,), c, dtype=torch.int64) for c, n in enumerate(sizes)])
    labels = labels[torch.randperm(labels.numel(), generator=g)]
    N = labels.numel()
    x = torch.randn(N, dx, generator=g, dtype=torch.float64) + offset
    mix = torch.randn(dx, dy, generator=g, dtype=torch.float64)
    y = 0.5 * (x - offset) @ mix + torch.randn(N, dy, generator=g, dtype=torch.float64) + offset
    # per-segment shifts and scales so segments really differ
    x = x * (1 + labels[:, None]) + 3 * labels[:, None]
    return x.to(device, dtype), y.to(device, dtype), labels.to(device), C


def numpy_moments(x, y, labels, C):
    """count, means and (n-1) * numpy.cov blocks per segment, float64."""
    x, y, labels = x.double().numpy(), y.double().numpy(), labels.numpy()
    dx, dy = x.shape[1], y.shape[1]
    out = {k: [] for k in ("count", "mean_x", "mean_y", "sxx", "syy", "sxy")}
    for c in range(C):
        xc, yc = x[labels == c], y[labels == c]
        n = len(xc)
        out["count"].append(n)
        out["mean_x"].append(xc.mean(0) if n else np.zeros(dx))
        out["mean_y"].append(yc.mean(0) if n else np.zeros(dy))
        if n >= 2:
            cov = np.cov(np.hstack([xc, yc]).T, ddof=1) * (n - 1)
        else:
            cov = np.zeros((dx + dy, dx + dy))
        out["sxx"].append(cov[:dx, :dx])
        out["syy"].append(cov[dx:, dx:])
        out["sxy"].append(cov[:dx, dx:])
    return {k: np.array(v) for k, v in out.items()}


def assert_moments(m, ref, dtype):
    atol, rtol = MOMENT_TOL[dtype]
    np.testing.assert_array_equal(m.count.numpy(), ref["count"])
    for k in ("mean_x", "mean_y", "sxx", "syy", "sxy"):
        got = getattr(m, k)
        assert got.dtype == dtype
        scale = 1.0 if dtype == torch.float64 else max(np.abs(ref[k]).max(), 1.0)
        np.testing.assert_allclose(got.double().numpy(), ref[k], atol=atol * scale, rtol=rtol, err_msg=k)


def cca_inputs(dtype=torch.float64, C=3, n=80, dx=5, dy=6, seed=3):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(C).repeat_interleave(n)
    labels = labels[torch.randperm(C * n, generator=g)]
    x = torch.randn(C * n, dx, generator=g, dtype=torch.float64) * torch.linspace(0.5, 3, dx, dtype=torch.float64)
    y = x @ torch.randn(dx, dy, generator=g, dtype=torch.float64) * 0.4 + torch.randn(C * n, dy, generator=g,
                                                                                     dtype=torch.float64)
    return x.to(dtype), y.to(dtype), labels, C


def numpy_cov_blocks(xc, yc, reg):
    """Covariances of one condition with the reg * (tr / d) * I convention."""
    dx = xc.shape[1]
    cov = np.cov(np.hstack([xc, yc]).T, ddof=1)
    sxx, syy, sxy = cov[:dx, :dx], cov[dx:, dx:], cov[:dx, dx:]
    sxx = sxx + reg * np.trace(sxx) / sxx.shape[0] * np.eye(sxx.shape[0])
    syy = syy + reg * np.trace(syy) / syy.shape[0] * np.eye(syy.shape[0])
    return sxx, syy, sxy


def svcca_rho(xc, yc, reg):
    """The svcca recipe in float64: covariances, reg, inverse square roots, SVD."""
    sxx, syy, sxy = numpy_cov_blocks(xc, yc, reg)

    def inv_sqrt(a):
        w, v = np.linalg.eigh(a)
        return (v / np.sqrt(w)) @ v.T

    return np.linalg.svd(inv_sqrt(sxx) @ sxy @ inv_sqrt(syy), compute_uv=False)




def kornblith_cka(x, y, debiased=False):
    """Gram-matrix CKA: HSIC of centered linear Grams; debiased with Song et al.'s unbiased HSIC."""
    K, L = x @ x.T, y @ y.T
    n = len(K)
    if not debiased:
        H = np.eye(n) - 1.0 / n
        hs = lambda a, b: np.sum((H @ a @ H) * (H @ b @ H))  # noqa: E731
    else:
        def hs(a, b):
            a, b = a - np.diag(np.diag(a)), b - np.diag(np.diag(b))
            one = np.ones(n)
            return (np.trace(a @ b) + one @ a @ one * (one @ b @ one) / ((n - 1) * (n - 2))
                    - 2.0 / (n - 2) * one @ a @ b @ one) / (n * (n - 3))
    return hs(K, L) / np.sqrt(hs(K, K) * hs(L, L))
