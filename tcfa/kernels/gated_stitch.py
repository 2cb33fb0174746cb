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

Any rank and any number of conditions: the kernels loop over R in BLOCK_R chunks
and over C in BLOCK_C chunks (an online softmax for the dense gates, a running
top-k merge for the routed ones). Addresses are int64 (program ids, condition
indices). Dot precision: kernels/_precision.py (gate logits IEEE; shrink and
expand follow torch's fp32 matmul setting).

Tested on CPU tensors under TRITON_INTERPRET=1 (exact fp32 dot products there).
"""
import torch
import triton
import triton.language as tl

from ..ops import _validate
from . import _precision as precision
from ._precision import mma
from ._ragged import launch_device, width_tiles


@triton.jit
def _gate_logits(x_ptr, w_ptr, b_ptr, rows, row_mask, c0, DX, C, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
    """(BLOCK_M, BLOCK_C) logits x W_g + b_g of conditions c0 + [0, BLOCK_C); columns >= C are -inf.

    IEEE dots whatever the stitch's policy: routing and the softmax act on these (kernels/_precision.py).
    Offsets k C and k R in int64: int32 wraps once dx C reaches 2^31 (found by reading, by an audit).
    """
    cols = c0 + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    logits = tl.zeros((rows.shape[0], BLOCK_C), dtype=tl.float32 if x_ptr.dtype.element_ty != tl.float64 else tl.float64)
    for k0 in range(0, DX, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < DX
        x = tl.load(x_ptr + rows[:, None] * DX + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptr + ks.to(tl.int64)[:, None] * C + cols[None, :], mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        logits = tl.dot(x, w, logits, input_precision="ieee")
    b = tl.load(b_ptr + cols, mask=col_mask, other=0.0)
    return tl.where(col_mask[None, :], logits + b[None, :], float("-inf"))


@triton.jit
def _shrink(x_ptr, u_ptr, shift_ptr, rows, row_mask, c, r0, DX, R, acc, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
            PRECISION: tl.constexpr):
    """(BLOCK_M, BLOCK_R) z = x U_c - mu_x[c] U_c for ranks r0 + [0, BLOCK_R), accumulated into the zero tile `acc`.

    c must be int64: c DX R is an address past 2^31 once U holds that many values.
    """
    rs = r0 + tl.arange(0, BLOCK_R)
    r_mask = rs < R
    for k0 in range(0, DX, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < DX
        x = tl.load(x_ptr + rows[:, None] * DX + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        u = tl.load(u_ptr + c * DX * R + ks.to(tl.int64)[:, None] * R + rs[None, :], mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        acc = mma(x, u, acc, PRECISION)
    shift = tl.load(shift_ptr + c * R + rs, mask=r_mask, other=0.0)
    return acc - shift[None, :]


@triton.jit
def _condition_block(block_cond_ptr, block_start_ptr, block_end_ptr):
    """This program's row of a _condition_blocks table: condition c and the range [start, end) of order (int64)."""
    pid = tl.program_id(0).to(tl.int64)
    return tl.load(block_cond_ptr + pid), tl.load(block_start_ptr + pid), tl.load(block_end_ptr + pid)


@triton.jit
def _gate_softmax_stats(x_ptr, w_ptr, b_ptr, inv_tau, rows, row_mask, DX, C, BLOCK_K: tl.constexpr,
                        BLOCK_C: tl.constexpr):
    """Row max and sum of exp(logit / tau - max) over all C conditions, BLOCK_C at a time (online softmax)."""
    run_max = tl.full((rows.shape[0],), float("-inf"), dtype=inv_tau.dtype)
    run_sum = tl.zeros((rows.shape[0],), dtype=inv_tau.dtype)
    for c0 in range(0, C, BLOCK_C):
        logits = _gate_logits(x_ptr, w_ptr, b_ptr, rows, row_mask, c0, DX, C, BLOCK_K, BLOCK_C) * inv_tau
        new_max = tl.maximum(run_max, tl.max(logits, axis=1))  # finite: every block holds one real column
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
        run_max = new_max
    return run_max, run_sum


@triton.jit
def _gated_stitch_kernel(
    x_ptr, w_ptr, b_ptr, u_ptr, v_ptr, shift_ptr, muy_ptr, out_ptr, gates_ptr, inv_tau_ptr,
    N, DX, DY, C, R,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Dense mode, one (BLOCK_M, BLOCK_N) tile of out; gates are written by the first column tile.

    Two sweeps over the conditions, BLOCK_C at a time: the softmax statistics, then per block the
    gates and, per condition, the rank in BLOCK_R chunks. Any C and R; registers hold one chunk.
    """
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = ns < DY
    inv_tau = tl.load(inv_tau_ptr)  # in the compute dtype: a Python float would reach the kernel as fp32

    run_max, run_sum = _gate_softmax_stats(x_ptr, w_ptr, b_ptr, inv_tau, rows, row_mask, DX, C, BLOCK_K, BLOCK_C)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=inv_tau.dtype)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_mask = cols < C
        logits = _gate_logits(x_ptr, w_ptr, b_ptr, rows, row_mask, c0, DX, C, BLOCK_K, BLOCK_C) * inv_tau
        gates = tl.exp(logits - run_max[:, None]) / run_sum[:, None]  # padded columns: exp(-inf) = 0
        if pid_n == 0:
            tl.store(gates_ptr + rows[:, None] * C + cols[None, :], gates, mask=row_mask[:, None] & col_mask[None, :])
        # sum_c g_c mu_y[c] for this column tile, then each condition's low-rank term
        muy = tl.load(muy_ptr + cols[:, None].to(tl.int64) * DY + ns[None, :],
                      mask=col_mask[:, None] & n_mask[None, :], other=0.0)
        acc = mma(gates, muy, acc, PRECISION)
        for cj in range(c0, tl.minimum(c0 + BLOCK_C, C)):
            c = tl.cast(cj, tl.int64)
            g_c = tl.sum(tl.where(cols[None, :] == c, gates, 0.0), axis=1)
            for r0 in range(0, R, BLOCK_R):
                rs = r0 + tl.arange(0, BLOCK_R)
                z = _shrink(x_ptr, u_ptr, shift_ptr, rows, row_mask, c, r0, DX, R,
                            tl.zeros((BLOCK_M, BLOCK_R), dtype=acc.dtype), BLOCK_K, BLOCK_R, PRECISION)
                v = tl.load(v_ptr + c * R * DY + rs[:, None] * DY + ns[None, :],
                            mask=(rs < R)[:, None] & n_mask[None, :], other=0.0)
                acc = mma(z * g_c[:, None], v, acc, PRECISION)
    tl.store(out_ptr + rows[:, None] * DY + ns[None, :], acc, mask=row_mask[:, None] & n_mask[None, :])


@triton.jit
def _gate_topk_kernel(
    x_ptr, w_ptr, b_ptr, gates_ptr, index_ptr, inv_tau_ptr,
    N, DX, C,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_TOPK: tl.constexpr,
):
    """Routed mode: the top-k logits of each row, largest first (ties: lower index), and their softmax.

    The conditions stream through in BLOCK_C chunks; each chunk is merged into the running top-k
    (best, which). On a tie the running list wins: it holds only lower condition indices.
    """
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    slots = tl.arange(0, BLOCK_TOPK)
    lane = tl.arange(0, BLOCK_C)
    inv_tau = tl.load(inv_tau_ptr)
    best = tl.full((BLOCK_M, BLOCK_TOPK), float("-inf"), dtype=inv_tau.dtype)
    which = tl.zeros((BLOCK_M, BLOCK_TOPK), dtype=tl.int64)
    for c0 in range(0, C, BLOCK_C):
        work = _gate_logits(x_ptr, w_ptr, b_ptr, rows, row_mask, c0, DX, C, BLOCK_K, BLOCK_C)
        merged = tl.full((BLOCK_M, BLOCK_TOPK), float("-inf"), dtype=inv_tau.dtype)
        merged_which = tl.zeros((BLOCK_M, BLOCK_TOPK), dtype=tl.int64)
        for j in tl.static_range(TOP_K):
            top_best = tl.max(best, axis=1)
            top_work = tl.max(work, axis=1)
            from_best = top_best >= top_work
            slot = tl.min(tl.where(best == top_best[:, None], slots[None, :], BLOCK_TOPK), axis=1)
            lane_j = tl.min(tl.where(work == top_work[:, None], lane[None, :], BLOCK_C), axis=1)
            index_best = tl.sum(tl.where(slots[None, :] == slot[:, None], which, 0), axis=1)
            value = tl.where(from_best, top_best, top_work)
            index = tl.where(from_best, index_best, c0 + lane_j.to(tl.int64))
            merged = tl.where(slots[None, :] == j, value[:, None], merged)
            merged_which = tl.where(slots[None, :] == j, index[:, None], merged_which)
            best = tl.where(from_best[:, None] & (slots[None, :] == slot[:, None]), float("-inf"), best)
            work = tl.where(~from_best[:, None] & (lane[None, :] == lane_j[:, None]), float("-inf"), work)
        best, which = merged, merged_which
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
    BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):
    """Routed mode, slot `slot`: one block of condition-sorted rows x one column tile of out, any rank."""
    pid_n = tl.program_id(1).to(tl.int64)
    c, start, end = _condition_block(block_cond_ptr, block_start_ptr, block_end_ptr)
    if start < end:  # the block table is padded to an upper bound of the block count
        pos = start + tl.arange(0, BLOCK_M)
        row_mask = pos < end
        rows = tl.load(order_ptr + pos, mask=row_mask, other=0)
        ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = ns < DY
        g = tl.load(gates_ptr + rows * TOP_K + slot, mask=row_mask, other=0.0)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=g.dtype)
        for r0 in range(0, R, BLOCK_R):
            rs = r0 + tl.arange(0, BLOCK_R)
            r_mask = rs < R
            z = _shrink(x_ptr, u_ptr, shift_ptr, rows, row_mask, c, r0, DX, R,
                        tl.zeros((BLOCK_M, BLOCK_R), dtype=g.dtype), BLOCK_K, BLOCK_R, PRECISION)
            if pid_n == 0:  # kept for the backward
                tl.store(z_ptr + (rows[:, None] * TOP_K + slot) * R + rs[None, :], z,
                         mask=row_mask[:, None] & r_mask[None, :])
            v = tl.load(v_ptr + c * R * DY + rs[:, None] * DY + ns[None, :], mask=r_mask[:, None] & n_mask[None, :],
                        other=0.0)
            acc = mma(z, v, acc, PRECISION)
        muy = tl.load(muy_ptr + c * DY + ns, mask=n_mask, other=0.0)
        acc = g[:, None] * (acc + muy[None, :])
        out_ptrs = out_ptr + rows[:, None] * DY + ns[None, :]
        mask = row_mask[:, None] & n_mask[None, :]
        if ACCUMULATE:
            acc += tl.load(out_ptrs, mask=mask, other=0.0)
        tl.store(out_ptrs, acc, mask=mask)


# Tile caps. Rank and conditions loop in chunks of these, so any R and C work; the caps keep one
# chunk in registers/shared memory on an H100 (the (BLOCK_M, BLOCK_C) gate tile was 64 x 1024 fp32
# before the loop, more than the 227 KB of shared memory with 3 pipeline stages).
BLOCK_M = 32
MAX_BLOCK_C = 64
MAX_BLOCK_R = 64
# Output tiles and warps from the sm_90 compile (make compile-check, N 8192, 768 -> 768, C 64, r 32,
# fp32): the dense kernel with 128-wide output tiles at 4 warps spilled 6.5 KB per thread, with
# 64-wide tiles at 8 warps 1.1 KB; the routed kernel 3.2 KB -> 36 B; the backward kernels spill
# nothing at 8 warps (up to 568 B at 4) except the dense dx kernel (264 B at 4, 344 at 8: it keeps 4).
MAX_BLOCK_N = 64
STITCH_WARPS = 8


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
    like = dict(x=x, gate_weight=gate_weight, gate_bias=gate_bias, U=U, V=V, mu_x=mu_x, mu_y=mu_y)
    with launch_device(**like):
        ct = _validate.compute_dtype(dtype)
        x, W, b, U, V, mu_x, mu_y = (t.to(ct).contiguous() for t in like.values())
        N, DX = x.shape
        C, _, R = U.shape
        DY = V.shape[2]
        check_routing(top_k, temperature, C)
        shift = torch.bmm(mu_x.unsqueeze(1), U).squeeze(1).contiguous()  # (C, R): mu_x[c] U_c
        inv_tau = torch.tensor([1.0 / temperature], dtype=ct, device=x.device)
        out = torch.empty(N, DY, dtype=ct, device=x.device)
        tiles = dict(BLOCK_M=BLOCK_M, BLOCK_K=_block(DX, hi=64), BLOCK_C=_block(C, hi=MAX_BLOCK_C))
        bulk = dict(BLOCK_N=_block(DY, hi=MAX_BLOCK_N), BLOCK_R=_block(R, hi=MAX_BLOCK_R),
                    PRECISION=precision.stitch(ct), num_warps=STITCH_WARPS)
        # at least one column tile, so that dy = 0 still writes the gates (and z)
        n_tiles = max(1, width_tiles("mu_y (dy)", DY, bulk["BLOCK_N"]))
        if top_k is None:
            gates = torch.empty(N, C, dtype=ct, device=x.device)
            _gated_stitch_kernel[(triton.cdiv(N, BLOCK_M), n_tiles)](
                x, W, b, U, V, shift, mu_y, out, gates, inv_tau, N, DX, DY, C, R, **tiles, **bulk)
            index = torch.empty(N, 0, dtype=torch.int64, device=x.device)
            z = torch.empty(N, 0, R, dtype=ct, device=x.device)
            return out.to(dtype), gates, index, z

        gates = torch.empty(N, top_k, dtype=ct, device=x.device)
        index = torch.empty(N, top_k, dtype=torch.int64, device=x.device)
        z = torch.empty(N, top_k, R, dtype=ct, device=x.device)
        _gate_topk_kernel[(triton.cdiv(N, BLOCK_M),)](x, W, b, gates, index, inv_tau, N, DX, C, TOP_K=top_k, **tiles,
                                                      BLOCK_TOPK=triton.next_power_of_2(top_k),
                                                      num_warps=STITCH_WARPS)
        for s in range(top_k):
            order, cond, start, end = _condition_blocks(index[:, s].contiguous(), C, BLOCK_M)
            _gated_stitch_routed_kernel[(cond.shape[0], n_tiles)](
                x, U, V, shift, mu_y, gates, order, cond, start, end, out, z, s, DX, DY, C, R, top_k,
                ACCUMULATE=s > 0, BLOCK_M=BLOCK_M, BLOCK_K=tiles["BLOCK_K"], **bulk)
        return out.to(dtype), gates, index, z
