"""The one validation helper shared by every backend (C++, Triton, Python).

Each check raises ValueError or TypeError naming the argument and the bad
value. Public functions call these once, before any kernel runs, so nothing is
half-computed when input is bad.
"""
from __future__ import annotations

import torch

from ..ragged import Ragged

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
COSTS = ("sqeuclidean", "cosine")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype rule of every op and solver: fp16/bf16 are computed in fp32, other dtypes as they are.

    Every backend (C++, Triton, the fake kernels, the Python solvers) calls this one
    function; the wrappers' docstrings say which outputs keep the input dtype.
    """
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def tensor(name: str, t, *, dim=None, dtypes=FLOAT_DTYPES, finite: bool = True) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if dim is not None and t.dim() not in ((dim,) if isinstance(dim, int) else dim):
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    # A finite sum proves every entry finite (NaN and inf propagate) and reads t
    # once without a mask, ~20x faster than isfinite(t).all() on an 8192 x 768
    # fp32 x (one thread). Only a non-finite sum,
    # maybe mere overflow, pays for the entry-wise check. Meta tensors have no values.
    if finite and t.is_floating_point() and t.numel() and t.device.type != "meta" \
            and not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
        bad = (~torch.isfinite(t)).nonzero()[0].tolist()
        raise ValueError(f"{name} must be finite, found {t[tuple(bad)].item()} at index {tuple(bad)}")
    return t


def finite_through(name: str, t: torch.Tensor, derived: torch.Tensor) -> None:
    """Raises tensor()'s error for a non-finite entry of t, reading t only when ``derived`` is not finite.

    For a result every entry of t flows into, a finite derived sum proves t
    finite: the stitch gates from x (each gate of a row sums all of its
    products x_nk W_kc, and inf * 0 is NaN), the segment means from the rows.
    Reading x itself cost ~5% of the routed stitch forward of tcfa.bench.stitch;
    its gates are 64 KB.
    """
    if derived.numel() and derived.device.type != "meta" and not bool(torch.isfinite(derived.sum())):
        tensor(name, t)


def _mismatch(attr: str, tensors: dict):
    """(name, value, first name, first value) of the first tensor whose ``attr`` differs from the first's, or None."""
    items = [(k, getattr(v, attr)) for k, v in tensors.items() if v is not None]
    return next(((k, a, items[0][0], items[0][1]) for k, a in items[1:] if a != items[0][1]), None)


def same_device(**tensors) -> None:
    if bad := _mismatch("device", tensors):
        raise ValueError("{} is on {} but {} is on {}".format(*bad))


def same_dtype(**tensors) -> None:
    if bad := _mismatch("dtype", tensors):
        raise TypeError("{} has dtype {} but {} has {}".format(*bad))


def positive(name: str, value) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (value > 0) or value == float("inf"):
        raise ValueError(f"{name} must be > 0 and finite, got {value}")
    return float(value)


def choice(name: str, value, options) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {list(options)}, got {value!r}")
    return value


def offsets(name: str, off, n_rows: int, device) -> torch.Tensor:
    """int64 (B+1,) offsets starting at 0, non-decreasing, ending at n_rows."""
    if not isinstance(off, torch.Tensor):
        off = torch.as_tensor(off)
    if off.dtype != torch.int64:
        raise TypeError(f"{name} must be int64, got {off.dtype}")
    if off.dim() != 1 or off.numel() < 2:
        raise ValueError(f"{name} must be 1-D with B+1 >= 2 entries, got shape {tuple(off.shape)}")
    if int(off[0]) != 0:
        raise ValueError(f"{name} must start at 0, got {int(off[0])}")
    if int(off[-1]) != n_rows:
        raise ValueError(f"{name} must end at the number of rows ({n_rows}), got {int(off[-1])}")
    steps = off[1:] - off[:-1]
    if bool((steps < 0).any()):
        k = int((steps < 0).nonzero()[0]) + 1
        raise ValueError(f"{name} must be non-decreasing, got {int(off[k - 1])} then {int(off[k])} at position {k}")
    return off.to(device)


