"""Triton kernels of tcfa::softmin, tcfa::softmin_dense and tcfa::cost.

The math is stated once, in tcfa/ops/__init__.py; these kernels implement it for the
CUDA dispatch key and are tested on CPU tensors under TRITON_INTERPRET=1
against the C++ op (csrc/cpu/softmin.cpp) and a naive reference.

Every launcher takes exactly the arguments of its op schema (csrc/ops.cpp) and
returns what the C++ kernel returns. One launch serves a whole ragged batch:
program p works on row block p of a host-built block table (kernels/_ragged.py).

Numerics shared by all kernels:
* costs are affine in x.y, C_ij = alpha_i + beta_j - gamma x_i.y_j, so a tile
  of x.y comes from tl.dot and the cost matrix is never materialised
  (except by `cost`, whose job it is);
* the log-sum-exp runs in base 2 (exp2/log2, as FlashAttention does): log2(e)
  is folded into the per-column term and the dot scale on the host, which saves
  a multiply per pair; the result is converted back with a factor ln 2;
* one pass with an online max: the running max starts at the dtype's lowest
  finite value, not -inf, so (old max - new max) stays finite when every term
  so far is -inf (zero weights), exactly as csrc/cpu/lse.h does;
* fp32 tl.dot uses input_precision="ieee" (the policy: kernels/_precision.py).
  On a GPU the default would be TF32 (10-bit mantissa), whose cost error is
  divided by eps; the interpreter's tl.dot is an exact numpy matmul either
  way. fp64 is computed in fp64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import ragged
from ..ops import _validate
from . import _precision as precision
from . import _ragged as rg
from ._ragged import block_header
from ..ops.relaxation import TiedRows, relaxed_update

# Tile sizes, chosen for an H100. The (BLOCK_M x BLOCK_N) score tile of the
# on-the-fly kernels lives in registers; BLOCK_K chunks of the width d feed tl.dot.
ROW_BLOCK = 64
COL_BLOCK = 64
MAX_K_BLOCK = 64
# Warps of the GEMM-tile kernels (softmin, cost, barycentric): the 64 x 64 fp32 score tile and its
# IEEE dot operands need more than 4 warps' registers. Compiled for sm_90 (make compile-check):
# softmin at 4 warps used 255 registers and spilled 888 B per thread, at 8 warps 190 and none;
# cost 1672 -> 64 B, barycentric 1156 -> 76 B. softmin_dense (no dot) stays at 4: no spills.
OT_WARPS = 8
# softmin_dense streams a stored cost (bandwidth-bound): wide, coalesced tiles.
DENSE_ROW_BLOCK = 32  # dim=1: rows per program; each sweeps its rows' columns
DENSE_COL_TILE = 128
DENSE_COL_BLOCK = 32  # dim=0: columns per program; each sweeps the problem's rows
DENSE_ROW_TILE = 64
# Dot precision of the OT kernels: IEEE for every dtype (why: kernels/_precision.py).
dot_precision = precision.ieee


# ---------------------------------------------------------------- device helpers
@triton.jit
def _pair_dots(x_ptr, rows, row_mask, y_ptr, cols, col_mask, d, acc,
               BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + x[rows] @ y[cols]^T for contiguous (., d) x and y, over d in BLOCK_K chunks.

    Masked rows/columns/widths load 0, so they add nothing. When d <= BLOCK_K
    this is one iteration; reloading the x chunk for every y tile hits L1/L2.
    """
    for k0 in range(0, d, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < d
        x_tile = tl.load(x_ptr + rows[:, None] * d + ks[None, :],
                         mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        y_tile = tl.load(y_ptr + cols[None, :] * d + ks[:, None],  # (BLOCK_K, BLOCK_N): y^T
                         mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(x_tile, y_tile, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _online_lse_update(run_max, run_sum, terms, AXIS: tl.constexpr):
    """Folds a tile of base-2 exponents into the running (max, sum) along AXIS, one pass."""
    new_max = tl.maximum(run_max, tl.max(terms, axis=AXIS))
    if AXIS == 1:
        shifted = terms - new_max[:, None]
    else:
        shifted = terms - new_max[None, :]
    run_sum = run_sum * tl.exp2(run_max - new_max) + tl.sum(tl.exp2(shifted), axis=AXIS)
    return new_max, run_sum


@triton.jit
def _lse2(run_max, run_sum):
    """log2 sum_j 2^term_j from the running state; -inf when every term was -inf (or none)."""
    return tl.where(run_sum > 0, run_max + tl.log2(run_sum), float("-inf"))


# ---------------------------------------------------------------- softmin
@triton.jit
def _softmin_kernel(x_ptr, y_ptr, alpha_ptr, u_ptr, out_ptr, x_off_ptr, y_off_ptr,
                    blocks_ptr, coef_ptr, d,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, LOWEST: tl.constexpr):
    """out_i = alpha_i - eps ln2 * log2 sum_j 2^(u_j + scale x_i.y_j) for one block of x rows.

    u_j = (log b_j + (h_j - beta_j)/eps) log2(e) and scale = gamma log2(e)/eps
    come from the host, so the exponent is one FMA per pair after the GEMM tile.
    """
    problem, first_row, rows_start, rows_end, cols_start, cols_end = block_header(blocks_ptr, x_off_ptr, y_off_ptr)
    scale = tl.load(coef_ptr)
    out_scale = tl.load(coef_ptr + 1)  # -eps ln2

    rows = first_row + tl.arange(0, BLOCK_M)
    row_mask = rows < rows_end
    dtype = out_ptr.dtype.element_ty
    run_max = tl.full((BLOCK_M,), LOWEST, dtype)
    run_sum = tl.zeros((BLOCK_M,), dtype)
    for col0 in range(cols_start, cols_end, BLOCK_N):
        cols = col0 + tl.arange(0, BLOCK_N)
        col_mask = cols < cols_end
        dots = _pair_dots(x_ptr, rows, row_mask, y_ptr, cols, col_mask, d,
                          tl.zeros((BLOCK_M, BLOCK_N), dtype), BLOCK_K, DOT_PRECISION)
        u = tl.load(u_ptr + cols, mask=col_mask, other=float("-inf"))  # masked: 2^-inf = 0
        run_max, run_sum = _online_lse_update(run_max, run_sum, u[None, :] + scale * dots, 1)
    alpha = tl.load(alpha_ptr + rows, mask=row_mask, other=0.0)
    tl.store(out_ptr + rows, alpha + out_scale * _lse2(run_max, run_sum), mask=row_mask)


def softmin_forward(x, y, x_offsets, y_offsets, h, log_b, eps, cost="sqeuclidean", active=None):
    """tcfa::softmin on the GPU (math: tcfa.ops.softmin). Returns (Nx,) in x's dtype."""
    cost = rg.check_cost(cost)
    eps = rg.check_eps(eps)
    rg.check_points(x, y)
    rg.check_rows("h", h, y.shape[0])
    rg.check_rows("log_b", log_b, y.shape[0])
    xo, yo = rg.check_pair(x_offsets, x.shape[0], y_offsets, y.shape[0])
    flags = rg.problem_flags("active", active, xo.numel() - 1)
    guard = rg.launch_device(x=x, y=y, h=h, log_b=log_b)

    ct = _validate.compute_dtype(x.dtype)
    x_rows, alpha = rg.affine_rows(x.to(ct), cost)
    y_rows, beta = rg.affine_rows(y.to(ct), cost)
    u = ((log_b.to(ct) + (h.to(ct) - beta) / eps) * rg.LOG2E).contiguous()
    coef = rg.scalars(rg.cost_gamma(cost) / eps * rg.LOG2E, -eps * rg.LN2, dtype=ct, device=x.device)
    out = torch.zeros(x.shape[0], dtype=ct, device=x.device)  # inactive rows stay 0
    blocks = ragged.block_table(xo, ROW_BLOCK, flags, x.device)
    if blocks.shape[0]:
        with guard:
            _softmin_kernel[(blocks.shape[0],)](
                x_rows, y_rows, alpha, u, out, xo.to(x.device), yo.to(x.device), blocks, coef, x.shape[1],
                BLOCK_M=ROW_BLOCK, BLOCK_N=COL_BLOCK, BLOCK_K=rg.dot_block(x.shape[1], MAX_K_BLOCK),
                DOT_PRECISION=dot_precision(ct), LOWEST=torch.finfo(ct).min, num_warps=OT_WARPS,
            )
    return out.to(x.dtype)


# ---------------------------------------------------------------- softmin_dense
@triton.jit
def _softmin_dense_kernel(cost_ptr, u_ptr, out_ptr, x_off_ptr, y_off_ptr, cost_off_ptr, blocks_ptr, coef_ptr,
                          BLOCK_OWN: tl.constexpr, BLOCK_SWEEP: tl.constexpr, ROWS: tl.constexpr,
                          LOWEST: tl.constexpr):
    """ROWS (dim=1): out_i = -eps ln2 * log2 sum_j 2^(u_j - log2(e) C_ij / eps) with
    u_j = (log b_j + h_j/eps) log2(e), for one block of rows; otherwise (dim=0) the
    same sum over i, for one block of columns.

    The program owns BLOCK_OWN rows (or columns) and sweeps the other axis
    BLOCK_SWEEP at a time, keeping a running (max, sum) per owned line. The
    stored row-major cost is never transposed: a row program reads contiguous
    BLOCK_SWEEP-wide runs of its rows, a column program contiguous BLOCK_OWN-wide
    pieces of each row it sweeps. A batch gives sum_k m_k / BLOCK_OWN column
    programs; a single problem with few columns would leave SMs idle, and would
    then want the rows split across programs plus a (max, sum) merge, as the C++
    kernel does across threads.
    """
    problem, first, rows_start, rows_end, cols_start, cols_end = block_header(blocks_ptr, x_off_ptr, y_off_ptr)
    n = rows_end - rows_start
    m = cols_end - cols_start
    if ROWS:
        own_start, own_end, sweep_start, sweep_len, own_stride, sweep_stride = rows_start, rows_end, cols_start, m, m, 1
    else:
        own_start, own_end, sweep_start, sweep_len, own_stride, sweep_stride = cols_start, cols_end, rows_start, n, 1, m
    cost_scale = tl.load(coef_ptr)  # -log2(e)/eps
    out_scale = tl.load(coef_ptr + 1)  # -eps ln2

    own = first + tl.arange(0, BLOCK_OWN)
    own_mask = own < own_end
    line_ptrs = cost_ptr + tl.load(cost_off_ptr + problem) + (own - own_start) * own_stride
    dtype = out_ptr.dtype.element_ty
    run_max = tl.full((BLOCK_OWN,), LOWEST, dtype)
    run_sum = tl.zeros((BLOCK_OWN,), dtype)
    for sweep0 in range(0, sweep_len, BLOCK_SWEEP):
        sweep = sweep0 + tl.arange(0, BLOCK_SWEEP)
        sweep_mask = sweep < sweep_len
        c = tl.load(line_ptrs[:, None] + sweep[None, :] * sweep_stride,
                    mask=own_mask[:, None] & sweep_mask[None, :], other=0.0)
        u = tl.load(u_ptr + sweep_start + sweep, mask=sweep_mask, other=float("-inf"))
        run_max, run_sum = _online_lse_update(run_max, run_sum, u[None, :] + cost_scale * c.to(dtype), 1)
    tl.store(out_ptr + own, out_scale * _lse2(run_max, run_sum), mask=own_mask)


def softmin_dense_forward(cost, x_offsets, y_offsets, log_a, log_b, h, eps, dim, active=None):
    """tcfa::softmin_dense on the GPU (math: tcfa.ops.softmin_dense).

    Computed in the cost's compute dtype (fp16/bf16 costs are read as stored and
    widened in registers, never copied); returns h's dtype, like the C++ op.
    """
    eps = rg.check_eps(eps)
    if dim not in (0, 1):
        raise ValueError(f"dim must be 0 or 1, got {dim}")
    if not isinstance(cost, torch.Tensor) or not cost.is_floating_point() or cost.dim() != 1:
        raise ValueError("cost must be the flat floating-point concatenation of the problems' "
                         f"row-major costs (1-D), got {getattr(cost, 'shape', type(cost).__name__)}")
    rg.check_vector("log_a", log_a)
    rg.check_vector("log_b", log_b)
    n_x, n_y = log_a.shape[0], log_b.shape[0]
    xo, yo = rg.check_pair(x_offsets, n_x, y_offsets, n_y)
    cost_offsets = ragged.block_offsets(xo, yo)
    if cost.numel() != int(cost_offsets[-1]):
        raise ValueError(f"cost must hold sum_k n_k*m_k = {int(cost_offsets[-1])} entries for these offsets, "
                         f"got {cost.numel()}")
    # dim=1 reduces over y's rows (weights b, h on y), dim=0 over x's rows (weights a, h on x)
    log_w = log_b if dim == 1 else log_a
    rg.check_rows("h", h, log_w.shape[0])
    flags = rg.problem_flags("active", active, xo.numel() - 1)
    guard = rg.launch_device(cost=cost, log_a=log_a, log_b=log_b, h=h)

    ct = _validate.compute_dtype(cost.dtype)
    device = cost.device
    u = ((log_w.to(ct) + h.to(ct) / eps) * rg.LOG2E).contiguous()
    coef = rg.scalars(-rg.LOG2E / eps, -eps * rg.LN2, dtype=ct, device=device)
    out = torch.zeros(n_x if dim == 1 else n_y, dtype=ct, device=device)  # inactive problems stay 0
    common = (xo.to(device), yo.to(device), cost_offsets.to(device))
    if dim == 1:
        blocks = ragged.block_table(xo, DENSE_ROW_BLOCK, flags, device)
        tiles = dict(BLOCK_OWN=DENSE_ROW_BLOCK, BLOCK_SWEEP=DENSE_COL_TILE)
    else:
        blocks = ragged.block_table(yo, DENSE_COL_BLOCK, flags, device)
        tiles = dict(BLOCK_OWN=DENSE_COL_BLOCK, BLOCK_SWEEP=DENSE_ROW_TILE)
    if blocks.shape[0]:
        with guard:
            _softmin_dense_kernel[(blocks.shape[0],)](cost.contiguous(), u, out, *common, blocks, coef, **tiles,
                                                      ROWS=dim == 1, LOWEST=torch.finfo(ct).min, num_warps=4)
    return out.to(h.dtype)


def sinkhorn_dense_forward(cost, x_offsets, y_offsets, log_a, log_b, f, g, eps, max_iter, tol=0.0, tau_a=1.0,
                           tau_b=1.0, schedule=(), omega=1.0, symmetric=None):
    """tcfa::sinkhorn_dense on the GPU (math: tcfa.ops.sinkhorn_dense): the two
    dense soft-min kernels per iteration, problems masked out once converged.

    The CPU kernel fuses both half-steps into one read of the cost because the
    CPU is compute-bound on the exps; an H100 streams the cost at ~3 TB/s, so
    the loop keeps the two bandwidth-bound kernels and syncs once per
    iteration to stop converged problems. g is unused beyond its shape: the
    GPU kernels need no shift. Empty problems are skipped (n_iter 0).
    Symmetric problems skip the column kernel (their g is their f).
    """
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter!r}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol!r}")
    if not (0 < tau_a <= 1 and 0 < tau_b <= 1):
        raise ValueError(f"tau_a and tau_b must lie in (0, 1], got {tau_a!r} and {tau_b!r}")
    if not 0 < omega < 2:
        raise ValueError(f"omega must lie in (0, 2), got {omega!r}")
    schedule = [rg.check_eps(e) for e in schedule]
    eps = rg.check_eps(eps)
    rg.check_rows("f", f, log_a.shape[0])
    rg.check_rows("g", g, log_b.shape[0])
    xo, yo = rg.check_pair(x_offsets, log_a.shape[0], y_offsets, log_b.shape[0])
    _validate.same_device(cost=cost, log_a=log_a, log_b=log_b, f=f, g=g)  # its soft-min launches guard the device
    sym = rg.check_symmetric(symmetric, xo, yo, log_a, log_b, tau_a, tau_b)
    ct = _validate.compute_dtype(cost.dtype)
    device = cost.device
    nx, ny = (xo[1:] - xo[:-1]).to(device), (yo[1:] - yo[:-1]).to(device)
    B = nx.numel()
    x_index = torch.repeat_interleave(torch.arange(B, device=device), nx)
    y_index = torch.repeat_interleave(torch.arange(B, device=device), ny)
    tie = TiedRows(sym, xo, yo, device)
    a, b = log_a.to(ct).exp(), log_b.to(ct).exp()
    rho_a, rho_b = (None if tau == 1 else eps * tau / (1 - tau) for tau in (tau_a, tau_b))
    eps_at = lambda t: schedule[max(t, 1) - 1] if max(t, 1) <= len(schedule) else eps  # noqa: E731
    f_dtype, g_dtype = f.dtype, g.dtype
    f, g = f.to(ct).clone(), g.to(ct).clone()
    n_iter = torch.zeros(B, dtype=torch.int64, device=device)
    error = torch.zeros(B, dtype=ct, device=device)
    active = (nx > 0) & (ny > 0)
    for t in range(1, max_iter + 1):
        if not bool(active.any()):
            break
        e_g, e_f = eps_at(t - 1), eps_at(t)
        w = omega if t > len(schedule) + 1 else 1.0
        general, tied = active & ~tie.flags, active & tie.flags
        g_plain = softmin_dense_forward(cost, xo, yo, log_a, log_b, f, e_g, 0, general)
        g_new, _, g_gap = relaxed_update(g, g_plain, e_g, rho_b, w)
        col = torch.where(general[y_index], b * torch.expm1(g_gap).abs(), 0.0)
        g = tie.apply(f, torch.where(general[y_index], g_new, g))
        f_new, f_T, _ = relaxed_update(f, softmin_dense_forward(cost, xo, yo, log_a, log_b, g, e_f, 1, general),
                                       e_f, rho_a, w)
        row = a * torch.expm1((f - f_T) / e_f).abs()
        if tie.any:  # at eps from the first iteration, the averaged step (its error counts both marginals)
            s_T = relaxed_update(f, softmin_dense_forward(cost, xo, yo, log_a, log_b, g, eps, 1, tied),
                                 eps, rho_a, 1.0)[1]
            on = tied[x_index]
            f_new = torch.where(on, 0.5 * (f + s_T), f_new)
            row = torch.where(on, 2 * a * torch.expm1((f - s_T) / eps).abs(), row)
        viol = torch.zeros_like(error).index_add_(0, x_index, row)
        error = torch.where(active, viol.index_add_(0, y_index, col), error)
        f = torch.where(active[x_index], f_new, f)
        n_iter += active
        if tol > 0:
            active &= ~((error < tol) & (tie.flags | (t > len(schedule))))
    return f.to(f_dtype), tie.apply(f, g).to(g_dtype), n_iter, error.to(f_dtype)


# ---------------------------------------------------------------- cost
@triton.jit
def _cost_kernel(x_ptr, y_ptr, alpha_ptr, beta_ptr, out_ptr, x_off_ptr, y_off_ptr, cost_off_ptr,
                 blocks_ptr, d, GAMMA: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """C_ij = max(alpha_i + beta_j - gamma x_i.y_j, 0) for one block of rows, all columns.

    Written at the problem's block start + local row * m + local column. The clamp
    undoes rounding of the affine form (|x|^2 + |y|^2 - 2x.y can dip below 0).
    """
    problem, first_row, rows_start, rows_end, cols_start, cols_end = block_header(blocks_ptr, x_off_ptr, y_off_ptr)
    m = cols_end - cols_start
    block_start = tl.load(cost_off_ptr + problem)

    rows = first_row + tl.arange(0, BLOCK_M)
    row_mask = rows < rows_end
    alpha = tl.load(alpha_ptr + rows, mask=row_mask, other=0.0)
    row_ptrs = out_ptr + block_start + (rows - rows_start) * m
    dtype = out_ptr.dtype.element_ty
    for col0 in range(cols_start, cols_end, BLOCK_N):
        cols = col0 + tl.arange(0, BLOCK_N)
        col_mask = cols < cols_end
        dots = _pair_dots(x_ptr, rows, row_mask, y_ptr, cols, col_mask, d,
                          tl.zeros((BLOCK_M, BLOCK_N), dtype), BLOCK_K, DOT_PRECISION)
        beta = tl.load(beta_ptr + cols, mask=col_mask, other=0.0)
        c = tl.maximum(alpha[:, None] + beta[None, :] - GAMMA * dots, 0.0)
        tl.store(row_ptrs[:, None] + (cols - cols_start)[None, :], c, mask=row_mask[:, None] & col_mask[None, :])


def cost_forward(x, y, x_offsets, y_offsets, cost):
    """tcfa::cost on the GPU (math: tcfa.ops.cost_matrix). Flat (sum_k n_k m_k,), compute dtype."""
    cost = rg.check_cost(cost)
    rg.check_points(x, y)
    xo, yo = rg.check_pair(x_offsets, x.shape[0], y_offsets, y.shape[0])
    cost_offsets = ragged.block_offsets(xo, yo)
    guard = rg.launch_device(x=x, y=y)

    ct = _validate.compute_dtype(x.dtype)
    x_rows, alpha = rg.affine_rows(x.to(ct), cost)
    y_rows, beta = rg.affine_rows(y.to(ct), cost)
    out = torch.empty(int(cost_offsets[-1]), dtype=ct, device=x.device)
    blocks = ragged.block_table(xo, ROW_BLOCK, None, x.device)
    if blocks.shape[0] and out.numel():
        with guard:
            _cost_kernel[(blocks.shape[0],)](
                x_rows, y_rows, alpha, beta, out, xo.to(x.device), yo.to(x.device), cost_offsets.to(x.device),
                blocks, x.shape[1], GAMMA=rg.cost_gamma(cost),
                BLOCK_M=ROW_BLOCK, BLOCK_N=COL_BLOCK, BLOCK_K=rg.dot_block(x.shape[1], MAX_K_BLOCK),
                DOT_PRECISION=dot_precision(ct), num_warps=OT_WARPS,
            )
    return out
