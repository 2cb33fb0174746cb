"""Typed wrappers over torch.ops.tcfa.*: the one place where each op's math is stated.

Every op works on a ragged batch of B problems (docs/architecture.md): problem k
pairs the x rows [x_offsets[k], x_offsets[k+1]) with the y rows
[y_offsets[k], y_offsets[k+1]). Costs are affine in x.y,
C_ij = alpha_i + beta_j - gamma x_i.y_j:

* ``"sqeuclidean"``: C = |x - y|^2 (alpha = |x|^2, beta = |y|^2, gamma = 2);
* ``"cosine"``:      C = 1 - x.y / (|x| |y|) (rows normalised, gamma = 1),

so kernels compute a tile of x.y with a GEMM and never the whole cost matrix.
fp16/bf16 inputs are computed in fp32 (``_validate.compute_dtype``, where the rule is written once);
outputs have the input dtype.

The C++ CPU kernels (csrc/cpu, one library per instruction-set level, see
``cpu_capability``) and the Triton kernels (tcfa/kernels, registered here for the
CUDA dispatch key) implement exactly these docstrings.
"""
from __future__ import annotations

import torch

from . import _validate
from . import registration  # noqa: F401  (fake kernels, autograd, CUDA kernels: registered at import)
from .cpu_levels import _C, _CPU_LIBRARIES, cpu_capabilities, cpu_capability, set_cpu_capability  # noqa: F401


def softmin(x, y, x_offsets, y_offsets, h, log_b, eps: float, cost: str = "sqeuclidean", active=None):
    """Soft-minimum over y of every x row, cost computed on the fly in tiles.

    out_i = -eps * log sum_j exp(log_b_j + (h_j - C(x_i, y_j)) / eps)

    for i in problem k and j over the y rows of problem k, one pass with an
    online max. The Sinkhorn f-update is ``softmin(x, y, ..., g, log b)``; the
    g-update swaps the roles of x and y. Rows of problems with
    ``active[k] == False`` are not computed and are returned as 0.
    Shapes: x (Nx, d), y (Ny, d), h and log_b (Ny,), out (Nx,).
    """
    return torch.ops.tcfa.softmin(x, y, x_offsets, y_offsets, h, log_b, eps, cost, active)


def softmin_dense(cost, x_offsets, y_offsets, log_a, log_b, h, eps: float, dim: int, active=None):
    """The soft-minimum of :func:`softmin` given stored costs.

    ``cost`` is the flat concatenation of every problem's row-major n_k x m_k
    cost block (what :func:`cost_matrix` returns).

    dim=1: out_i = -eps * log sum_j exp(log_b_j + (h_j - C_ij) / eps),  h (Ny,), out (Nx,)
    dim=0: out_j = -eps * log sum_i exp(log_a_i + (h_i - C_ij) / eps),  h (Nx,), out (Ny,)

    dim=0 sweeps the rows of the stored cost with per-column running (max,
    sum): the cost is never transposed. Inactive problems return 0.
    """
    return torch.ops.tcfa.softmin_dense(cost, x_offsets, y_offsets, log_a, log_b, h, eps, dim, active)


