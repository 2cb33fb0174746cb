"""Triton kernels of tcfa::gated_stitch (the math: tcfa.ops.gated_stitch's docstring).

Dense (top_k=None): one fused kernel per (BLOCK_M rows, BLOCK_N output columns) tile:
gate GEMM, softmax, then for every condition c the shrink z = x U_c - mu_x[c] U_c,
the gate scaling and the expand into the output accumulator. The N x (C r)
intermediate only ever exists as one (BLOCK_M, r) tile in registers; the price
is that every column tile recomputes the gate and the shrinks (dy / BLOCK_N
times), which the expand GEMM of the same size amortises.

Routed (top_k=k): a gate kernel writes the top-k gates and conditions, then for
each slot s the rows are sorted by condition (torch.sort on the device, no
host sync) and one kernel walks condition-sorted row blocks: every block holds
rows of a single condition c, so it loads U_c and V_c once and never touches
the others. Slot 0 writes the output, later slots add to it; a row appears once
per slot, so no atomics are needed and the sum order is fixed.

Backward (gated_stitch_backward_forward): see the section comment above its kernels.

Tested on CPU tensors under TRITON_INTERPRET=1 (exact fp32 dot products there);
on a GPU, fp32 tl.dot uses TF32, so expect about 1e-3 relative error.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _gate_logits(x_ptr, w_ptr, b_ptr, rows, row_mask, DX, C, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
    """(BLOCK_M, BLOCK_C) logits x W_g + b_g; padded condition columns are -inf."""
    cols = tl.arange(0, BLOCK_C)
    col_mask = cols < C
    logits = tl.zeros((rows.shape[0], BLOCK_C), dtype=tl.float32 if x_ptr.dtype.element_ty != tl.float64 else tl.float64)
    for k0 in range(0, DX, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < DX
        x = tl.load(x_ptr + rows[:, None] * DX + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptr + ks[:, None] * C + cols[None, :], mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        logits += tl.dot(x, w)
    b = tl.load(b_ptr + cols, mask=col_mask, other=0.0)
    return tl.where(col_mask[None, :], logits + b[None, :], float("-inf"))


@triton.jit
def _shrink(x_ptr, u_ptr, shift_ptr, rows, row_mask, c, DX, R, acc, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """(BLOCK_M, BLOCK_R) z = x U_c - mu_x[c] U_c, accumulated into the zero tile `acc`."""
    rs = tl.arange(0, BLOCK_R)
    r_mask = rs < R
    for k0 in range(0, DX, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < DX
        x = tl.load(x_ptr + rows[:, None] * DX + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        u = tl.load(u_ptr + c * DX * R + ks[:, None] * R + rs[None, :], mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        acc += tl.dot(x, u)
    shift = tl.load(shift_ptr + c * R + rs, mask=r_mask, other=0.0)
    return acc - shift[None, :]


@triton.jit
def _gated_stitch_kernel(
    x_ptr, w_ptr, b_ptr, u_ptr, v_ptr, shift_ptr, muy_ptr, out_ptr, gates_ptr,
    N, DX, DY, C, R, inv_tau,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Dense mode, one (BLOCK_M, BLOCK_N) tile of out; gates are written by the first column tile."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = ns < DY
    cols = tl.arange(0, BLOCK_C)
    col_mask = cols < C
    rs = tl.arange(0, BLOCK_R)
    r_mask = rs < R

    logits = _gate_logits(x_ptr, w_ptr, b_ptr, rows, row_mask, DX, C, BLOCK_K, BLOCK_C) * inv_tau
    e = tl.exp(logits - tl.max(logits, axis=1)[:, None])  # padded columns: exp(-inf) = 0
    gates = e / tl.sum(e, axis=1)[:, None]
    if pid_n == 0:
        tl.store(gates_ptr + rows[:, None] * C + cols[None, :], gates, mask=row_mask[:, None] & col_mask[None, :])

    # sum_c g_c mu_y[c] for this column tile, then each condition's low-rank term.
    muy = tl.load(muy_ptr + cols[:, None] * DY + ns[None, :], mask=col_mask[:, None] & n_mask[None, :], other=0.0)
    acc = tl.dot(gates, muy)
    for c in range(0, C):
        g_c = tl.sum(tl.where(cols[None, :] == c, gates, 0.0), axis=1)
        z = _shrink(x_ptr, u_ptr, shift_ptr, rows, row_mask, c, DX, R, tl.zeros((BLOCK_M, BLOCK_R), dtype=acc.dtype),
                    BLOCK_K, BLOCK_R)
        v = tl.load(v_ptr + c * R * DY + rs[:, None] * DY + ns[None, :], mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        acc += tl.dot(z * g_c[:, None], v)
    tl.store(out_ptr + rows[:, None] * DY + ns[None, :], acc, mask=row_mask[:, None] & n_mask[None, :])


@triton.jit
def _gate_topk_kernel(
    x_ptr, w_ptr, b_ptr, gates_ptr, index_ptr,
    N, DX, C, inv_tau,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_TOPK: tl.constexpr,
):
    """Routed mode: the top-k logits of each row, largest first (ties: lower index), and their softmax."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    cols = tl.arange(0, BLOCK_C)
    work = _gate_logits(x_ptr, w_ptr, b_ptr, rows, row_mask, DX, C, BLOCK_K, BLOCK_C)
    slots = tl.arange(0, BLOCK_TOPK)
    best = tl.full((BLOCK_M, BLOCK_TOPK), float("-inf"), dtype=work.dtype)
    which = tl.zeros((BLOCK_M, BLOCK_TOPK), dtype=tl.int64)
    for j in tl.static_range(TOP_K):
        top = tl.max(work, axis=1)
        first = tl.min(tl.where(work == top[:, None], cols[None, :], BLOCK_C), axis=1)
        best = tl.where(slots[None, :] == j, top[:, None], best)
        which = tl.where(slots[None, :] == j, first[:, None].to(tl.int64), which)
        work = tl.where(cols[None, :] == first[:, None], float("-inf"), work)
    e = tl.exp((best - tl.max(best, axis=1)[:, None]) * inv_tau)  # slots >= TOP_K hold -inf: 0
    gates = e / tl.sum(e, axis=1)[:, None]
    mask = row_mask[:, None] & (slots[None, :] < TOP_K)
    tl.store(gates_ptr + rows[:, None] * TOP_K + slots[None, :], gates, mask=mask)
    tl.store(index_ptr + rows[:, None] * TOP_K + slots[None, :], which, mask=mask)


