"""The alignment maps fitted from per-condition moments: CCA, ridge regression, Procrustes.

Batched over conditions: torch.linalg on (C, ., .) stacks of the moments of
tcfa.stats.segment_moments, with no Python loop over conditions.

Regularisation convention everywhere: Sigma + reg * (tr Sigma / d) * I, with
Sigma = S / (n - 1) the covariance from the centered co-moment sum S.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from . import ops
from .maps import LowRankMaps
from .ops import _validate
from .stats import BLOCKS, Moments, moments_of_checked


# ------------------------------------------------------------------ covariances
def _check_counts(m: Moments, least: int, what: str) -> None:
    small = (m.count < least).nonzero()
    if small.numel():
        c = int(small[0])
        raise ValueError(f"{what} needs count >= {least} in every condition; condition {c} has count "
                         f"{int(m.count[c])} (see Moments.valid)")


def _covariance(s: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    return s / (count.to(s.dtype) - 1)[:, None, None]


def _regularised(cov: torch.Tensor, reg: float) -> torch.Tensor:
    """Sigma + reg * (tr Sigma / d) * I, batched; adds to cov's diagonal in place and returns it."""
    diag = torch.diagonal(cov, dim1=-2, dim2=-1)
    diag.add_(reg * diag.sum(-1, keepdim=True) / cov.shape[-1])
    return cov


def _cholesky(name: str, a: torch.Tensor, first: int = 0, in_place: bool = False) -> torch.Tensor:
    """Batched Cholesky; ``first`` is the index of a's first condition (for the error).

    in_place: a (a scratch copy of the caller's) is overwritten by the factor.
    """
    info = torch.empty(a.shape[:-2], dtype=torch.int32, device=a.device)
    L, info = torch.linalg.cholesky_ex(a, out=(a, info)) if in_place else torch.linalg.cholesky_ex(a)
    if bool((info != 0).any()):
        c = int((info != 0).nonzero()[0]) + first
        raise ValueError(f"{name} of condition {c} is not positive definite; increase reg (unless the features do "
                         "not vary within the condition: reg scales with the covariance's trace, so a zero "
                         "covariance stays singular; drop or merge that condition)")
    return L


# ------------------------------------------------------------------ CCA
@dataclass
class CCA:
    wx: torch.Tensor  # (C, dx, k), wx^T Sigma_xx wx = I
    wy: torch.Tensor  # (C, dy, k), wy^T Sigma_yy wy = I
    rho: torch.Tensor  # (C, k), descending


def _top_singular(M: torch.Tensor, k: int):
    """Top-k singular triplets (P, s, Q) of a batch M (C, a, b) with a <= b.

    The top-k eigenvectors of the smaller Gram M M^T give P
    (ops.symmetric_top_eigh: only k of its vectors are computed); Q and s
    come from the QR of M^T P = Q diag(s), which keeps Q orthonormal even
    where s is ~0. Why not torch.linalg.svd: it is 4x slower on the cca
    benchmark's shape (tcfa.bench.cca, 32 x 256 x 384 fp32).
    """
    _, P = ops.symmetric_top_eigh(M @ M.mT, k)
    Q, R = torch.linalg.qr(M.mT @ P)
    s = torch.diagonal(R, dim1=-2, dim2=-1)
    sign = torch.where(s < 0, -1.0, 1.0).to(M.dtype)
    return P, s * sign, Q * sign[:, None, :]


def _whitened_cross(sxx, syy, sxy, reg: float, first: int = 0):
    """Cholesky factors Lx, Ly of the regularised co-moment sums S_xx, S_yy and M = Lx^-1 S_xy Ly^-T.

    CCA is invariant to one scale of all three blocks: the sums give the same
    M as the covariances (count - 1 times them), and factors sqrt(count - 1)
    times theirs, so the caller scales directions by sqrt(count - 1).
    Dividing every block by count - 1 first would cost a copy of every block.
    """
    Lx = _cholesky("Sigma_xx", _regularised(sxx.clone(), reg), first, in_place=True)
    Ly = _cholesky("Sigma_yy", _regularised(syy.clone(), reg), first, in_place=True)
    # Two right-side solves on contiguous operands: (Lx^-1 Sxy)^T = Syx Lx^-T, then M = (.)^T Ly^-T.
    # Left-side solves take twice as long (tcfa.bench.cca shape, one thread).
    A = torch.linalg.solve_triangular(Lx.mT, sxy.mT.contiguous(), upper=True, left=False)
    M = torch.linalg.solve_triangular(Ly.mT, A.mT.contiguous(), upper=True, left=False)
    return Lx, Ly, M