def sinkhorn_dense(cost, x_offsets, y_offsets, log_a, log_b, f, g, eps: float, max_iter: int, tol: float = 0.0,
                   tau_a: float = 1.0, tau_b: float = 1.0, schedule=(), omega: float = 1.0, symmetric=None):
    """Whole Sinkhorn loops on stored costs, annealing stages included, every problem in one call.

    Iteration t = 1, 2, ... runs at eps_t = schedule[t-1] for t <= S = len(schedule) and at
    eps after (eps_0 = eps_1). Unbalanced OT gives tau_a, tau_b at eps (tau = rho / (rho + eps),
    tcfa/ot_unbalanced.py; 1: that marginal exact), so at any e, tau_a(e) = rho_a / (rho_a + e).
    From the potentials (f, g), iteration t of problem k is

        g_T_j = -tau_b(eps') eps' log sum_i exp(log_a_i + (f_i - C_ij) / eps'),   eps' = eps_{t-1}
        g_j  <- g_j + w_t (g_T_j - g_j)   if that does not lower the dual objective, else g_T_j
        f_T_i = -tau_a(eps_t) eps_t log sum_j exp(log_b_j + (g_j - C_ij) / eps_t)
        error_k = sum_i a_i |exp((f_i - f_T_i) / eps_t) - 1| + sum_j b_j |exp((g_j - g_T_j) / eps') - 1|
        f_i  <- f_i + w_t (f_T_i - f_i)   if that does not lower the dual objective, else f_T_i

    (the g-update runs at the previous iteration's eps because the CPU kernel computes it in the
    same read of the cost as that iteration's f-update). w_t = 1 up to iteration S + 1, then
    ``omega`` in (0, 2) (over-relaxation). The guard is entry by entry: with the other potential
    fixed, the dual objective depends on one entry v through  phi(v) - eps s_v e^{(v - v0)/eps},
    s_v the current marginal ratio of that row or column (its marginal over a_i or b_j) at v0,
    phi(v) = v for an exact marginal and rho (1 - e^{-v/rho}) for a KL-relaxed one. A plain
    update maximises it; an over-relaxed one is kept only where it does not decrease it, so
    every step is an ascent step on the (bounded) dual and no omega makes the iterates blow up.
    Balanced and w = 1, error_k is the L1 violation of the row marginal of the plan
    (f^{t-1}, g^t), whose column marginal is exact; over-relaxed, the second sum adds its column
    violation; unbalanced, both are the same fixed-point residuals.

    A problem stops after the first iteration t > S with error_k < tol, or after max_iter
    (tol = 0 runs exactly max_iter); error_k of iterations t <= S is not a stopping test. The
    input g only shifts the exponents of the first g-update (the previous g is a good one);
    results do not depend on it beyond rounding.

    ``symmetric`` (bool (B,), optional) flags problems that are one measure against itself
    (square, log_a = log_b on them, C_ij = C_ji, tau_a = tau_b): their dual has a symmetric
    solution f = g, reached by the averaged update of one potential (GeomLoss's symmetric
    Sinkhorn), run at the target eps from the first iteration (no annealing, no omega):

        f_T_i = -tau_a(eps) eps log sum_j exp(log_b_j + (f_j - C_ij) / eps)
        error_k = 2 sum_i a_i |exp((f_i - f_T_i) / eps) - 1|     (both marginals, violated alike)
        f_i  <- (f_i + f_T_i) / 2

    stopping at the first t with error_k < tol; g = f on return. From a cold start at the
    target eps it needed 2-11 iterations to 1e-4 on 2048 uniform points in 2-8 dimensions for
    eps from 1e-1 to 1e-4 (plain Sinkhorn: up to 192), so annealing would only add iterations.
    Returns (f, g, n_iter (B,) int64, error (B,)). Empty problems are skipped
    (n_iter 0). Same cost layout as :func:`softmin_dense`.
    """
    return torch.ops.tcfa.sinkhorn_dense(cost, x_offsets, y_offsets, log_a, log_b, f, g, eps, max_iter, tol, tau_a,
                                         tau_b, [float(e) for e in schedule], omega, symmetric)


def cost_matrix(x, y, x_offsets, y_offsets, cost: str = "sqeuclidean"):
    """Every problem's cost block C_ij = C(x_i, y_j), flattened and concatenated.

    Problem k's n_k x m_k block, row-major, starts at sum_{l<k} n_l m_l.
    Costs are clamped at 0: rounding of the affine form can dip below it.
    """
    return torch.ops.tcfa.cost(x, y, x_offsets, y_offsets, cost)


