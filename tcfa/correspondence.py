"""Which units and which layers of two models correspond: unit intersection maps, entropic
Gromov-Wasserstein between layer geometries, and the depth-order-preserving path through a layer map.

Inputs are per-layer features of the same n samples, as in tcfa/similarity.py.
"""
from __future__ import annotations

import torch

from .divergence import gw_batch
from .ops import _validate
from .similarity import PairedLayers, check_layer_pair, pair_blocks

__all__ = ["unit_intersection", "intersection_of", "pairwise_gw", "monotone_path"]


# ------------------------------------------------------------------ unit intersection
def unit_intersection(xs, ys, top_k: int = 16) -> dict[str, torch.Tensor]:
    """Which units of two layers carry the same signal (the three-space paper's intersection maps).

    With R the correlation of every unit of A's layer l with every unit of B's layer m over the rows,
    each unit's partner is its most correlated unit on the other side (|R|). P_A pairs the top_k
    units of A (by that best |R|) with their partners, P_B likewise from B's side. Per pair:

      jaccard     |P_A & P_B| / |P_A | P_B|   (the two sides agree on the matches)
      coverage    2 * (mutual best matches) / (d_l + e_m)   (share of units matched both ways)
      confidence  sum of |R| over P_A & P_B / |P_A | P_B|   (jaccard weighted by match strength)

    Each is (L_A, L_B); top_k is cut to each layer's width. A unit without spread correlates 0.
    """
    return intersection_of(PairedLayers(xs, ys), _validate.integer("top_k", top_k, 1))


def intersection_of(p: PairedLayers, top_k: int) -> dict[str, torch.Tensor]:
    """unit_intersection of already paired layers."""
    # only the units' variances (O(n d), not the layers' covariances), and the correlations as the
    # cross-products scaled in place by inverse deviations: on the benchmark's 2048 x 4096 units this
    # took 0.1 s instead of 0.3 s with a guarded division of the whole matrix
    def inverse_deviation(feats):
        var = torch.cat([f.square().sum(0) for f in feats])
        return torch.where(var > 0, var.rsqrt(), torch.zeros_like(var))

    corr = (p.cross() * inverse_deviation(p.xc)[:, None]).mul_(inverse_deviation(p.yc)[None, :]).abs_()
    out = {name: torch.zeros(p.shape, dtype=torch.float64) for name in ("jaccard", "coverage", "confidence")}
    for (la, lb), r in pair_blocks(corr, p.wa, p.wb):
        best_b, partner_b = r.max(1)  # for each unit of A
        best_a, partner_a = r.max(0)
        ua = best_b.topk(min(top_k, r.shape[0])).indices
        ub = best_a.topk(min(top_k, r.shape[1])).indices
        pa = set(zip(ua.tolist(), partner_b[ua].tolist()))
        pb = set(zip(partner_a[ub].tolist(), ub.tolist()))
        union, both = pa | pb, pa & pb
        mutual = int((partner_a[partner_b] == torch.arange(r.shape[0], device=r.device)).sum())
        out["jaccard"][la, lb] = len(both) / len(union)
        out["coverage"][la, lb] = 2.0 * mutual / (r.shape[0] + r.shape[1])
        out["confidence"][la, lb] = sum(float(r[i, j]) for i, j in both) / len(union)
    return out


# ------------------------------------------------------------------ entropic GW
def pairwise_gw(xs, ys, *, eps: float = 0.05, max_iter: int = 200, tol: float = 1e-7) -> torch.Tensor:
    """Entropic Gromov-Wasserstein value of every pair (lower: more alike), (L_A, L_B).

    Each layer's geometry is its matrix of squared distances between the n rows (anchors), divided
    by its mean so that layers of different scale compare; uniform weights; all L_A * L_B problems
    are solved as one batch (tcfa.divergence.gw_batch), in fp64.
    """
    xs, ys = check_layer_pair(xs, ys, 2)
    eps = _validate.positive("eps", eps)

    def geometry(f):
        # fp64: the entropic GW loop's Sinkhorn solves cannot reach their tolerance in fp32 (they ran
        # to every iteration cap), and n (the anchors) is a few hundred, so the cost is small
        f = f.double()
        d2 = torch.cdist(f, f).square()
        mean = d2.mean()
        return d2 / mean if mean > 0 else d2

    ga, gb = [geometry(x) for x in xs], [geometry(y) for y in ys]
    c1 = torch.stack([ga[a] for a in range(len(xs)) for _ in range(len(ys))])
    c2 = torch.stack([gb[b] for _ in range(len(xs)) for b in range(len(ys))])
    values = gw_batch(c1, c2, eps=eps, max_iter=max_iter, tol=tol)
    return values.double().cpu().reshape(len(xs), len(ys))


# ------------------------------------------------------------------ path
def monotone_path(scores: torch.Tensor, larger_is_better: bool = True) -> list[tuple[int, int]]:
    """The depth-order-preserving correspondence: one B layer j_i per A layer i, j non-decreasing in i,
    maximising sum_i score[i, j_i] (minimising it when not larger_is_better), by dynamic programming
    in O(L_A L_B). A map with its best entry of each row on the diagonal gives the identity."""
    s = torch.as_tensor(scores, dtype=torch.float64)
    if s.dim() != 2 or 0 in s.shape:
        raise ValueError(f"scores must be a non-empty (L_A, L_B) map, got shape {tuple(s.shape)}")
    if not bool(torch.isfinite(s).all()):
        raise ValueError("scores must be finite")
    s = s if larger_is_better else -s
    best = s[0].clone()
    came_from = []
    for i in range(1, s.shape[0]):
        prefix, arg = torch.cummax(best, 0)  # best path ending at a column <= j
        came_from.append(arg)
        best = s[i] + prefix
    j = int(best.argmax())
    path = [j]
    for arg in reversed(came_from):
        j = int(arg[j])
        path.append(j)
    return list(enumerate(reversed(path)))