def ragged(name: str, t, off, off_name: str, *, empty_problems: bool = False) -> Ragged:
    """t as a Ragged batch: dense (B, n, d) with off None, or (N, d) rows with off (None: one problem).

    Every problem needs rows, except with ``empty_problems`` (a shard of a sharded
    batch may hold no row of a problem).
    """
    t = tensor(name, t, dim=(2, 3))
    if t.dim() == 3:
        if off is not None:
            raise ValueError(f"{off_name} must be None when {name} is a dense (B, n, d) batch")
        if t.shape[1] == 0:
            raise ValueError(f"{name} has empty problems (n = 0 rows)")
        return Ragged.from_dense(t)
    if off is None:
        return Ragged.single(t)
    off = offsets(off_name, off, t.shape[0], t.device)
    if not empty_problems and bool(((off[1:] - off[:-1]) == 0).any()):
        k = int(((off[1:] - off[:-1]) == 0).nonzero()[0])
        raise ValueError(f"{off_name} describes an empty problem at index {k}: every problem needs rows")
    return Ragged(t, off)


def weights(name: str, w, r: Ragged, *, normalise: bool = True) -> torch.Tensor:
    """Per-row non-negative weights (None: uniform), normalised to mass 1 within each problem.

    A problem whose weights are all zero is an error. ``normalise=False`` (a shard of a
    sharded batch, whose mass is global) returns the checked raw weights, ones for None.
    """
    N = r.rows.shape[0]
    # in the compute dtype: fp16 masses 1/n do not sum to 1 (1/9 is off by 3e-4), and
    # marginals of unequal mass leave balanced Sinkhorn oscillating at that error
    ct = compute_dtype(r.rows.dtype)
    if w is None:
        if not normalise:
            return torch.ones(N, dtype=ct, device=r.rows.device)
        sizes = r.sizes.to(ct)
        return (1.0 / sizes).repeat_interleave(r.sizes)
    w = tensor(name, w, dim=(1, 2))
    if r.batch_shape is not None and w.dim() == 2:
        if tuple(w.shape) != r.batch_shape:
            raise ValueError(f"{name} must have shape {r.batch_shape}, got {tuple(w.shape)}")
        w = w.reshape(-1)
    if w.dim() != 1 or w.shape[0] != N:
        rows = "row" if normalise else "row of the shard"
        raise ValueError(f"{name} must hold one weight per {rows} ({N}), got shape {tuple(w.shape)}")
    if bool((w < 0).any()):
        i = int((w < 0).nonzero()[0])
        raise ValueError(f"{name} must be non-negative, got {w[i].item()} at row {i}")
    w = w.to(compute_dtype(w.dtype))
    if not normalise:
        return w
    mass = torch.zeros(r.num_problems, dtype=w.dtype, device=w.device).index_add_(0, r.problem_index(), w)
    if bool((mass <= 0).any()):
        k = int((mass <= 0).nonzero()[0])
        raise ValueError(f"{name} is all zero in problem {k}: every problem needs positive mass")
    return w / mass.repeat_interleave(r.sizes)


def labels(name: str, lab, n_rows: int, num_segments: int) -> torch.Tensor:
    """int64 (N,) labels in [0, num_segments)."""
    if not isinstance(lab, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(lab).__name__}")
    if lab.dtype != torch.int64:
        raise TypeError(f"{name} must be int64, got {lab.dtype}")
    if lab.dim() != 1 or lab.shape[0] != n_rows:
        raise ValueError(f"{name} must have shape ({n_rows},), got {tuple(lab.shape)}")
    if lab.numel():
        lo, hi = int(lab.min()), int(lab.max())
        if lo < 0 or hi >= num_segments:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{name} must lie in [0, {num_segments}), got {bad}")
    return lab


def top_k(name: str, k, num_conditions: int):
    """None (dense) or an int in [1, num_conditions]."""
    if k is None:
        return None
    if not isinstance(k, int) or isinstance(k, bool):
        raise TypeError(f"{name} must be None or an int, got {type(k).__name__}")
    if not 1 <= k <= num_conditions:
        raise ValueError(f"{name} must lie in [1, {num_conditions}] (the number of conditions), got {k}")
    return k


