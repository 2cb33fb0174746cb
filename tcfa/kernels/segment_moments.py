"""Triton kernel of tcfa::segment_moments (math in tcfa/ops/__init__.py: segment_moments).

A grouped GEMM over label-sorted segments: program (c, i, j) computes the
(i, j) BLOCK_M x BLOCK_N tile of segment c's co-moment block

    S_c[m, n] = sum_{i in S_c} (a_i[m] - mean_a[c, m]) (b_i[n] - mean_b[c, n]),

reading segment c's rows through the label-sorted permutation (no gathered
copy of x or y) and centering them while they are loaded. The launcher
computes counts, the permutation and fp64 means with torch ops.

Accuracy: tl.dot runs with input_precision="ieee". With TF32 (the GPU
default) the 10-bit mantissa would cost ~1e-3 relative error in the
co-moments, which CCA's whitening then amplifies. The interpreter's fp32
dot is exact IEEE, so CPU tests and an H100 should agree to fp32 rounding.
"""
import torch
import triton
import triton.language as tl

from ..ops import _validate
from ._ragged import launch_device, width_tiles


@triton.jit
def _segment_moments_kernel(
    A_ptr,
    A_stride,
    MeanA_ptr,
    B_ptr,
    B_stride,
    MeanB_ptr,
    Perm_ptr,
    Offsets_ptr,
    Out_ptr,
    da,
    db,
    ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    c = tl.program_id(0).to(tl.int64)  # axis 0: up to 2^31 - 1 programs (axes 1 and 2 stop at 65,535)
    cols_a = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols_b = tl.program_id(2).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_a = cols_a < da
    in_b = cols_b < db
    mean_a = tl.load(MeanA_ptr + c * da + cols_a, mask=in_a, other=0.0)
    mean_b = tl.load(MeanB_ptr + c * db + cols_b, mask=in_b, other=0.0)

    start = tl.load(Offsets_ptr + c)
    end = tl.load(Offsets_ptr + c + 1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k0 in range(start, end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        in_k = ks < end
        rows = tl.load(Perm_ptr + ks, mask=in_k, other=0)
        mask_a = in_k[:, None] & in_a[None, :]
        mask_b = in_k[:, None] & in_b[None, :]
        a = tl.load(A_ptr + rows[:, None] * A_stride + cols_a[None, :], mask=mask_a, other=0.0)
        b = tl.load(B_ptr + rows[:, None] * B_stride + cols_b[None, :], mask=mask_b, other=0.0)
        # padded rows/columns must contribute 0, not -mean
        a = tl.where(mask_a, a - mean_a[None, :], 0.0)
        b = tl.where(mask_b, b - mean_b[None, :], 0.0)
        acc += tl.dot(tl.trans(a), b, input_precision="ieee")

    out = Out_ptr + c * da * db + cols_a[:, None] * db + cols_b[None, :]
    tl.store(out, acc, mask=in_a[:, None] & in_b[None, :])


def _block(d: int) -> int:
    # tl.dot needs tiles of at least 16; 64 keeps an fp32 64x64 accumulator in registers
    return min(64, max(16, triton.next_power_of_2(d)))


def _co_moments(a, mean_a, b, mean_b, perm, offsets, num_segments):
    C, da, db = num_segments, a.shape[1], b.shape[1]
    BLOCK_M, BLOCK_N = _block(da), _block(db)
    grid = (C, width_tiles("x and y (each)", da, BLOCK_M), width_tiles("x and y (each)", db, BLOCK_N))
    out = torch.empty(C, da, db, dtype=a.dtype, device=a.device)
    if da == 0 or db == 0:
        return out
    _segment_moments_kernel[grid](
        a,
        a.stride(0),
        mean_a,
        b,
        b.stride(0),
        mean_b,
        perm,
        offsets,
        out,
        da,
        db,
        ACC_DTYPE=tl.float64 if a.dtype == torch.float64 else tl.float32,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        BLOCK_K=32,
    )
    return out


def segment_moments_forward(x, y, labels, num_segments, xx=True, yy=True, xy=True):
    """torch.ops.tcfa.segment_moments for CUDA tensors (and CPU tensors under TRITON_INTERPRET=1)."""
    x, y = _validate.paired_rows(x, y)
    _validate.integer("num_segments", num_segments, 1)
    labels = _validate.labels("labels", labels, x.shape[0], num_segments)
    with launch_device(x=x, y=y, labels=labels):
        return _segment_moments(x, y, labels, num_segments, xx, yy, xy)


def _segment_moments(x, y, labels, num_segments, xx, yy, xy):
    ct = _validate.compute_dtype(x.dtype)
    x, y = x.to(ct).contiguous(), y.to(ct).contiguous()
    C = num_segments

    count = torch.bincount(labels, minlength=C)
    perm = torch.argsort(labels, stable=True)
    offsets = torch.zeros(C + 1, dtype=torch.int64, device=x.device)
    offsets[1:] = torch.cumsum(count, 0)
    # fp64 means: the shift that keeps a large common offset from cancelling
    n = count.clamp_min(1).to(torch.float64)[:, None]
    mean_x = torch.zeros(C, x.shape[1], dtype=torch.float64, device=x.device).index_add_(0, labels, x.double()) / n
    mean_y = torch.zeros(C, y.shape[1], dtype=torch.float64, device=x.device).index_add_(0, labels, y.double()) / n
    shift_x, shift_y = mean_x.to(ct), mean_y.to(ct)
    # sum (a - shift_a)(b - shift_b)^T = S + n delta_a delta_b^T, delta = mean - shift: the rank-one
    # residue of rounding the fp64 means to ct, removed as the C++ kernel does. Without it a common
    # offset of 1e4 with spread 1e-2 left a relative error of 1.7e-3 in fp32 (zero in fp64).
    nd = count.to(torch.float64)[:, None]
    delta_x, delta_y = mean_x - shift_x.double(), mean_y - shift_y.double()

    def block(on, a, ma, da, b, mb, db):
        if not on:
            return x.new_empty(C, 0, 0)
        s = _co_moments(a, ma, b, mb, perm, offsets, C)
        if ct != torch.float64 and s.shape[1] and s.shape[2]:
            s = s - ((nd * da)[:, :, None] * db[:, None, :]).to(ct)
        return s

    return (
        count,
        shift_x,
        shift_y,
        block(xx, x, shift_x, delta_x, x, shift_x, delta_x),
        block(yy, y, shift_y, delta_y, y, shift_y, delta_y),
        block(xy, x, shift_x, delta_x, y, shift_y, delta_y),
    )