@triton.jit
def _gated_stitch_routed_kernel(
    x_ptr, u_ptr, v_ptr, shift_ptr, muy_ptr, gates_ptr, order_ptr, block_cond_ptr, block_start_ptr, block_end_ptr,
    out_ptr, z_ptr,
    slot, DX, DY, C, R, TOP_K,
    ACCUMULATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Routed mode, slot `slot`: one block of condition-sorted rows x one column tile of out."""
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    c = tl.load(block_cond_ptr + pid_b)
    start = tl.load(block_start_ptr + pid_b)
    end = tl.load(block_end_ptr + pid_b)
    if start < end:  # the block table is padded to an upper bound of the block count
        pos = start + tl.arange(0, BLOCK_M)
        row_mask = pos < end
        rows = tl.load(order_ptr + pos, mask=row_mask, other=0)
        ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = ns < DY
        rs = tl.arange(0, BLOCK_R)
        r_mask = rs < R
        g = tl.load(gates_ptr + rows * TOP_K + slot, mask=row_mask, other=0.0)
        z = _shrink(x_ptr, u_ptr, shift_ptr, rows, row_mask, c, DX, R,
                    tl.zeros((BLOCK_M, BLOCK_R), dtype=g.dtype), BLOCK_K, BLOCK_R)
        if pid_n == 0:  # kept for the backward
            tl.store(z_ptr + (rows[:, None] * TOP_K + slot) * R + rs[None, :], z, mask=row_mask[:, None] & r_mask[None, :])
        v = tl.load(v_ptr + c * R * DY + rs[:, None] * DY + ns[None, :], mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        muy = tl.load(muy_ptr + c * DY + ns, mask=n_mask, other=0.0)
        acc = g[:, None] * (tl.dot(z, v) + muy[None, :])
        out_ptrs = out_ptr + rows[:, None] * DY + ns[None, :]
        mask = row_mask[:, None] & n_mask[None, :]
        if ACCUMULATE:
            acc += tl.load(out_ptrs, mask=mask, other=0.0)
        tl.store(out_ptrs, acc, mask=mask)


def _block(n, lo=16, hi=128):
    """A power-of-two tile size >= n, clamped to [lo, hi] (tl.dot needs sides >= 16)."""
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def _condition_blocks(index_s, C, block_m):
    """Block table of condition-sorted rows, built on the device without a host sync.

    Returns (order, cond, start, end): order lists the rows sorted by condition
    (stable); block b covers order[start[b]:end[b]], all of condition cond[b].
    The table has the upper bound cdiv(N, block_m) + C entries; unused ones are empty.
    """
    N = index_s.shape[0]
    order = torch.sort(index_s, stable=True).indices
    counts = torch.bincount(index_s, minlength=C)
    starts = torch.cumsum(counts, 0) - counts
    nblocks = (counts + block_m - 1) // block_m
    ends_blocks = torch.cumsum(nblocks, 0)
    b = torch.arange(triton.cdiv(N, block_m) + C, device=index_s.device)
    cond = torch.searchsorted(ends_blocks, b, right=True)
    valid = cond < C
    cond = cond.clamp(max=C - 1)
    first_block = ends_blocks[cond] - nblocks[cond]
    start = starts[cond] + (b - first_block) * block_m
    end = torch.minimum(start + block_m, starts[cond] + counts[cond])
    start = torch.where(valid, start, end)
    return order, cond, start.contiguous(), end.contiguous()


def gated_stitch_forward(x, gate_weight, gate_bias, U, V, mu_x, mu_y, top_k=None, temperature=1.0):
    """Launcher with the op's signature; returns (out, gates, index, z) like the C++ kernel."""
    dtype = x.dtype
    ct = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    x, W, b, U, V, mu_x, mu_y = (t.to(ct).contiguous() for t in (x, gate_weight, gate_bias, U, V, mu_x, mu_y))
    N, DX = x.shape
    C, _, R = U.shape
    DY = V.shape[2]
    if top_k is not None and not 1 <= top_k <= C:
        raise ValueError(f"top_k must lie in [1, {C}], got {top_k}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    shift = torch.bmm(mu_x.unsqueeze(1), U).squeeze(1).contiguous()  # (C, R): mu_x[c] U_c
    out = torch.empty(N, DY, dtype=ct, device=x.device)
    BLOCK_K, BLOCK_R, BLOCK_C = _block(DX, hi=64), _block(R), _block(C, hi=1024)
    BLOCK_M, BLOCK_N = 32, _block(DY)
    inv_tau = 1.0 / temperature
    if top_k is None:
        gates = torch.empty(N, C, dtype=ct, device=x.device)
        grid = (triton.cdiv(N, BLOCK_M), triton.cdiv(DY, BLOCK_N))
        _gated_stitch_kernel[grid](x, W, b, U, V, shift, mu_y, out, gates, N, DX, DY, C, R, inv_tau,
                                   BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_C=BLOCK_C, BLOCK_R=BLOCK_R)
        index = torch.empty(N, 0, dtype=torch.int64, device=x.device)
        z = torch.empty(N, 0, R, dtype=ct, device=x.device)
        return out.to(dtype), gates, index, z

    gates = torch.empty(N, top_k, dtype=ct, device=x.device)
    index = torch.empty(N, top_k, dtype=torch.int64, device=x.device)
    z = torch.empty(N, top_k, R, dtype=ct, device=x.device)
    _gate_topk_kernel[(triton.cdiv(N, BLOCK_M),)](x, W, b, gates, index, N, DX, C, inv_tau, TOP_K=top_k,
                                                  BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, BLOCK_C=BLOCK_C,
                                                  BLOCK_TOPK=triton.next_power_of_2(top_k))
    for s in range(top_k):
        order, cond, start, end = _condition_blocks(index[:, s].contiguous(), C, BLOCK_M)
        grid = (cond.shape[0], triton.cdiv(DY, BLOCK_N))
        _gated_stitch_routed_kernel[grid](x, U, V, shift, mu_y, gates, order, cond, start, end, out, z,
                                          s, DX, DY, C, R, top_k, ACCUMULATE=s > 0, BLOCK_M=BLOCK_M,
                                          BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_R=BLOCK_R)
    return out.to(dtype), gates, index, z


# ------------------------------------------------------------------ backward
# The math is the C++ backward's (csrc/cpu/gated_stitch.cpp): per selected (row n, condition c) pair,
#   dS = dout V_c^T,  dg = dout.mu_y[c] + dS.z,  dz = g dS,  dlogit = g (dg - sum g dg) / tau,
#   dx = sum dz U_c^T + dlogit W_g^T,  dU_c = sum (x - mu_x[c])^T dz,  dmu_x[c] = -sum dz U_c^T,
#   dV_c = sum (g z)^T dout,  dmu_y[c] = sum g dout,  dW_g[:, c] = sum x^T dlogit,  db_g[c] = sum dlogit.
# Dense mode is the routed one with every condition selected in slot c. Work is organised as
# "pairs": the flat index q = n K + s of (row n, slot s), sorted by condition, so every parameter
# gradient tile is owned by one program that loops over its condition's pairs (no atomics, a fixed
# sum order). The only intermediates written are (N, K) gate gradients; dS and the dense z tiles
# are recomputed per output tile instead of writing N x (C r) values.


@triton.jit
def _dz_tile(dout_ptr, v_ptr, rows, row_mask, c, DY, R, g, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_R: tl.constexpr):
    """(BLOCK_M, BLOCK_R) dS = dout[rows] V_c^T, accumulated in g's dtype."""
    rs = tl.arange(0, BLOCK_R)
    r_mask = rs < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=g.dtype)
    for n0 in range(0, DY, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        n_mask = ns < DY
        d = tl.load(dout_ptr + rows[:, None] * DY + ns[None, :], mask=row_mask[:, None] & n_mask[None, :], other=0.0)
        vt = tl.load(v_ptr + c * R * DY + rs[None, :] * DY + ns[:, None], mask=n_mask[:, None] & r_mask[None, :],
                     other=0.0)
        acc += tl.dot(d, vt)
    return acc


@triton.jit
def _z_tile(x_ptr, u_ptr, shift_ptr, z_ptr, rows, q, row_mask, c, DX, R, like, SAVED_Z: tl.constexpr,
            BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """z = (x - mu_x[c]) U_c of the pairs: loaded when the forward kept it (routed), else recomputed."""
    rs = tl.arange(0, BLOCK_R)
    if SAVED_Z:
        return tl.load(z_ptr + q[:, None] * R + rs[None, :], mask=row_mask[:, None] & (rs < R)[None, :], other=0.0)
    else:
        return _shrink(x_ptr, u_ptr, shift_ptr, rows, row_mask, c, DX, R, tl.zeros_like(like), BLOCK_K, BLOCK_R)


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
    BLOCK_R: tl.constexpr,
):
    """dg[q] = dout.mu_y[c] + dS.z for one block of condition-sorted pairs."""
    pid = tl.program_id(0)
    c = tl.load(block_cond_ptr + pid)
    start = tl.load(block_start_ptr + pid)
    end = tl.load(block_end_ptr + pid)
    if start < end:
        q, rows, mask = _pairs(order_ptr, start + tl.arange(0, BLOCK_M), end, K)
        zero = tl.zeros((BLOCK_M, BLOCK_R), dtype=dg_ptr.dtype.element_ty)
        ds = _dz_tile(dout_ptr, v_ptr, rows, mask, c, DY, R, zero, BLOCK_M, BLOCK_N, BLOCK_R)
        z = _z_tile(x_ptr, u_ptr, shift_ptr, z_ptr, rows, q, mask, c, DX, R, zero, SAVED_Z, BLOCK_K, BLOCK_R)
        dg = tl.sum(ds * z, axis=1)
        for n0 in range(0, DY, BLOCK_N):
            ns = n0 + tl.arange(0, BLOCK_N)
            n_mask = ns < DY
            d = tl.load(dout_ptr + rows[:, None] * DY + ns[None, :], mask=mask[:, None] & n_mask[None, :], other=0.0)
            muy = tl.load(muy_ptr + c * DY + ns, mask=n_mask, other=0.0)
            dg += tl.sum(d * muy[None, :], axis=1)
        tl.store(dg_ptr + q, dg, mask=mask)


@triton.jit
def _dparams_x_kernel(
    dout_ptr, x_ptr, u_ptr, v_ptr, mux_ptr, gates_ptr, dlogit_ptr, order_ptr, seg_ptr,
    du_ptr, dmux_ptr, dw_ptr, db_ptr,
    K, C, DX, DY, R,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DX: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Condition c, columns tile of dx: dU_c, dmu_x[c], dW_g[:, c] (and db_g[c]) over all of c's pairs."""
    c = tl.program_id(0)
    pid_k = tl.program_id(1)
    ks = pid_k * BLOCK_DX + tl.arange(0, BLOCK_DX)
    k_mask = ks < DX
    rs = tl.arange(0, BLOCK_R)
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
        dz = g[:, None] * _dz_tile(dout_ptr, v_ptr, rows, mask, c, DY, R, g, BLOCK_M, BLOCK_N, BLOCK_R)
        x = tl.load(x_ptr + rows[:, None] * DX + ks[None, :], mask=mask[:, None] & k_mask[None, :], other=0.0)
        du += tl.dot(tl.trans(x), dz)
        dz_sum += tl.sum(dz, axis=0)
        dw += tl.sum(x * dl[:, None], axis=0)
        db += dl
    # sum (x - mu_x)^T dz = sum x^T dz - mu_x^T (sum dz); sum dz U_c^T = U_c (sum dz)
    mux = tl.load(mux_ptr + c * DX + ks, mask=k_mask, other=0.0)
    u = tl.load(u_ptr + c * DX * R + ks[:, None] * R + rs[None, :], mask=k_mask[:, None] & r_mask[None, :], other=0.0)
    du -= mux[:, None] * dz_sum[None, :]
    tl.store(du_ptr + c * DX * R + ks[:, None] * R + rs[None, :], du, mask=k_mask[:, None] & r_mask[None, :])
    tl.store(dmux_ptr + c * DX + ks, -tl.sum(u * dz_sum[None, :], axis=1), mask=k_mask)
    tl.store(dw_ptr + ks * C + c, dw, mask=k_mask)
    if pid_k == 0:
        tl.store(db_ptr + c, tl.sum(db, axis=0))


@triton.jit
def _dparams_y_kernel(
    dout_ptr, x_ptr, u_ptr, shift_ptr, z_ptr, gates_ptr, order_ptr, seg_ptr, dv_ptr, dmuy_ptr,
    K, DX, DY, R,
    SAVED_Z: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Condition c, column tile of dy: dV_c = sum (g z)^T dout and dmu_y[c] = sum g dout over c's pairs."""
    c = tl.program_id(0)
    ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = ns < DY
    rs = tl.arange(0, BLOCK_R)
    seg0 = tl.load(seg_ptr + c)
    seg1 = tl.load(seg_ptr + c + 1)
    dt = dv_ptr.dtype.element_ty
    dv = tl.zeros((BLOCK_R, BLOCK_N), dtype=dt)
    dmuy = tl.zeros((BLOCK_N,), dtype=dt)
    for p0 in range(seg0, seg1, BLOCK_M):
        q, rows, mask = _pairs(order_ptr, p0 + tl.arange(0, BLOCK_M), seg1, K)
        g = tl.load(gates_ptr + q, mask=mask, other=0.0)
        z = _z_tile(x_ptr, u_ptr, shift_ptr, z_ptr, rows, q, mask, c, DX, R,
                    tl.zeros((BLOCK_M, BLOCK_R), dtype=dt), SAVED_Z, BLOCK_K, BLOCK_R)
        d = tl.load(dout_ptr + rows[:, None] * DY + ns[None, :], mask=mask[:, None] & n_mask[None, :], other=0.0)
        dv += tl.dot(tl.trans(z * g[:, None]), d)
        dmuy += tl.sum(d * g[:, None], axis=0)
    tl.store(dv_ptr + c * R * DY + rs[:, None] * DY + ns[None, :], dv, mask=(rs < R)[:, None] & n_mask[None, :])
    tl.store(dmuy_ptr + c * DY + ns, dmuy, mask=n_mask)


@triton.jit
def _dx_dense_kernel(
    dout_ptr, w_ptr, u_ptr, v_ptr, gates_ptr, dlogit_ptr, dx_ptr,
    N, DX, DY, C, R,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DX: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Dense dx tile = dlogit W_g^T + sum_c g_c dS_c U_c^T, accumulated over c in registers."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    ks = tl.program_id(1) * BLOCK_DX + tl.arange(0, BLOCK_DX)
    k_mask = ks < DX
    cols = tl.arange(0, BLOCK_C)
    col_mask = cols < C
    rs = tl.arange(0, BLOCK_R)
    r_mask = rs < R
    dl = tl.load(dlogit_ptr + rows[:, None] * C + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0)
    wt = tl.load(w_ptr + ks[None, :] * C + cols[:, None], mask=col_mask[:, None] & k_mask[None, :], other=0.0)
    acc = tl.dot(dl, wt)
    for c in range(0, C):
        g = tl.load(gates_ptr + rows * C + c, mask=row_mask, other=0.0)
        dz = g[:, None] * _dz_tile(dout_ptr, v_ptr, rows, row_mask, c, DY, R, g, BLOCK_M, BLOCK_N, BLOCK_R)
        ut = tl.load(u_ptr + c * DX * R + ks[None, :] * R + rs[:, None], mask=r_mask[:, None] & k_mask[None, :],
                     other=0.0)
        acc += tl.dot(dz, ut)
    tl.store(dx_ptr + rows[:, None] * DX + ks[None, :], acc, mask=row_mask[:, None] & k_mask[None, :])


@triton.jit
def _dx_routed_kernel(
    dout_ptr, w_ptr, u_ptr, v_ptr, gates_ptr, dlogit_ptr, order_ptr, block_cond_ptr, block_start_ptr,
    block_end_ptr, dx_ptr,
    slot, K, DX, DY, C, R,
    ACCUMULATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DX: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Routed, slot `slot`: dx[rows, tile] (+)= g dS U_c^T + dlogit W_g[:, c]^T for a block of condition-c rows."""
    pid = tl.program_id(0)
    c = tl.load(block_cond_ptr + pid)
    start = tl.load(block_start_ptr + pid)
    end = tl.load(block_end_ptr + pid)
    if start < end:
        pos = start + tl.arange(0, BLOCK_M)
        row_mask = pos < end
        rows = tl.load(order_ptr + pos, mask=row_mask, other=0)
        ks = tl.program_id(1) * BLOCK_DX + tl.arange(0, BLOCK_DX)
        k_mask = ks < DX
        rs = tl.arange(0, BLOCK_R)
        g = tl.load(gates_ptr + rows * K + slot, mask=row_mask, other=0.0)
        dl = tl.load(dlogit_ptr + rows * K + slot, mask=row_mask, other=0.0)
        dz = g[:, None] * _dz_tile(dout_ptr, v_ptr, rows, row_mask, c, DY, R, g, BLOCK_M, BLOCK_N, BLOCK_R)
        ut = tl.load(u_ptr + c * DX * R + ks[None, :] * R + rs[:, None], mask=(rs < R)[:, None] & k_mask[None, :],
                     other=0.0)
        w = tl.load(w_ptr + ks * C + c, mask=k_mask, other=0.0)
        acc = tl.dot(dz, ut) + dl[:, None] * w[None, :]
        ptrs = dx_ptr + rows[:, None] * DX + ks[None, :]
        mask = row_mask[:, None] & k_mask[None, :]
        if ACCUMULATE:
            acc += tl.load(ptrs, mask=mask, other=0.0)
        tl.store(ptrs, acc, mask=mask)


def gated_stitch_backward_forward(grad_out, x, gate_weight, gate_bias, U, V, mu_x, mu_y, gates, index, z,
                                  top_k=None, temperature=1.0):
    """Launcher with the gated_stitch_backward schema; returns (dx, dW_g, db_g, dU, dV, dmu_x, dmu_y)."""
    like = (x, gate_weight, gate_bias, U, V, mu_x, mu_y)
    ct = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    dout, x, W, b, U, V, mu_x, mu_y = (t.to(ct).contiguous() for t in (grad_out, *like))
    N, DX = x.shape
    C, _, R = U.shape
    DY = V.shape[2]
    dense = top_k is None
    if not dense and not 1 <= top_k <= C:
        raise ValueError(f"top_k must lie in [1, {C}], got {top_k}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
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
    BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R = 32, _block(DY, hi=64), _block(DX, hi=64), _block(R)
    BLOCK_DX, BLOCK_C = _block(DX, hi=64), _block(C, hi=1024)

    # Every (row, slot) pair, sorted by condition: blocks for per-pair work, segments per condition.
    flat = index.reshape(-1)
    order, cond, start, end = _condition_blocks(flat, C, BLOCK_M)
    seg = torch.zeros(C + 1, dtype=torch.int64, device=x.device)
    seg[1:] = torch.cumsum(torch.bincount(flat, minlength=C), 0)
    zz = z if not dense else dout  # a placeholder pointer: never read when z is recomputed

    dg = torch.empty(N, K, dtype=ct, device=x.device)
    _dgate_kernel[(cond.shape[0],)](dout, x, U, V, shift, mu_y, zz, order, cond, start, end, dg, K, DX, DY, R,
                                    SAVED_Z=not dense, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
                                    BLOCK_R=BLOCK_R)
    # Softmax over the selected logits: an (N, K) elementwise step between the two passes.
    dlogit = (gates * (dg - (gates * dg).sum(1, keepdim=True)) / temperature).contiguous()

    _dparams_x_kernel[(C, triton.cdiv(DX, BLOCK_DX))](dout, x, U, V, mu_x, gates, dlogit, order, seg, dU, dmu_x, dW,
                                                      db, K, C, DX, DY, R, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                                                      BLOCK_DX=BLOCK_DX, BLOCK_R=BLOCK_R)
    _dparams_y_kernel[(C, triton.cdiv(DY, BLOCK_N))](dout, x, U, shift, zz, gates, order, seg, dV, dmu_y, K, DX, DY,
                                                     R, SAVED_Z=not dense, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                                                     BLOCK_K=BLOCK_K, BLOCK_R=BLOCK_R)
    if dense:
        grid = (triton.cdiv(N, BLOCK_M), triton.cdiv(DX, BLOCK_DX))
        _dx_dense_kernel[grid](dout, W, U, V, gates, dlogit, dx, N, DX, DY, C, R, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                               BLOCK_DX=BLOCK_DX, BLOCK_C=BLOCK_C, BLOCK_R=BLOCK_R)
    else:  # one launch per slot: a row appears once per slot, so slots add in a fixed order, no atomics
        for s in range(K):
            o, cs, st, en = _condition_blocks(index[:, s].contiguous(), C, BLOCK_M)
            _dx_routed_kernel[(cs.shape[0], triton.cdiv(DX, BLOCK_DX))](
                dout, W, U, V, gates, dlogit, o, cs, st, en, dx, s, K, DX, DY, C, R, ACCUMULATE=s > 0,
                BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_DX=BLOCK_DX, BLOCK_R=BLOCK_R)
    return tuple(gr.to(t.dtype) for gr, t in zip(grads, like))