def _split_conditions(fn, C: int):
    """fn(lo, hi) on contiguous condition ranges spread over the threads, outputs concatenated along dim 0.

    torch's batched cholesky/eigh/triangular solves call LAPACK once per
    matrix, each call threaded inside; for 256-384 wide matrices those threads
    mostly wait at barriers. Giving each thread its own conditions and one
    LAPACK thread instead runs the 32 x 256 x 256 fp32 eigh of tcfa.bench.cca
    1.7x faster on two cores. The ranges are four per thread, taken
    by whichever thread is free: with one per thread, a core slowed by
    another tenant of the machine held the whole call back. An error raised
    for a condition range propagates (the lowest range first).
    """
    n = torch.get_num_threads()
    parts = max(1, min(4 * n, C)) if n > 1 else 1
    bounds = [C * i // parts for i in range(parts + 1)]

    def run(i):
        torch.set_num_threads(1)  # per thread: OpenMP's thread count is a per-thread setting
        return fn(bounds[i], bounds[i + 1])

    try:
        if parts == 1:
            outs = [run(0)]
        else:
            with ThreadPoolExecutor(n) as pool:
                outs = list(pool.map(run, range(parts)))
    finally:
        torch.set_num_threads(n)
    return tuple(torch.cat(t) for t in zip(*outs))


def cca(m: Moments, k: int, reg: float = 1e-4) -> CCA:
    """Canonical correlation analysis per condition, from the moments alone.

    With Sigma the regularised covariances (module docstring) and Cholesky
    factors Sigma_xx = Lx Lx^T, Sigma_yy = Ly Ly^T, the whitened cross
    covariance M = Lx^-1 Sigma_xy Ly^-T has singular triplets (p_i, rho_i, q_i);
    the canonical directions are wx = Lx^-T p, wy = Ly^-T q, so that
    wx^T Sigma_xx wx = I, wy^T Sigma_yy wy = I and wx^T Sigma_xy wy = diag(rho),
    rho descending. Requires k <= min(dx, dy, count - 1) in every condition.
    """
    if not isinstance(m, Moments):
        raise TypeError(f"m must be a tcfa Moments result, got {type(m).__name__}")
    m.require(BLOCKS, "cca")
    k = _validate.integer("k", k, lo=1)
    reg = _validate.nonnegative("reg", reg)
    limit = torch.clamp(m.count - 1, max=min(m.dx, m.dy))
    if bool((k > limit).any()):
        c = int((k > limit).nonzero()[0])
        raise ValueError(f"k={k} must be <= min(dx, dy, count - 1) = min({m.dx}, {m.dy}, {int(m.count[c]) - 1}) "
                         f"for condition {c}")

    def conditions(lo, hi):
        Lx, Ly, M = _whitened_cross(m.sxx[lo:hi], m.syy[lo:hi], m.sxy[lo:hi], reg, lo)
        if m.dx <= m.dy:
            P, rho, Q = _top_singular(M, k)
        else:
            Q, rho, P = _top_singular(M.mT, k)
        scale = (m.count[lo:hi].to(M.dtype) - 1).sqrt()[:, None, None]  # Lx, Ly factor the sums
        wx = torch.linalg.solve_triangular(Lx.mT, P, upper=True) * scale
        wy = torch.linalg.solve_triangular(Ly.mT, Q, upper=True) * scale
        return wx, wy, rho

    return CCA(*_split_conditions(conditions, m.count.shape[0]))


def cca_maps(m: Moments, k: int, reg: float = 1e-4) -> LowRankMaps:
    """TCFA's per-condition CCA map: least-squares of y on the k canonical variates of x,

        T_c(x) = mu_y[c] + (x - mu_x[c]) wx_c diag(rho_c) wy_c^T Sigma_yy_c,

    as LowRankMaps with U = wx diag(rho) (C, dx, k), V = wy^T Sigma_yy (C, k, dy)
    (Sigma_yy regularised, as in cca).
    """
    c = cca(m, k, reg)
    Syy = _regularised(_covariance(m.syy, m.count), reg)
    return LowRankMaps(c.wx * c.rho[:, None, :], c.wy.mT @ Syy, m.mean_x.to(c.wx.dtype), m.mean_y.to(c.wx.dtype))


# ------------------------------------------------------------------ ridge, Procrustes
def _identity_factor(B: torch.Tensor) -> tuple:
    """B (C, dx, dy) as U @ V with the identity on the narrower side (rank min(dx, dy))."""
    C, dx, dy = B.shape
    if dx <= dy:
        return torch.eye(dx, dtype=B.dtype, device=B.device).expand(C, dx, dx).clone(), B
    return B, torch.eye(dy, dtype=B.dtype, device=B.device).expand(C, dy, dy).clone()


def ridge_map(m: Moments, reg: float, rank: int | None = None) -> LowRankMaps:
    """Ridge regression of y on x per condition, optionally reduced-rank.

    B_c = (Sigma_xx + reg (tr Sigma_xx / dx) I)^-1 Sigma_xy,  T_c(x) = mu_y + (x - mu_x) B_c,

    i.e. least squares on the augmented system [Xc; sqrt(lam) I] B = [Yc; 0]
    with lam = reg (tr Sigma_xx / dx)(n - 1). With ``rank`` r, B is projected
    onto the top-r eigenvectors W of the fitted-value scatter B^T Sigma_xy
    (reduced-rank ridge): U = B W, V = W^T.
    """
    if not isinstance(m, Moments):
        raise TypeError(f"m must be a tcfa Moments result, got {type(m).__name__}")
    m.require(("xx", "xy"), "ridge_map")
    reg = _validate.nonnegative("reg", reg)
    _check_counts(m, 2, "ridge_map")
    Sxx = _regularised(_covariance(m.sxx, m.count), reg)
    Sxy = _covariance(m.sxy, m.count)
    B = torch.cholesky_solve(Sxy, _cholesky("Sigma_xx", Sxx))
    if rank is None:
        U, V = _identity_factor(B)
    else:
        rank = _validate.integer("rank", rank, lo=1)
        if rank > min(m.dx, m.dy):
            raise ValueError(f"rank must be <= min(dx, dy) = {min(m.dx, m.dy)}, got {rank}")
        G = B.mT @ Sxy
        _, W = torch.linalg.eigh((G + G.mT) / 2)
        W = W[..., -rank:].flip(-1)
        U, V = B @ W, W.mT
    return LowRankMaps(U, V, m.mean_x.to(B.dtype), m.mean_y.to(B.dtype))


def _select_rows(anchors, n: int, device) -> torch.Tensor:
    """Row indices from a bool mask (N,) or int64 indices."""
    if not isinstance(anchors, torch.Tensor):
        raise TypeError(f"anchors must be a torch.Tensor (bool mask or int64 indices), got {type(anchors).__name__}")
    if anchors.dtype == torch.bool:
        if anchors.shape != (n,):
            raise ValueError(f"anchors as a mask must have shape ({n},), got {tuple(anchors.shape)}")
        return anchors.nonzero().flatten().to(device)
    if anchors.dtype != torch.int64 or anchors.dim() != 1:
        raise TypeError(f"anchors must be a 1-D bool mask or int64 index tensor, got {anchors.dtype} "
                        f"shape {tuple(anchors.shape)}")
    if anchors.numel() and (int(anchors.min()) < 0 or int(anchors.max()) >= n):
        raise ValueError(f"anchors must index rows in [0, {n}), got values in [{int(anchors.min())}, "
                         f"{int(anchors.max())}]")
    return anchors.to(device)


def procrustes(x, y, labels=None, num_segments=None, *, anchors=None, center: bool = True) -> LowRankMaps:
    """Orthogonal map per condition: R_c = argmin_{R^T R = I} |(X - mu_x) R - (Y - mu_y)|_F.

    The narrower side is zero-padded to d = max(dx, dy); with the SVD
    Xc^T Yc = P S Q^T (dx x dy, thin) the padded solution restricted to the
    real coordinates is R = P Q^T, so T_c(x) = mu_y + (x - mu_x) R_c.
    ``anchors`` (bool mask or indices) selects the rows used to fit; with
    ``center=False`` the means are 0 and the rows are used as they are.
    Without labels all rows form one condition.
    """
    x, y = _validate.paired_rows(x, y)
    if labels is None:
        if num_segments not in (None, 1):
            raise ValueError(f"num_segments must be None or 1 when labels is None, got {num_segments}")
        num_segments = 1
        labels = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
    elif num_segments is None:
        raise ValueError("num_segments must be given with labels")
    num_segments = _validate.integer("num_segments", num_segments, lo=1)
    labels = _validate.labels("labels", labels, x.shape[0], num_segments)
    if anchors is not None:
        rows = _select_rows(anchors, x.shape[0], x.device)
        x, y, labels = x[rows], y[rows], labels[rows]
    _validate.same_device(x=x, labels=labels)
    m = moments_of_checked(x, y, labels, num_segments, ("xy",))  # validated above, values included
    _check_counts(m, 1, "procrustes")
    cross = m.sxy
    mu_x, mu_y = m.mean_x, m.mean_y
    if not center:
        n = m.count.to(cross.dtype)[:, None, None]
        cross = cross + n * mu_x[:, :, None] * mu_y[:, None, :]
        mu_x, mu_y = torch.zeros_like(mu_x), torch.zeros_like(mu_y)
    P, _, Qh = torch.linalg.svd(cross, full_matrices=False)
    U, V = _identity_factor(P @ Qh)
    return LowRankMaps(U, V, mu_x, mu_y)