def barycentric(x, y, x_offsets, y_offsets, g, log_b, values, eps: float, cost: str = "sqeuclidean"):
    """Barycentric projection of values v onto the x rows, streamed.

    T_i = sum_j pi_ij v_j / sum_j pi_ij,   pi_ij = b_j exp((g_j - C(x_i, y_j)) / eps),

    j over the y rows of x_i's problem; values (Ny, dv) of any width, out (Nx, dv).
    With Sinkhorn potentials (f, g) this is the row-normalised plan applied to v.
    """
    return torch.ops.tcfa.barycentric(x, y, x_offsets, y_offsets, g, log_b, values, eps, cost)


def gated_stitch(x, gate_weight, gate_bias, U, V, mu_x, mu_y, top_k=None, temperature: float = 1.0,
                 *, return_routing: bool = False):
    """Gated mixture of C low-rank affine maps, one per condition.

    For each row x (width dx):

        logits = x W_g + b_g                                   (C,)
        g      = softmax(logits / tau)                         dense: top_k=None
        g_c    = softmax over the top_k largest logits, 0 elsewhere    routed
                 (ties broken by the lower condition index)
        out    = sum_c g_c * (mu_y[c] + (x - mu_x[c]) U_c V_c)         (dy,)

    Shapes: x (N, dx), gate_weight W_g (dx, C), gate_bias b_g (C,), U (C, dx, r),
    V (C, r, dy), mu_x (C, dx), mu_y (C, dy); out (N, dy). Differentiable in
    every tensor argument; the top-k choice itself is piecewise constant, so
    unselected logits get zero gradient.

    The raw op ``torch.ops.tcfa.gated_stitch`` returns (out, gates, index, z):
    gates (N, K) are the nonzero g_c of each row, largest first, index (N, K)
    their conditions and z (N, K, r) = (x - mu_x[c]) U_c, kept for the backward
    (K = top_k). In dense mode gates is all C gates in condition order and
    index, z are empty (N, 0), (N, 0, r). With ``return_routing=True`` this
    wrapper returns (out, gates, index); gates, index and z carry no gradient.
    """
    top_k, temperature = _validate.stitch_args(x, gate_weight, gate_bias, U, V, mu_x, mu_y, top_k, temperature)
    out, gates, index, _ = torch.ops.tcfa.gated_stitch(x, gate_weight, gate_bias, U, V, mu_x, mu_y, top_k, temperature)
    _validate.finite_through("x", x, gates)
    return (out, gates, index) if return_routing else out


# ------------------------------------------------------------------ moments


def segment_moments(x, y, labels, num_segments: int, xx: bool = True, yy: bool = True, xy: bool = True):
    """Per-segment count, means and centered co-moment sums of paired rows.

    For every segment c in [0, num_segments), S_c = {i : labels_i = c}, n_c = |S_c|:

        count[c]  = n_c
        mean_x[c] = (1/n_c) sum_{i in S_c} x_i                       (0 when n_c = 0)
        sxx[c]    = sum_{i in S_c} (x_i - mean_x[c]) (x_i - mean_x[c])^T   (dx, dx)
        syy[c]    = sum_{i in S_c} (y_i - mean_y[c]) (y_i - mean_y[c])^T   (dy, dy)
        sxy[c]    = sum_{i in S_c} (x_i - mean_x[c]) (y_i - mean_y[c])^T   (dx, dy)

    so sxx[c] / (n_c - 1) is segment c's covariance. Labels may come in any
    order. Means are accumulated in fp64 and the rows shifted by them before
    the co-moment GEMMs, so fp32 inputs with a large common offset stay
    accurate (no E[x^2] - E[x]^2 cancellation). ``xx``/``yy``/``xy`` = False
    skips a block, which is then returned empty with shape (C, 0, 0).
    Shapes: x (N, dx), y (N, dy), labels (N,) int64; count is int64, the
    rest have x's dtype (fp16/bf16 computed and returned in fp32).
    """
    return torch.ops.tcfa.segment_moments(x, y, labels, num_segments, xx, yy, xy)


