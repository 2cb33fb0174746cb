"""Triton kernels of tcfa::gated_stitch_backward, the adjoint of tcfa/kernels/gated_stitch.py.

The math is the C++ backward's (csrc/cpu/gated_stitch.cpp): per selected (row n, condition c) pair,
  dS = dout V_c^T,  dg = dout.mu_y[c] + dS.z,  dz = g dS,  dlogit = g (dg - sum g dg) / tau,
  dx = sum dz U_c^T + dlogit W_g^T,  dU_c = sum (x - mu_x[c])^T dz,  dmu_x[c] = -sum dz U_c^T,
  dV_c = sum (g z)^T dout,  dmu_y[c] = sum g dout,  dW_g[:, c] = sum x^T dlogit,  db_g[c] = sum dlogit.
Dense mode is the routed one with every condition selected in slot c. Work is organised as
"pairs": the flat index q = n K + s of (row n, slot s), sorted by condition, so every parameter
gradient tile is owned by one program that loops over its condition's pairs (no atomics, a fixed
sum order). The only intermediates written are (N, K) gate gradients; dS and the dense z tiles
are recomputed per output tile instead of writing N x (C r) values. Any rank and number of conditions:
the rank runs in BLOCK_R chunks (a grid axis for the parameter gradients, a loop elsewhere) and the
dense dlogit W_g^T product in BLOCK_C chunks. Dot precision: kernels/_precision.py.
"""
import torch
import triton
import triton.language as tl

from ..ops import _validate
from . import _precision as precision
from ._precision import mma
from ._ragged import launch_device, width_tiles
from .gated_stitch import (BLOCK_M, MAX_BLOCK_C, MAX_BLOCK_N, MAX_BLOCK_R, STITCH_WARPS, _block, _condition_block,
                           _condition_blocks, _shrink, check_routing)

DX_DENSE = {"num_warps": 4}  # fewer spills than STITCH_WARPS for this kernel (gated_stitch.py)


