"""Checks of tcfa.sinkhorn's inputs and options, and the memory budget for stored costs and plans.

Each check that a sharded solve must agree on returns, last, the values every rank must share.
"""
from __future__ import annotations

import torch

from .ops import _validate

DEFAULT_BUDGET_FRACTION = 0.25  # of available memory, for stored costs and plans


def available_memory(device=None) -> int:
    """Bytes free where tensors on ``device`` live: the device's free memory for CUDA, the host's
    MemAvailable otherwise (8 GiB when it cannot be read)."""
    if device is not None and torch.device(device).type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def check_budget(memory_budget) -> int | None:
    """None (a share of the device's free memory, decided when the device is known) or a byte count."""
    if memory_budget is None:
        return None
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float)) or memory_budget <= 0:
        raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget!r}")
    return int(memory_budget)


def budget(memory_budget, device=None) -> int:
    """Bytes a stored cost or plan may take: memory_budget, else DEFAULT_BUDGET_FRACTION of what is
    free on ``device`` (free CUDA memory for CUDA tensors, available host memory for CPU ones)."""
    memory_budget = check_budget(memory_budget)
    if memory_budget is None:
        return int(DEFAULT_BUDGET_FRACTION * available_memory(device))
    return memory_budget


def check_fits(cost_bytes: int, working_bytes: int, dense: bool, device) -> None:
    """Raises MemoryError, before anything is allocated, when the solve cannot fit in the free memory."""
    need = working_bytes + (cost_bytes if dense else 0)
    free = available_memory(device)
    if need <= free:
        return
    gib = lambda n: f"{n / 2**30:.2f} GiB"  # noqa: E731
    if dense and working_bytes <= free:
        raise MemoryError(f"mode='dense' stores the costs ({gib(cost_bytes)}) but only {gib(free)} is free on "
                          f"{torch.device(device)}; mode='online' recomputes them in tiles and needs {gib(working_bytes)}")
    raise MemoryError(f"this solve needs {gib(need)} even streaming the costs (rows, weights and potentials: "
                      f"{gib(working_bytes)}) but only {gib(free)} is free on {torch.device(device)}")


def weights_pair(a, b, rx, ry, balanced: bool = True, sharded: bool = False):
    """The checked weights. Balanced: normalised to mass 1 per problem (a shard's a stays raw: its
    mass is global, normalised over the ranks later). Unbalanced: as given (None: uniform 1/n),
    each problem still with positive mass."""
    a_n = _validate.weights("a", a, rx, normalise=not sharded and (balanced or a is None))
    b_n = _validate.weights("b", b, ry, normalise=balanced or b is None)
    if not balanced:
        _validate.weights("a", a_n, rx)
        _validate.weights("b", b_n, ry)
    return a_n, b_n


def check_inputs(x, y, a, b, eps, cost, x_offsets, y_offsets, comm, balanced: bool = True):
    """The rank-local checks of _prepare; the last item is what every rank must share."""
    eps = _validate.positive("eps", eps)
    cost = _validate.choice("cost", cost, _validate.COSTS)
    rx = _validate.ragged("x", x, x_offsets, "x_offsets", empty_problems=comm.sharded)  # a shard may lack a problem
    ry = _validate.ragged("y", y, y_offsets, "y_offsets")
    _validate.same_device(x=rx.rows, y=ry.rows)
    _validate.same_dtype(x=rx.rows, y=ry.rows)
    if rx.rows.shape[1] != ry.rows.shape[1]:
        raise ValueError(f"x and y must have the same width, got {rx.rows.shape[1]} and {ry.rows.shape[1]}")
    if rx.num_problems != ry.num_problems:
        raise ValueError(f"x and y must hold the same number of problems, got {rx.num_problems} and {ry.num_problems}")
    a_n, b_n = weights_pair(a, b, rx, ry, balanced, comm.sharded)
    _validate.same_device(x=rx.rows, a=a_n, b=b_n)
    # eps sets the stopping iteration and the eps-scaling schedule's length, cost
    # whether the centring and diameter reductions run, dtype and shapes the
    # size of every message: ranks that differ would wait on each other forever
    shared = {"eps": eps, "cost": cost, "dtype": rx.rows.dtype, "number of problems": rx.num_problems,
              "rows of y": ry.rows.shape[0], "width of x and y": ry.rows.shape[1]}
    return eps, cost, rx, ry, a_n, b_n, shared


