"""Per-condition statistics: moments (one pass, mergeable, all-reducible) and CKA scores.

The alignment maps fitted from the moments (CCA, ridge, Procrustes) are in tcfa/linear_maps.py.

Everything here is batched over conditions: the moments come from one call of
torch.ops.tcfa.segment_moments (math in tcfa.ops.segment_moments), the scores are
torch.linalg on (C, ., .) stacks, with no Python loop over conditions.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import distributed, ops
from .ops import _validate

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
    m = moments_of_checked(x, y, labels, num_segments, blocks)
    # every row enters its segment's mean (accumulated in fp64): reading x and
    # y once more to check their values took 3 % of the moments here
    _validate.finite_through("x", x, m.mean_x)
    _validate.finite_through("y", y, m.mean_y)
    return m


def moments_of_checked(x, y, labels, num_segments: int, blocks: tuple) -> Moments:
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
        m = moments_of_checked(x.to(self.dtype), y.to(self.dtype), labels, self.num_segments, self.blocks)
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
    """Median Euclidean distance between distinct rows, from squared distances d2 (N, N).

    The median as NumPy (and Kornblith et al.'s code) takes it: the mean of the two middle distances
    when their number is even. torch.median returns the lower one, which the fuzzing caught: at
    16 rows (120 pairs) the CKA moved by 1e-3.
    """
    iu = torch.triu_indices(d2.shape[0], d2.shape[0], offset=1, device=d2.device)
    dist = d2[iu[0], iu[1]].clamp_min(0).sqrt()
    k = dist.numel()
    lower = dist.kthvalue((k + 1) // 2).values
    return lower if k % 2 else 0.5 * (lower + dist.kthvalue(k // 2 + 1).values)


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
