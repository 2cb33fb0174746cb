"""Per-condition statistics and the alignment maps derived from them.

Everything here is batched over conditions: the moments come from one call of
torch.ops.tcfa.segment_moments (math in tcfa/ops.py), the maps and scores are
torch.linalg on (C, ., .) stacks, with no Python loop over conditions.

Regularisation convention everywhere: Sigma + reg * (tr Sigma / d) * I, with
Sigma = S / (n - 1) the covariance from the centered co-moment sum S.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from . import _validate, distributed, ops
from .maps import LowRankMaps

BLOCKS = _validate.MOMENT_BLOCKS


# ------------------------------------------------------------------ moments
@dataclass
class Moments:
    """Per-condition count, means and centered co-moment sums (see ops.segment_moments).

    A block that was not computed is None. Conditions with count < 2 have no
    covariance; ``valid`` marks the others.
    """

    count: torch.Tensor  # (C,) int64
    mean_x: torch.Tensor  # (C, dx)
    mean_y: torch.Tensor  # (C, dy)
    sxx: torch.Tensor | None  # (C, dx, dx)
    syy: torch.Tensor | None  # (C, dy, dy)
    sxy: torch.Tensor | None  # (C, dx, dy)

    @property
    def valid(self) -> torch.Tensor:
        return self.count >= 2

    @property
    def num_segments(self) -> int:
        return self.count.shape[0]

    @property
    def dx(self) -> int:
        return self.mean_x.shape[1]

    @property
    def dy(self) -> int:
        return self.mean_y.shape[1]

    def require(self, blocks, what: str) -> None:
        """Raises naming `what` when a needed block was not computed."""
        missing = [b for b in blocks if getattr(self, "s" + b) is None]
        if missing:
            raise ValueError(f"{what} needs the moment blocks {tuple(blocks)}, but {missing} were not computed")


def segment_moments(x, y, labels, num_segments: int, blocks=BLOCKS) -> Moments:
    """Moments of paired rows x (N, dx), y (N, dy) per label in [0, num_segments).

    Labels may be in any order; see tcfa.ops.segment_moments for the formulas.
    ``blocks`` selects which co-moment sums to compute ("xx", "yy", "xy").
    """
    x, y = _validate.paired_rows(x, y, finite=False)
    num_segments = _validate.integer("num_segments", num_segments, lo=1)
    labels = _validate.labels("labels", labels, x.shape[0], num_segments)
    _validate.same_device(x=x, labels=labels)
    blocks = _validate.blocks("blocks", blocks)
    m = _moments(x, y, labels, num_segments, blocks)
    # every row enters its segment's mean (accumulated in fp64): reading x and
    # y once more to check their values took 3 % of the moments here
    _validate.finite_through("x", x, m.mean_x)
    _validate.finite_through("y", y, m.mean_y)
    return m


def _moments(x, y, labels, num_segments, blocks) -> Moments:
    """segment_moments on already validated input."""
    out = ops.segment_moments(x, y, labels, num_segments, "xx" in blocks, "yy" in blocks, "xy" in blocks)
    count, mx, my, sxx, syy, sxy = out
    return Moments(count, mx, my, *(s if b in blocks else None for b, s in zip(BLOCKS, (sxx, syy, sxy))))


class MomentAccumulator:
    """Streams minibatches into per-condition moments; memory O(C (dx + dy)^2), not O(N).

    Batches are combined with the parallel formula of Chan et al.: for parts
    a, b with n = n_a + n_b and delta = mean_b - mean_a,

        mean = mean_a + delta * n_b / n,
        S    = S_a + S_b + delta_x delta_y^T * n_a n_b / n,

    so any split of the rows into updates and merges gives the one-pass
    result. Inputs are cast to ``dtype`` (default fp64) before the moments op.
    """

    def __init__(self, num_segments: int, dx: int, dy: int, blocks=BLOCKS, memory_budget=None,
                 dtype=torch.float64, device=None):
        self.num_segments = _validate.integer("num_segments", num_segments, lo=1)
        self.dx = _validate.integer("dx", dx, lo=1)
        self.dy = _validate.integer("dy", dy, lo=1)
        self.blocks = _validate.blocks("blocks", blocks)
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.dtype = dtype
        need = self.state_bytes(num_segments, dx, dy, self.blocks, dtype)
        if memory_budget is not None:
            budget = _validate.positive("memory_budget", memory_budget)
            if need > budget:
                raise ValueError(
                    f"MomentAccumulator state needs {need} bytes for num_segments={num_segments}, dx={dx}, "
                    f"dy={dy}, blocks={self.blocks}, dtype={dtype}, which exceeds memory_budget={int(budget)}; "
                    "keep fewer blocks, fewer conditions or use float32")
        C = num_segments
        z = dict(dtype=dtype, device=device)
        self.count = torch.zeros(C, dtype=torch.int64, device=device)
        self.mean_x = torch.zeros(C, dx, **z)
        self.mean_y = torch.zeros(C, dy, **z)
        shapes = {"xx": (C, dx, dx), "yy": (C, dy, dy), "xy": (C, dx, dy)}
        self.sums = {b: torch.zeros(shapes[b], **z) for b in self.blocks}

    @staticmethod
    def state_bytes(num_segments, dx, dy, blocks, dtype) -> int:
        """Bytes of the accumulator state: C (dx^2 + dy^2 + dx dy + dx + dy) for all blocks."""
        per = {"xx": dx * dx, "yy": dy * dy, "xy": dx * dy}
        elems = num_segments * (sum(per[b] for b in blocks) + dx + dy)
        return elems * torch.empty(0, dtype=dtype).element_size() + 8 * num_segments

    def update(self, x, y, labels) -> "MomentAccumulator":
        x, y = _validate.paired_rows(x, y)
        if x.shape[1] != self.dx or y.shape[1] != self.dy:
            raise ValueError(f"x and y must have widths ({self.dx}, {self.dy}), got ({x.shape[1]}, {y.shape[1]})")
        labels = _validate.labels("labels", labels, x.shape[0], self.num_segments)
        _validate.same_device(x=x, labels=labels, mean_x=self.mean_x)
        m = _moments(x.to(self.dtype), y.to(self.dtype), labels, self.num_segments, self.blocks)
        self._combine(m)
        return self

    def merge(self, other: "MomentAccumulator") -> "MomentAccumulator":
        """Adds another accumulator's rows (e.g. from another worker) into this one."""
        if not isinstance(other, MomentAccumulator):
            raise TypeError(f"other must be a MomentAccumulator, got {type(other).__name__}")
        mine = (self.num_segments, self.dx, self.dy, self.blocks)
        theirs = (other.num_segments, other.dx, other.dy, other.blocks)
        if mine != theirs:
            raise ValueError(f"other must have (num_segments, dx, dy, blocks) = {mine}, got {theirs}")
        self._combine(other.result())
        return self

    def all_reduce(self, group=None) -> "MomentAccumulator":
        """Merges every rank's accumulator into each, in place (a collective: every rank calls it).

        Exact: Chan's parallel formula over the ranks (tcfa/distributed.py).
        Afterwards every rank holds the moments of all ranks' rows. ``group``:
        a torch.distributed process group, None for the default one.
        """
        distributed.all_reduce_moments(self, group)
        return self

    def _combine(self, b: Moments) -> None:
        na, nb = self.count, b.count.to(self.count.device)
        n = na + nb
        nf = n.to(self.dtype).clamp_min(1)  # empty conditions stay all-zero
        frac_b = nb.to(self.dtype) / nf  # n_b / n
        w = na.to(self.dtype) * frac_b  # n_a n_b / n
        dx_ = b.mean_x.to(self.dtype) - self.mean_x
        dy_ = b.mean_y.to(self.dtype) - self.mean_y
        deltas = {"x": dx_, "y": dy_}
        for blk, s in self.sums.items():
            d1, d2 = deltas[blk[0]], deltas[blk[1]]
            s += getattr(b, "s" + blk).to(self.dtype) + w[:, None, None] * d1[:, :, None] * d2[:, None, :]
        self.mean_x += dx_ * frac_b[:, None]
        self.mean_y += dy_ * frac_b[:, None]
        self.count = n

    def result(self) -> Moments:
        s = {b: (self.sums[b].clone() if b in self.sums else None) for b in BLOCKS}
        return Moments(self.count.clone(), self.mean_x.clone(), self.mean_y.clone(), s["xx"], s["yy"], s["xy"])

    def state_dict(self) -> dict:
        return {"num_segments": self.num_segments, "dx": self.dx, "dy": self.dy, "blocks": list(self.blocks),
                "count": self.count.clone(), "mean_x": self.mean_x.clone(), "mean_y": self.mean_y.clone(),
                **{"s" + b: t.clone() for b, t in self.sums.items()}}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        mine = (self.num_segments, self.dx, self.dy, list(self.blocks))
        theirs = tuple(state.get(k) for k in ("num_segments", "dx", "dy", "blocks"))
        if mine != theirs:
            raise ValueError(f"state must have (num_segments, dx, dy, blocks) = {mine}, got {theirs}")
        self.count = state["count"].to(self.count.device).clone()
        self.mean_x = state["mean_x"].to(self.mean_x).clone()
        self.mean_y = state["mean_y"].to(self.mean_y).clone()
        self.sums = {b: state["s" + b].to(self.sums[b]).clone() for b in self.blocks}


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
        raise ValueError(f"{name} of condition {c} is not positive definite; increase reg")
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
    where s is ~0. Why not torch.linalg.svd: on the benchmark shape
    (32 x 256 x 384, fp32) the batched SVD took 2.0 s here against 0.5 s for
    this with a full eigh (shared machine).
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
    Dividing every block by count - 1 first, and factoring a copy of that,
    took 3-6 ms more of ~95 ms (32 x 256/384 fp32, one thread, interleaved).
    """
    Lx = _cholesky("Sigma_xx", _regularised(sxx.clone(), reg), first, in_place=True)
    Ly = _cholesky("Sigma_yy", _regularised(syy.clone(), reg), first, in_place=True)
    # Two right-side solves on contiguous operands: (Lx^-1 Sxy)^T = Syx Lx^-T, then M = (.)^T Ly^-T.
    # Left-side solves took twice as long here (63 vs 30 ms for 32 x 256 x 384, one thread).
    A = torch.linalg.solve_triangular(Lx.mT, sxy.mT.contiguous(), upper=True, left=False)
    M = torch.linalg.solve_triangular(Ly.mT, A.mT.contiguous(), upper=True, left=False)
    return Lx, Ly, M


def _split_conditions(fn, C: int):
    """fn(lo, hi) on contiguous condition ranges spread over the threads, outputs concatenated along dim 0.

    torch's batched cholesky/eigh/triangular solves call LAPACK once per
    matrix, each call threaded inside; for 256-384 wide matrices those threads
    mostly wait at barriers (32 x 256 x 256 fp32 eigh: 0.12-0.17 s on one
    thread, 0.5-0.9 s on two). Giving each thread its own conditions and one
    LAPACK thread instead ran the same eigh in 72-78 ms against 129-157 ms
    serially on this 2-core machine. The ranges are four per thread, taken
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
    m = segment_moments(x, y, labels, num_segments, blocks=("xy",))
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


