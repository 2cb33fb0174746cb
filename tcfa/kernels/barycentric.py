"""Triton kernel of tcfa::barycentric (math: tcfa.ops.barycentric).

    T_i = sum_j pi_ij v_j / sum_j pi_ij,   pi_ij = b_j exp((g_j - C_ij) / eps)

FlashAttention-style forward, one launch for the whole ragged batch: per block
of x rows, loop over the problem's y rows in tiles; score tile = tl.dot(x, y^T),
online row max, weights 2^(score - max), acc = acc * rescale + W @ v_tile.
alpha_i is constant along a row and cancels in the normalisation, so the score
is u_j + scale x_i.y_j with u_j = (log b_j + (g_j - beta_j)/eps) log2(e).
Conventions (base-2 exponents, lowest-value running max, "ieee" fp32 dots) are
those of kernels/softmin.py.

Values of any width dv: the second grid axis splits dv into BLOCK_DV-wide
chunks. Each chunk's program recomputes the scores, which costs 2 d flops per
pair per chunk; it keeps the accumulator (BLOCK_M x BLOCK_DV) in registers, and
dv <= 128 (the common case) is a single chunk.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import ragged
from ..ops import _validate
from . import _ragged as rg
from ._ragged import block_header
from .softmin import COL_BLOCK, MAX_K_BLOCK, OT_WARPS, ROW_BLOCK, _pair_dots, dot_precision

MAX_DV_BLOCK = 128


@triton.jit
def _barycentric_kernel(x_ptr, y_ptr, u_ptr, v_ptr, out_ptr, x_off_ptr, y_off_ptr,
                        blocks_ptr, coef_ptr, d, dv,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_DV: tl.constexpr, DOT_PRECISION: tl.constexpr, LOWEST: tl.constexpr):
    problem, first_row, rows_start, rows_end, cols_start, cols_end = block_header(blocks_ptr, x_off_ptr, y_off_ptr)
    scale = tl.load(coef_ptr)  # gamma log2(e) / eps

    rows = first_row + tl.arange(0, BLOCK_M)
    row_mask = rows < rows_end
    dvs = tl.program_id(1).to(tl.int64) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    dv_mask = dvs < dv
    dtype = out_ptr.dtype.element_ty
    run_max = tl.full((BLOCK_M,), LOWEST, dtype)
    run_sum = tl.zeros((BLOCK_M,), dtype)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype)
    for col0 in range(cols_start, cols_end, BLOCK_N):
        cols = col0 + tl.arange(0, BLOCK_N)
        col_mask = cols < cols_end
        dots = _pair_dots(x_ptr, rows, row_mask, y_ptr, cols, col_mask, d,
                          tl.zeros((BLOCK_M, BLOCK_N), dtype), BLOCK_K, DOT_PRECISION)
        u = tl.load(u_ptr + cols, mask=col_mask, other=float("-inf"))  # masked columns weigh 0
        scores = u[None, :] + scale * dots
        new_max = tl.maximum(run_max, tl.max(scores, axis=1))
        rescale = tl.exp2(run_max - new_max)
        weights = tl.exp2(scores - new_max[:, None])
        run_sum = run_sum * rescale + tl.sum(weights, axis=1)
        v = tl.load(v_ptr + cols[:, None] * dv + dvs[None, :], mask=col_mask[:, None] & dv_mask[None, :], other=0.0)
        # The weights stay in the compute dtype (FlashAttention casts them to
        # fp16): a fp32 "ieee" dot keeps T_i at the C++ op's accuracy.
        acc = tl.dot(weights, v, acc * rescale[:, None], input_precision=DOT_PRECISION)
        run_max = new_max
    # An all-zero-weight (or empty) problem gives 0/0 = NaN, as the C++ op does;
    # the public API rejects such problems before any kernel runs.
    out = acc / run_sum[:, None]
    tl.store(out_ptr + rows[:, None] * dv + dvs[None, :], out, mask=row_mask[:, None] & dv_mask[None, :])


def barycentric_forward(x, y, x_offsets, y_offsets, g, log_b, values, eps, cost="sqeuclidean"):
    """tcfa::barycentric on the GPU. Returns (Nx, dv) in values' dtype, like the C++ op."""
    cost = rg.check_cost(cost)
    eps = rg.check_eps(eps)
    rg.check_points(x, y)
    rg.check_rows("g", g, y.shape[0])
    rg.check_rows("log_b", log_b, y.shape[0])
    if not isinstance(values, torch.Tensor) or values.dim() != 2 or values.shape[0] != y.shape[0]:
        raise ValueError(f"values must be 2-D with one row per row of y ({y.shape[0]}), "
                         f"got shape {tuple(getattr(values, 'shape', ()))}")
    xo, yo = rg.check_pair(x_offsets, x.shape[0], y_offsets, y.shape[0])
    _validate.barycentric_mass(log_b, xo, yo)
    guard = rg.launch_device(x=x, y=y, g=g, log_b=log_b, values=values)

    ct = _validate.compute_dtype(x.dtype)
    x_rows, _ = rg.affine_rows(x.to(ct), cost)
    y_rows, beta = rg.affine_rows(y.to(ct), cost)
    u = ((log_b.to(ct) + (g.to(ct) - beta) / eps) * rg.LOG2E).contiguous()
    v = values.to(ct).contiguous()
    dv = v.shape[1]
    coef = rg.scalars(rg.cost_gamma(cost) / eps * rg.LOG2E, dtype=ct, device=x.device)
    out = torch.zeros(x.shape[0], dv, dtype=ct, device=x.device)
    blocks = ragged.block_table(xo, ROW_BLOCK, None, x.device)
    if blocks.shape[0] and dv:
        block_dv = rg.dot_block(dv, MAX_DV_BLOCK)
        with guard:
            _barycentric_kernel[(blocks.shape[0], rg.width_tiles("values", dv, block_dv))](
                x_rows, y_rows, u, v, out, xo.to(x.device), yo.to(x.device), blocks, coef, x.shape[1], dv,
                BLOCK_M=ROW_BLOCK, BLOCK_N=COL_BLOCK, BLOCK_K=rg.dot_block(x.shape[1], MAX_K_BLOCK),
                BLOCK_DV=block_dv, DOT_PRECISION=dot_precision(ct), LOWEST=torch.finfo(ct).min, num_warps=OT_WARPS,
            )
    return out.to(values.dtype)