def symmetric_top_eigh(A, k: int):
    """The k largest eigenpairs of every symmetric matrix in a batch.

        A[b] Z[b] = Z[b] diag(values[b]),   Z[b]^T Z[b] = I_k,

    values (B, k) descending, vectors Z (B, n, k); A (B, n, n) fp32 or fp64
    and symmetric (the CPU kernel reads both triangles). For a repeated
    eigenvalue the vectors are an orthonormal basis of its eigenspace.

    The CPU kernel reduces A to tridiagonal form, finds the k eigenvalues by
    bisection and their vectors by inverse iteration (csrc/cpu/top_eigh.cpp):
    for k = 32 of n = 256 (the CCA benchmark's 32 whitened Grams, fp32, one
    thread) it took 56 ms here against 124 ms for torch.linalg.eigh, which
    computes all n vectors. It checks its residuals and orthogonality
    against A and flags matrices that miss them; those (and every matrix on
    other devices) are computed by torch.linalg.eigh, so the result always
    has eigh's accuracy.
    """
    A = _validate.tensor("A", A, dim=3, dtypes=(torch.float32, torch.float64))
    if A.shape[1] != A.shape[2]:
        raise ValueError(f"A must be a batch of square matrices (B, n, n), got shape {tuple(A.shape)}")
    k = _validate.integer("k", k, lo=1)
    if k > A.shape[1]:
        raise ValueError(f"k must be <= n = {A.shape[1]}, got {k}")
    values, vectors, ok = torch.ops.tcfa.symmetric_top_eigh(A, k)
    if not bool(ok.all()):
        bad = (~ok).nonzero().squeeze(1)
        w, V = torch.linalg.eigh(A[bad])
        values, vectors = values.clone(), vectors.clone()
        values[bad], vectors[bad] = w[:, -k:].flip(-1), V[..., -k:].flip(-1)
    return values, vectors


def gram_triu(xs, centre: bool = True):
    """The upper triangle of each matrix's Gram, one (n, n) slab per matrix.

        out[l, i, j] = sum_k (x_l[i, k] - m_l[k]) (x_l[j, k] - m_l[k])   for j >= i,
        out[l, i, j] = 0                                                  for j < i,

    with m_l the column means of x_l (summed in fp64, rounded to the dtype)
    when ``centre``, else 0. A Gram is symmetric, so the triangle holds all
    of it: <K, L> = 2 <triu K, triu L> - sum_i K_ii L_ii. HSIC needs exactly
    those inner products (tcfa.similarity), and the CPU kernel computes the
    triangle only: half the multiply-adds of ``x @ x.T`` (csrc/cpu/gram_triu.cpp,
    where the speed is measured).
    ``xs``: a list of L matrices (n, d_l) with the same n and dtype (fp32 or
    fp64; widths may differ); out (L, n, n) in that dtype. Not differentiable:
    tcfa.similarity takes its autograd route through matmul when gradients
    are wanted.
    """
    xs = list(xs) if isinstance(xs, (list, tuple)) else xs
    if not isinstance(xs, list) or not xs:
        raise ValueError("xs must be a non-empty list of (n, d) tensors")
    for i, x in enumerate(xs):
        _validate.tensor(f"xs[{i}]", x, dim=2, dtypes=(torch.float32, torch.float64))
    first = xs[0]
    for i, x in enumerate(xs[1:], 1):
        if x.shape[0] != first.shape[0] or x.dtype != first.dtype or x.device != first.device:
            raise ValueError(f"xs[{i}] must have xs[0]'s rows, dtype and device ({first.shape[0]}, {first.dtype}, "
                             f"{first.device}), got ({x.shape[0]}, {x.dtype}, {x.device})")
    return torch.ops.tcfa.gram_triu(xs, bool(centre))