def check_symmetric(symmetric, prob, sharded: bool):
    """None, or the bool (B,) flags of problems that are one measure against itself (checked)."""
    if symmetric is None:
        return None
    if sharded:
        raise ValueError("symmetric is not supported with a process_group (x is sharded, y is whole)")
    B = prob.num_problems
    if not isinstance(symmetric, torch.Tensor) or symmetric.dtype != torch.bool or symmetric.shape != (B,):
        raise ValueError(f"symmetric must be a bool tensor of shape ({B},) (one flag per problem), got "
                         f"{getattr(symmetric, 'dtype', type(symmetric).__name__)} "
                         f"{tuple(getattr(symmetric, 'shape', ()))}")
    if not bool(symmetric.any()):
        return None
    if prob.reach is not None and prob.reach[0] != prob.reach[1]:
        raise ValueError(f"symmetric problems need the same reach on both sides, got {prob.reach}")
    xo, yo = prob.x.offsets.tolist(), prob.y.offsets.tolist()
    for k in torch.nonzero(symmetric).flatten().tolist():
        xs, ys = slice(xo[k], xo[k + 1]), slice(yo[k], yo[k + 1])
        if not (torch.equal(prob.x.rows[xs], prob.y.rows[ys]) and torch.equal(prob.a[xs], prob.b[ys])):
            raise ValueError(f"symmetric[{k}] is set but problem {k} is not one measure against itself "
                             "(its x and y rows, or a and b, differ)")
    return symmetric.to(prob.a.device)


# Over-relaxation of the target-eps iterations (tcfa.ops.sinkhorn_dense); 1 is plain Sinkhorn.
# Measured (`tcfa bench sinkhorn_iterations`, benchmarks/results/sinkhorn_iterations.json, Intel
# Xeon, no annealing, to 1e-4): omega 1.3 needs 15 iterations instead of 22 on one 4096^2
# problem, 28 instead of 54 unbalanced, and on 64 ragged ~256^2 problems 9 for every problem
# (plain: 8.8 on average, 15 for the slowest). Time against plain over two runs (the iteration
# counts are the stable figure): 0.49-0.90x big, 0.56-0.64x unbalanced, 0.89-1.08x ragged.
# omega 1.5 cut more on the unbalanced problem (18 iterations) but took 14 on each ragged one;
# 1.7 slowed everything. The guard is the fallback: a relaxed step that would lower the dual
# objective is replaced by the plain one, entry by entry.
DEFAULT_OMEGA = 1.3


def check_options(mode, max_iter, tol, scaling, memory_budget, omega=DEFAULT_OMEGA):
    """Rank-local checks of the solver options; the last item is what every rank must share."""
    mode = _validate.choice("mode", mode, ("auto", "dense", "online"))
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
    if not isinstance(tol, (int, float)) or not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol!r}")
    if scaling is not None and (isinstance(scaling, bool) or not isinstance(scaling, (int, float))
                                or not 0 < scaling < 1):
        raise ValueError(f"scaling must be in (0, 1) or None, got {scaling!r}")
    if isinstance(omega, bool) or not isinstance(omega, (int, float)) or not 0 < omega < 2:
        raise ValueError(f"omega must be in (0, 2) (1: plain Sinkhorn), got {omega!r}")
    # max_iter, tol and scaling set how many iterations (each a collective) run
    # and when errors are reduced. The requested mode must match too, as a
    # caller's slip; "auto" may still resolve to dense on one shard and online
    # on another, which is safe: both half-steps issue the same collectives.
    # memory_budget only feeds that per-shard choice, so it may differ.
    shared = {"mode": mode, "max_iter": max_iter, "tol": float(tol),
              "scaling": None if scaling is None else float(scaling), "omega": float(omega)}
    return mode, check_budget(memory_budget), float(omega), shared