@triton.jit
def _dz_tile(dout_ptr, v_ptr, rows, row_mask, c, r0, DY, R, g, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_R: tl.constexpr, PRECISION: tl.constexpr):
    """(BLOCK_M, BLOCK_R) dS = dout[rows] V_c^T for ranks r0 + [0, BLOCK_R), accumulated in g's dtype."""
    rs = r0 + tl.arange(0, BLOCK_R)
    r_mask = rs < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=g.dtype)
    for n0 in range(0, DY, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        n_mask = ns < DY
        d = tl.load(dout_ptr + rows[:, None] * DY + ns[None, :], mask=row_mask[:, None] & n_mask[None, :], other=0.0)
        vt = tl.load(v_ptr + c * R * DY + rs[None, :] * DY + ns[:, None], mask=n_mask[:, None] & r_mask[None, :],
                     other=0.0)
        acc = mma(d, vt, acc, PRECISION)
    return acc


@triton.jit
def _z_tile(x_ptr, u_ptr, shift_ptr, z_ptr, rows, q, row_mask, c, r0, DX, R, like, SAVED_Z: tl.constexpr,
            BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr):
    """z = (x - mu_x[c]) U_c of the pairs, ranks r0 + [0, BLOCK_R): loaded when the forward kept it, else recomputed."""
    rs = r0 + tl.arange(0, BLOCK_R)
    if SAVED_Z:
        return tl.load(z_ptr + q[:, None] * R + rs[None, :], mask=row_mask[:, None] & (rs < R)[None, :], other=0.0)
    else:
        return _shrink(x_ptr, u_ptr, shift_ptr, rows, row_mask, c, r0, DX, R, tl.zeros_like(like), BLOCK_K, BLOCK_R,
                       PRECISION)


@triton.jit
def _add_dz_ut(dout_ptr, u_ptr, v_ptr, rows, row_mask, ks, k_mask, c, g, acc, DX, DY, R, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr):
    """acc + (g dS) U_c^T on the dx columns ks: condition c's share of dx, the rank in BLOCK_R chunks."""
    for r0 in range(0, R, BLOCK_R):
        rs = r0 + tl.arange(0, BLOCK_R)
        dz = g[:, None] * _dz_tile(dout_ptr, v_ptr, rows, row_mask, c, r0, DY, R, g, BLOCK_M, BLOCK_N, BLOCK_R,
                                   PRECISION)
        ut = tl.load(u_ptr + c * DX * R + ks.to(tl.int64)[None, :] * R + rs[:, None], mask=(rs < R)[:, None] & k_mask[None, :],
                     other=0.0)
        acc = mma(dz, ut, acc, PRECISION)
    return acc


@triton.jit
def _pairs(order_ptr, pos, end, K):
    mask = pos < end
    q = tl.load(order_ptr + pos, mask=mask, other=0)
    return q, q // K, mask


@triton.jit
def _dgate_kernel(
    dout_ptr, x_ptr, u_ptr, v_ptr, shift_ptr, muy_ptr, z_ptr, order_ptr, block_cond_ptr, block_start_ptr,
    block_end_ptr, dg_ptr,
    K, DX, DY, R,
    SAVED_Z: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):
    """dg[q] = dout.mu_y[c] + dS.z for one block of condition-sorted pairs, the rank in BLOCK_R chunks."""
    c, start, end = _condition_block(block_cond_ptr, block_start_ptr, block_end_ptr)
    if start < end:
        q, rows, mask = _pairs(order_ptr, start + tl.arange(0, BLOCK_M), end, K)
        zero = tl.zeros((BLOCK_M, BLOCK_R), dtype=dg_ptr.dtype.element_ty)
        dg = tl.zeros((BLOCK_M,), dtype=dg_ptr.dtype.element_ty)
        for r0 in range(0, R, BLOCK_R):
            ds = _dz_tile(dout_ptr, v_ptr, rows, mask, c, r0, DY, R, zero, BLOCK_M, BLOCK_N, BLOCK_R, PRECISION)
            z = _z_tile(x_ptr, u_ptr, shift_ptr, z_ptr, rows, q, mask, c, r0, DX, R, zero, SAVED_Z, BLOCK_K, BLOCK_R,
                        PRECISION)
            dg += tl.sum(ds * z, axis=1)
        for n0 in range(0, DY, BLOCK_N):
            ns = n0 + tl.arange(0, BLOCK_N)
            n_mask = ns < DY
            d = tl.load(dout_ptr + rows[:, None] * DY + ns[None, :], mask=mask[:, None] & n_mask[None, :], other=0.0)
            muy = tl.load(muy_ptr + c * DY + ns, mask=n_mask, other=0.0)
            dg += tl.sum(d * muy[None, :], axis=1)
        tl.store(dg_ptr + q, dg, mask=mask)


@triton.jit
def _dparams_x_kernel(
    dout_ptr, x_ptr, v_ptr, mux_ptr, gates_ptr, dlogit_ptr, order_ptr, seg_ptr,
    du_ptr, dzsum_ptr, dw_ptr, db_ptr,
    K, C, DX, DY, R,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DX: tl.constexpr, BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Condition c, a (dx tile, rank chunk) of dU_c, over all of c's pairs; with it the rank chunk of
    sum dz (for dmu_x[c] = -U_c sum dz, one small bmm on the host) and, from the first rank chunk,
    dW_g[:, c] and db_g[c]."""
    c = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1).to(tl.int64)
    pid_r = tl.program_id(2).to(tl.int64)
    ks = pid_k * BLOCK_DX + tl.arange(0, BLOCK_DX)
    k_mask = ks < DX
    r0 = pid_r * BLOCK_R
    rs = r0 + tl.arange(0, BLOCK_R)
    r_mask = rs < R
    seg0 = tl.load(seg_ptr + c)
    seg1 = tl.load(seg_ptr + c + 1)
    dt = du_ptr.dtype.element_ty
    du = tl.zeros((BLOCK_DX, BLOCK_R), dtype=dt)
    dz_sum = tl.zeros((BLOCK_R,), dtype=dt)
    dw = tl.zeros((BLOCK_DX,), dtype=dt)
    db = tl.zeros((BLOCK_M,), dtype=dt)
    for p0 in range(seg0, seg1, BLOCK_M):
        q, rows, mask = _pairs(order_ptr, p0 + tl.arange(0, BLOCK_M), seg1, K)
        g = tl.load(gates_ptr + q, mask=mask, other=0.0)
        dl = tl.load(dlogit_ptr + q, mask=mask, other=0.0)
        dz = g[:, None] * _dz_tile(dout_ptr, v_ptr, rows, mask, c, r0, DY, R, g, BLOCK_M, BLOCK_N, BLOCK_R, PRECISION)
        x = tl.load(x_ptr + rows[:, None] * DX + ks[None, :], mask=mask[:, None] & k_mask[None, :], other=0.0)
        du = mma(tl.trans(x), dz, du, PRECISION)
        dz_sum += tl.sum(dz, axis=0)
        dw += tl.sum(x * dl[:, None], axis=0)
        db += dl
    # sum (x - mu_x)^T dz = sum x^T dz - mu_x^T (sum dz)
    mux = tl.load(mux_ptr + c * DX + ks, mask=k_mask, other=0.0)
    du -= mux[:, None] * dz_sum[None, :]
    tl.store(du_ptr + c * DX * R + ks.to(tl.int64)[:, None] * R + rs[None, :], du, mask=k_mask[:, None] & r_mask[None, :])
    if pid_k == 0:
        tl.store(dzsum_ptr + c * R + rs, dz_sum, mask=r_mask)
    if pid_r == 0:
        tl.store(dw_ptr + ks * C + c, dw, mask=k_mask)
        if pid_k == 0:
            tl.store(db_ptr + c, tl.sum(db, axis=0))


@triton.jit
def _dparams_y_kernel(
    dout_ptr, x_ptr, u_ptr, shift_ptr, z_ptr, gates_ptr, order_ptr, seg_ptr, dv_ptr, dmuy_ptr,
    K, DX, DY, R,
    SAVED_Z: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):
    """Condition c, a (rank chunk, dy tile) of dV_c = sum (g z)^T dout over c's pairs, and from the
    first rank chunk dmu_y[c] = sum g dout."""
    c = tl.program_id(0).to(tl.int64)
    ns = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = ns < DY
    pid_r = tl.program_id(2).to(tl.int64)
    r0 = pid_r * BLOCK_R
    rs = r0 + tl.arange(0, BLOCK_R)
    seg0 = tl.load(seg_ptr + c)
    seg1 = tl.load(seg_ptr + c + 1)
    dt = dv_ptr.dtype.element_ty
    dv = tl.zeros((BLOCK_R, BLOCK_N), dtype=dt)
    dmuy = tl.zeros((BLOCK_N,), dtype=dt)
    for p0 in range(seg0, seg1, BLOCK_M):
        q, rows, mask = _pairs(order_ptr, p0 + tl.arange(0, BLOCK_M), seg1, K)
        g = tl.load(gates_ptr + q, mask=mask, other=0.0)
        z = _z_tile(x_ptr, u_ptr, shift_ptr, z_ptr, rows, q, mask, c, r0, DX, R,
                    tl.zeros((BLOCK_M, BLOCK_R), dtype=dt), SAVED_Z, BLOCK_K, BLOCK_R, PRECISION)
        d = tl.load(dout_ptr + rows[:, None] * DY + ns[None, :], mask=mask[:, None] & n_mask[None, :], other=0.0)
        dv = mma(tl.trans(z * g[:, None]), d, dv, PRECISION)
        dmuy += tl.sum(d * g[:, None], axis=0)
    tl.store(dv_ptr + c * R * DY + rs[:, None] * DY + ns[None, :], dv, mask=(rs < R)[:, None] & n_mask[None, :])
    if pid_r == 0:
        tl.store(dmuy_ptr + c * DY + ns, dmuy, mask=n_mask)


@triton.jit
def _dx_dense_kernel(
    dout_ptr, w_ptr, u_ptr, v_ptr, gates_ptr, dlogit_ptr, dx_ptr,
    N, DX, DY, C, R,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DX: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):
    """Dense dx tile = dlogit W_g^T + sum_c g_c dS_c U_c^T, accumulated over c and the rank in registers."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    ks = tl.program_id(1).to(tl.int64) * BLOCK_DX + tl.arange(0, BLOCK_DX)
    k_mask = ks < DX
    acc = tl.zeros((BLOCK_M, BLOCK_DX), dtype=dx_ptr.dtype.element_ty)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_mask = cols < C
        dl = tl.load(dlogit_ptr + rows[:, None] * C + cols[None, :], mask=row_mask[:, None] & col_mask[None, :],
                     other=0.0)
        wt = tl.load(w_ptr + ks.to(tl.int64)[None, :] * C + cols[:, None], mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(dl, wt, acc, input_precision="ieee")  # the gate's own dots stay IEEE (_precision.py)
    for cj in range(0, C):
        c = tl.cast(cj, tl.int64)
        g = tl.load(gates_ptr + rows * C + c, mask=row_mask, other=0.0)
        acc = _add_dz_ut(dout_ptr, u_ptr, v_ptr, rows, row_mask, ks, k_mask, c, g, acc, DX, DY, R, BLOCK_M, BLOCK_N,
                         BLOCK_R, PRECISION)
    tl.store(dx_ptr + rows[:, None] * DX + ks[None, :], acc, mask=row_mask[:, None] & k_mask[None, :])


@triton.jit
def _dx_routed_kernel(
    dout_ptr, w_ptr, u_ptr, v_ptr, gates_ptr, dlogit_ptr, order_ptr, block_cond_ptr, block_start_ptr,
    block_end_ptr, dx_ptr,
    slot, K, DX, DY, C, R,
    ACCUMULATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DX: tl.constexpr,
    BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):
    """Routed, slot `slot`: dx[rows, tile] (+)= g dS U_c^T + dlogit W_g[:, c]^T for a block of condition-c rows."""
    c, start, end = _condition_block(block_cond_ptr, block_start_ptr, block_end_ptr)
    if start < end:
        pos = start + tl.arange(0, BLOCK_M)
        row_mask = pos < end
        rows = tl.load(order_ptr + pos, mask=row_mask, other=0)
        ks = tl.program_id(1).to(tl.int64) * BLOCK_DX + tl.arange(0, BLOCK_DX)
        k_mask = ks < DX
        g = tl.load(gates_ptr + rows * K + slot, mask=row_mask, other=0.0)
        dl = tl.load(dlogit_ptr + rows * K + slot, mask=row_mask, other=0.0)
        w = tl.load(w_ptr + ks * C + c, mask=k_mask, other=0.0)
        acc = dl[:, None] * w[None, :]
        acc = _add_dz_ut(dout_ptr, u_ptr, v_ptr, rows, row_mask, ks, k_mask, c, g, acc, DX, DY, R, BLOCK_M, BLOCK_N,
                         BLOCK_R, PRECISION)
        ptrs = dx_ptr + rows[:, None] * DX + ks[None, :]
        mask = row_mask[:, None] & k_mask[None, :]
        if ACCUMULATE:
            acc += tl.load(ptrs, mask=mask, other=0.0)
        tl.store(ptrs, acc, mask=mask)


def gated_stitch_backward_forward(grad_out, x, gate_weight, gate_bias, U, V, mu_x, mu_y, gates, index, z,
                                  top_k=None, temperature=1.0):
    """Launcher with the gated_stitch_backward schema; returns (dx, dW_g, db_g, dU, dV, dmu_x, dmu_y)."""
    like = (x, gate_weight, gate_bias, U, V, mu_x, mu_y)
    with launch_device(grad_out=grad_out, x=x, gate_weight=gate_weight, gate_bias=gate_bias, U=U, V=V, mu_x=mu_x,
                       mu_y=mu_y, gates=gates, index=index, z=z):
        return _backward(grad_out, like, gates, index, z, top_k, temperature)


def _backward(grad_out, like, gates, index, z, top_k, temperature):
    ct = _validate.compute_dtype(like[0].dtype)
    dout, x, W, b, U, V, mu_x, mu_y = (t.to(ct).contiguous() for t in (grad_out, *like))
    N, DX = x.shape
    C, _, R = U.shape
    DY = V.shape[2]
    check_routing(top_k, temperature, C)
    dense = top_k is None
    K = C if dense else top_k
    gates = gates.to(ct).contiguous()
    if dense:  # slot c of every row is condition c
        index = torch.arange(C, device=x.device).expand(N, C)
    else:
        torch._assert_async(((index >= 0) & (index < C)).all(), "index must lie in [0, C)")
        z = z.to(ct).contiguous()
    index = index.contiguous()
    grads = [torch.zeros_like(t) for t in (x, W, b, U, V, mu_x, mu_y)]
    if N == 0:
        return tuple(gr.to(t.dtype) for gr, t in zip(grads, like))
    dx, dW, db, dU, dV, dmu_x, dmu_y = grads
    shift = torch.bmm(mu_x.unsqueeze(1), U).squeeze(1).contiguous()
    BLOCK_N, BLOCK_K, BLOCK_R = _block(DY, hi=MAX_BLOCK_N), _block(DX, hi=64), _block(R, hi=MAX_BLOCK_R)
    BLOCK_DX, BLOCK_C = _block(DX, hi=64), _block(C, hi=MAX_BLOCK_C)
    bulk = dict(BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R, PRECISION=precision.stitch(ct),
                num_warps=STITCH_WARPS)
    r_chunks = width_tiles("U (rank)", R, BLOCK_R)
    dx_tiles, dy_tiles = width_tiles("x (dx)", DX, BLOCK_DX), max(1, width_tiles("mu_y (dy)", DY, BLOCK_N))

    # Every (row, slot) pair, sorted by condition: blocks for per-pair work, segments per condition.
    flat = index.reshape(-1)
    order, cond, start, end = _condition_blocks(flat, C, BLOCK_M)
    seg = torch.zeros(C + 1, dtype=torch.int64, device=x.device)
    seg[1:] = torch.cumsum(torch.bincount(flat, minlength=C), 0)
    zz = z if not dense else dout  # a placeholder pointer: never read when z is recomputed

    dg = torch.empty(N, K, dtype=ct, device=x.device)
    _dgate_kernel[(cond.shape[0],)](dout, x, U, V, shift, mu_y, zz, order, cond, start, end, dg, K, DX, DY, R,
                                    SAVED_Z=not dense, BLOCK_K=BLOCK_K, **bulk)
    # Softmax over the selected logits: an (N, K) elementwise step between the two passes.
    dlogit = (gates * (dg - (gates * dg).sum(1, keepdim=True)) / temperature).contiguous()

    if DX:
        dz_sum = torch.zeros(C, R, dtype=ct, device=x.device)
        _dparams_x_kernel[(C, dx_tiles, r_chunks)](dout, x, V, mu_x, gates, dlogit, order, seg, dU, dz_sum, dW, db,
                                                   K, C, DX, DY, R, BLOCK_DX=BLOCK_DX, **bulk)
        dmu_x.copy_(-torch.bmm(U, dz_sum.unsqueeze(2)).squeeze(2))  # sum over pairs of dz U_c^T, negated
    else:  # no x columns to tile: db_g[c] = sum of c's dlogit
        db.index_add_(0, flat, dlogit.reshape(-1))
    _dparams_y_kernel[(C, dy_tiles, r_chunks)](dout, x, U, shift, zz, gates, order, seg, dV, dmu_y, K, DX, DY, R,
                                               SAVED_Z=not dense, BLOCK_K=BLOCK_K, **bulk)
    if dense and DX:
        _dx_dense_kernel[(triton.cdiv(N, BLOCK_M), dx_tiles)](dout, W, U, V, gates, dlogit, dx, N, DX, DY, C, R,
                                                             BLOCK_DX=BLOCK_DX, BLOCK_C=BLOCK_C, **(bulk | DX_DENSE))
    elif DX:  # one launch per slot: a row appears once per slot, so slots add in a fixed order, no atomics
        for s in range(K):
            o, cs, st, en = _condition_blocks(index[:, s].contiguous(), C, BLOCK_M)
            _dx_routed_kernel[(cs.shape[0], dx_tiles)](dout, W, U, V, gates, dlogit, o, cs, st, en, dx, s, K, DX, DY,
                                                       C, R, ACCUMULATE=s > 0, BLOCK_DX=BLOCK_DX, **bulk)
    return tuple(gr.to(t.dtype) for gr, t in zip(grads, like))
