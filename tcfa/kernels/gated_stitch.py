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

Backward: tcfa/kernels/gated_stitch_backward.py.

Tested on CPU tensors under TRITON_INTERPRET=1 (exact fp32 dot products there);
on a GPU, fp32 tl.dot uses TF32, so expect about 1e-3 relative error.
"""
import torch
import triton
import triton.language as tl

from ..ops import _validate


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
def _condition_block(block_cond_ptr, block_start_ptr, block_end_ptr):
    """This program's row of a _condition_blocks table: condition c and the range [start, end) of order."""
    pid = tl.program_id(0)
    return tl.load(block_cond_ptr + pid), tl.load(block_start_ptr + pid), tl.load(block_end_ptr + pid)


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
    pid_n = tl.program_id(1)
    c, start, end = _condition_block(block_cond_ptr, block_start_ptr, block_end_ptr)
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


def check_routing(top_k, temperature, C: int) -> None:
    """What a direct launcher call needs of top_k (None or in [1, C]) and the temperature (> 0)."""
    if top_k is not None and not 1 <= top_k <= C:
        raise ValueError(f"top_k must lie in [1, {C}], got {top_k}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def gated_stitch_forward(x, gate_weight, gate_bias, U, V, mu_x, mu_y, top_k=None, temperature=1.0):
    """Launcher with the op's signature; returns (out, gates, index, z) like the C++ kernel."""
    dtype = x.dtype
    ct = _validate.compute_dtype(dtype)
    x, W, b, U, V, mu_x, mu_y = (t.to(ct).contiguous() for t in (x, gate_weight, gate_bias, U, V, mu_x, mu_y))
    N, DX = x.shape
    C, _, R = U.shape
    DY = V.shape[2]
    check_routing(top_k, temperature, C)
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
