"""Host-side pieces shared by the Triton launchers: bounds checks and block tables.

The ragged convention and its block tables are tcfa/ragged.py's; a launcher covers the whole
batch with ONE launch, program p of the grid working on row p of the block table, whose header
every ragged kernel reads with :func:`block_header`.

The public API validates everything once (tcfa/ops/_validate.py). The checks here
are only what a direct launcher call needs so a kernel can never read or write
out of bounds -- the same cheap checks the C++ kernels make (csrc/cpu/checks.h).
"""
from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

from ..ops import _validate

LOG2E = 1.4426950408889634  # log2(e): the kernels use exp2/log2 (see softmin.py)
LN2 = 0.6931471805599453


# ---------------------------------------------------------------- checks
# The argument checks are tcfa/ops/_validate.py's, shared with every backend; the
# launchers only add what a kernel needs (host copies of offsets, block tables).
# CUDA grids stop at 65,535 programs on axes 1 and 2 (axis 0 reaches 2^31 - 1)
MAX_GRID_YZ = 65535


def width_tiles(name: str, width: int, block: int) -> int:
    """cdiv(width, block): the programs a width takes on grid axis 1 or 2, checked against CUDA's
    limit there, so a too-wide input is refused by name instead of failing the launch."""
    tiles = triton.cdiv(width, block)
    if tiles > MAX_GRID_YZ:
        raise ValueError(f"{name} is {width} wide: the Triton kernel tiles it by {block} on a grid axis that "
                         f"stops at {MAX_GRID_YZ} programs, so at most {MAX_GRID_YZ * block}")
    return tiles


def launch_device(**tensors):
    """The device guard of a launch: tensors on one device (a named error otherwise), made current.

    Triton launches on the current CUDA device; tensors on cuda:1 while cuda:0 is current would
    be read through the wrong context (an illegal memory access), so every launcher enters this.
    """
    _validate.same_device(**tensors)
    device = next((t.device for t in tensors.values() if isinstance(t, torch.Tensor)), None)
    if device is not None and device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def check_offsets(name: str, off, n_rows: int) -> torch.Tensor:
    """int64 (B+1,) offsets starting at 0, non-decreasing, ending at n_rows; returned on the CPU."""
    return _validate.offsets(name, off, n_rows, "cpu")


def check_pair(x_offsets, n_x: int, y_offsets, n_y: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Both offsets checked, on the CPU, describing the same number of problems."""
    xo = check_offsets("x_offsets", x_offsets, n_x)
    yo = check_offsets("y_offsets", y_offsets, n_y)
    if xo.numel() != yo.numel():
        raise ValueError("x_offsets and y_offsets must describe the same number of problems, "
                         f"got {xo.numel() - 1} and {yo.numel() - 1}")
    return xo, yo


def check_points(x, y) -> None:
    """x (N, d) and y (M, d) of one floating dtype."""
    _validate.tensor("x", x, dim=2, finite=False)
    _validate.tensor("y", y, dim=2, finite=False)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same width, got {x.shape[1]} and {y.shape[1]}")
    _validate.same_dtype(x=x, y=y)


def check_vector(name: str, t) -> None:
    """A 1-D floating-point tensor."""
    _validate.tensor(name, t, dim=1, finite=False)


def check_rows(name: str, t, n: int) -> None:
    """A floating-point (n,) tensor: one value per row."""
    check_vector(name, t)
    if t.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")


def check_eps(eps) -> float:
    return _validate.positive("eps", eps)


def check_cost(cost) -> str:
    return _validate.choice("cost", cost, _validate.COSTS)


def problem_flags(name: str, flags, num_problems: int) -> torch.Tensor | None:
    """Optional bool (B,) per-problem flags ("active": still iterating; "symmetric"), on the CPU."""
    if flags is None:
        return None
    if not isinstance(flags, torch.Tensor) or flags.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got {getattr(flags, 'dtype', type(flags).__name__)}")
    if flags.dim() != 1 or flags.shape[0] != num_problems:
        raise ValueError(f"{name} must have shape ({num_problems},), got {tuple(flags.shape)}")
    return flags.cpu()


def check_symmetric(symmetric, xo, yo, log_a, log_b, tau_a: float, tau_b: float) -> torch.Tensor | None:
    """The symmetric flags of sinkhorn_dense, checked as csrc/cpu/checks.h's check_symmetric does."""
    sym = problem_flags("symmetric", symmetric, xo.numel() - 1)
    if sym is None or not bool(sym.any()):
        return None
    if tau_a != tau_b:
        raise ValueError(f"symmetric problems need tau_a == tau_b, got {tau_a} and {tau_b}")
    for k in torch.nonzero(sym).flatten().tolist():
        n, m = int(xo[k + 1] - xo[k]), int(yo[k + 1] - yo[k])
        if n != m:
            raise ValueError(f"symmetric problem {k} must be square, got {n} x {m}")
        if not torch.equal(log_a[int(xo[k]):int(xo[k + 1])], log_b[int(yo[k]):int(yo[k + 1])]):
            raise ValueError(f"symmetric problem {k} must have log_a equal to log_b")
    return sym


# ---------------------------------------------------------------- block tables
@triton.jit
def block_header(blocks_ptr, x_off_ptr, y_off_ptr):
    """The block of this program (row program_id(0) of a tcfa.ragged.block_table): its problem, its
    first row, and the problem's x rows [rows_start, rows_end) and y rows [cols_start, cols_end)."""
    pid = tl.program_id(0).to(tl.int64)
    problem = tl.load(blocks_ptr + 2 * pid)
    first = tl.load(blocks_ptr + 2 * pid + 1)
    rows_start, rows_end = tl.load(x_off_ptr + problem), tl.load(x_off_ptr + problem + 1)
    cols_start, cols_end = tl.load(y_off_ptr + problem), tl.load(y_off_ptr + problem + 1)
    return problem, first, rows_start, rows_end, cols_start, cols_end


def dot_block(width: int, cap: int) -> int:
    """A power-of-two tile width for a tl.dot operand: >= 16 (the tensor-core minimum), <= cap."""
    return max(16, min(cap, 1 << max(0, math.ceil(math.log2(max(width, 1))))))


# ---------------------------------------------------------------- affine rows
def affine_rows(t: torch.Tensor, cost: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and their alpha (or beta) term for C_ij = alpha_i + beta_j - gamma x_i.y_j.

    Same expressions as csrc/cpu/cost.h affine_rows, so the host prologue
    rounds exactly like the C++ op: cosine rows are normalised (alpha = beta =
    1/2, gamma = 1), sqeuclidean keeps the rows and uses squared norms (gamma = 2).
    An O(N d) pass, negligible next to the O(N M d) kernels.
    """
    if cost == "cosine":
        rows = (t / t.norm(2, dim=1, keepdim=True).clamp_min(1e-30)).contiguous()
        return rows, torch.full((t.shape[0],), 0.5, dtype=t.dtype, device=t.device)
    rows = t.contiguous()
    return rows, (rows * rows).sum(1)


def cost_gamma(cost: str) -> float:
    return 1.0 if cost == "cosine" else 2.0


def scalars(*values: float, dtype: torch.dtype, device) -> torch.Tensor:
    """Scalars passed to a kernel as a tensor of the compute dtype.

    Triton passes Python floats as fp32 kernel arguments, which would round
    gamma/eps and friends in fp64 runs; loading them from memory keeps full precision.
    """
    return torch.tensor(values, dtype=dtype, device=device)