def stitch_args(x, gate_weight, gate_bias, U, V, mu_x, mu_y, k, temperature):
    """Checks the arguments of tcfa.ops.gated_stitch; returns (top_k, temperature).

    x's values are checked afterwards, through the gates (finite_through).
    """
    x = tensor("x", x, dim=2, finite=False)
    U = tensor("U", U, dim=3)
    C, dx, r = U.shape
    if C < 1:
        raise ValueError(f"U must hold at least one condition, got shape {tuple(U.shape)}")
    if x.shape[1] != dx:
        raise ValueError(f"x must have width dx = {dx} (U.shape[1]), got {x.shape[1]}")
    V = tensor("V", V, dim=3)
    if V.shape[:2] != (C, r):
        raise ValueError(f"V must have shape ({C}, {r}, dy), got {tuple(V.shape)}")
    dy = V.shape[2]
    expected = {"gate_weight": (gate_weight, (dx, C)), "gate_bias": (gate_bias, (C,)),
                "mu_x": (mu_x, (C, dx)), "mu_y": (mu_y, (C, dy))}
    for name, (t, shape) in expected.items():
        tensor(name, t, dim=len(shape))
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    same_dtype(x=x, gate_weight=gate_weight, gate_bias=gate_bias, U=U, V=V, mu_x=mu_x, mu_y=mu_y)
    same_device(x=x, gate_weight=gate_weight, gate_bias=gate_bias, U=U, V=V, mu_x=mu_x, mu_y=mu_y)
    return top_k("top_k", k, C), positive("temperature", temperature)
def integer(name: str, value, lo: int | None = None) -> int:
    """A Python int (not bool), optionally >= lo."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if lo is not None and value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")
    return value


def nonnegative(name: str, value) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (value >= 0) or value == float("inf"):
        raise ValueError(f"{name} must be >= 0 and finite, got {value}")
    return float(value)


def paired_rows(x, y, xname: str = "x", yname: str = "y", finite: bool = True):
    """Two 2-D float tensors of paired rows: same N, dtype and device, finite (unless finite=False)."""
    x = tensor(xname, x, dim=2, finite=finite)
    y = tensor(yname, y, dim=2, finite=finite)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{xname} and {yname} must have the same number of rows, got {x.shape[0]} and {y.shape[0]}")
    same_dtype(**{xname: x, yname: y})
    same_device(**{xname: x, yname: y})
    return x, y


MOMENT_BLOCKS = ("xx", "yy", "xy")


def blocks(name: str, value) -> tuple:
    """A non-empty subset of ("xx", "yy", "xy"), returned in that order."""
    if isinstance(value, str) or not isinstance(value, (tuple, list, set, frozenset)):
        raise TypeError(f"{name} must be a tuple of block names from {MOMENT_BLOCKS}, got {value!r}")
    bad = [b for b in value if b not in MOMENT_BLOCKS]
    if bad or not value:
        raise ValueError(f"{name} must be a non-empty subset of {MOMENT_BLOCKS}, got {tuple(value)!r}")
    return tuple(b for b in MOMENT_BLOCKS if b in value)


def barycentric_mass(log_b: torch.Tensor, x_offsets: torch.Tensor, y_offsets: torch.Tensor) -> None:
    """Every problem with x rows needs a y row of positive weight: otherwise T_i = 0/0.

    The Triton launcher's check; the C++ kernel makes the same one with the same message.
    """
    xo, yo = x_offsets.cpu(), y_offsets.cpu()
    finite = torch.cat([torch.zeros(1, dtype=torch.int64), torch.isfinite(log_b).cpu().long().cumsum(0)])
    mass = finite[yo[1:]] - finite[yo[:-1]]
    bad = ((xo[1:] > xo[:-1]) & (mass == 0)).nonzero()
    if bad.numel():
        raise ValueError(f"log_b: problem {int(bad[0])} has x rows but no y row of positive weight "
                         f"(log_b = -inf everywhere or no y rows), so its barycentric map is 0/0")