# ------------------------------------------------------------------ CKA
def _ratio(num: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """num / sqrt(a b), defined as 0 where a representation has no spread (a or b <= 0)."""
    den = torch.sqrt(a.clamp_min(0) * b.clamp_min(0))
    return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), torch.zeros_like(num))


def linear_cka(x, y, debiased: bool = False) -> torch.Tensor:
    """Linear CKA of paired rows x (N, dx), y (N, dy) (Kornblith et al. 2019).

    With column-centered X, Y:  CKA = |Y^T X|_F^2 / (|X^T X|_F |Y^T Y|_F).
    ``debiased=True`` replaces each HSIC by the unbiased estimator of Song et
    al. (2012) (as in Nguyen et al. 2021); with K = X X^T, L = Y Y^T and their
    diagonals zeroed (K~, L~), n rows:

        HSIC_u(K, L) = [tr(K~ L~) + 1^T K~ 1 1^T L~ 1 / ((n-1)(n-2)) - 2/(n-2) 1^T K~ L~ 1] / (n (n-3)),

    evaluated in feature space (no N x N Gram). Needs N >= 4 (N >= 2 biased).
    A representation with no spread gives 0, never NaN.
    """
    x, y = _validate.paired_rows(x, y)
    n = x.shape[0]
    if n < (4 if debiased else 2):
        raise ValueError(f"x must have at least {4 if debiased else 2} rows for "
                         f"{'debiased' if debiased else 'biased'} CKA, got {n}")
    x = x - x.mean(0)
    y = y - y.mean(0)

    def hsic(a, b):
        cross = (a.mT @ b).square().sum()
        if not debiased:
            return cross
        ka, kb = a.square().sum(1), b.square().sum(1)  # Gram diagonals
        # centered rows: K~ 1 = -diag(K), 1^T K~ 1 = -tr(K)
        return (cross - (ka * kb).sum() + ka.sum() * kb.sum() / ((n - 1) * (n - 2))
                - 2.0 / (n - 2) * (ka * kb).sum()) / (n * (n - 3))

    return _ratio(hsic(x, y), hsic(x, x), hsic(y, y))


def cka_from_moments(m: Moments) -> torch.Tensor:
    """Per-condition linear CKA from the co-moments alone: |Sxy|_F^2 / (|Sxx|_F |Syy|_F), (C,).

    Equal to linear_cka on each condition's rows (the feature-space formula;
    the 1/(n-1) factors cancel). Conditions with count < 2 give 0: check m.valid.
    """
    if not isinstance(m, Moments):
        raise TypeError(f"m must be a tcfa Moments result, got {type(m).__name__}")
    m.require(BLOCKS, "cka_from_moments")
    sq = lambda s: s.square().sum((-2, -1))  # noqa: E731
    return _ratio(sq(m.sxy), sq(m.sxx), sq(m.syy))


def _median_bandwidth(d2: torch.Tensor) -> torch.Tensor:
    """Median Euclidean distance between distinct rows, from squared distances d2 (N, N)."""
    iu = torch.triu_indices(d2.shape[0], d2.shape[0], offset=1, device=d2.device)
    return d2[iu[0], iu[1]].median().sqrt()


def rbf_cka(x, y, sigma: float | None = None) -> torch.Tensor:
    """CKA with RBF kernels K_ij = exp(-|x_i - x_j|^2 / (2 sigma^2)) (Kornblith et al. 2019).

    CKA = <HKH, HLH>_F / (|HKH|_F |HLH|_F), H the centering matrix. ``sigma``
    None uses each representation's median distance between distinct rows.
    Builds N x N Grams: for moderate N.
    """
    x, y = _validate.paired_rows(x, y)
    if sigma is not None:
        sigma = _validate.positive("sigma", sigma)
    if x.shape[0] < 3:
        raise ValueError(f"x must have at least 3 rows for rbf_cka, got {x.shape[0]}")

    def centered_gram(a):
        d2 = torch.cdist(a, a).square()
        s = _median_bandwidth(d2) if sigma is None else torch.tensor(sigma, dtype=a.dtype)
        k = torch.exp(-d2 / (2 * s.square().clamp_min(torch.finfo(a.dtype).tiny)))
        return k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()

    K, L = centered_gram(x), centered_gram(y)
    return _ratio((K * L).sum(), (K * K).sum(), (L * L).sum())
