"""POT's entropic OT functions on tcfa's kernels: ``import tcfa.compat.pot as ot`` runs POT user code.

The functions take POT's (0.9) argument names and defaults and return what POT returns: torch
tensors in give tensors out; NumPy arrays or lists in give NumPy out. The math is tcfa.sinkhorn /
tcfa.sinkhorn_cost (balanced) and tcfa/ot_unbalanced.py (``reg_m``); POT's plan u_i K_ij v_j is
tcfa's a_i b_j exp((f_i + g_j - M_ij)/reg), so log_u = f/reg + log a and log_v = g/reg + log b.

Where results differ from POT's, and by how much:
- The stopping rule: tcfa stops on the L1 error of the row marginals, checked every iteration;
  POT's balanced loop on the 2-norm of the column marginals' error, every 10 iterations; both
  use ``stopThr``. Converged results agree to the tolerance reached (the tests: 1e-10 in fp64).
  The front-end runs plain Sinkhorn (omega=1, POT's iteration), so ``numItermax`` caps the same
  iterates; tcfa.sinkhorn_cost's default over-relaxation reaches the same tolerance sooner.
- ``method``: every balanced method name (sinkhorn, sinkhorn_log, sinkhorn_stabilized,
  sinkhorn_epsilon_scaling) solves the same problem with the same log-domain loop.
- Balanced weights of equal mass m != 1 give m times the plan of the normalised ones, as in POT.
- Not supported, each raising ValueError naming it: warmstart, verbose=True, isLazy=True, 2-D
  ``b`` (several histograms), reg_type other than "kl", ``c``, metrics other than sqeuclidean and
  cosine, and any other keyword.
- sinkhorn_unbalanced2(returnCost="total") reproduces POT 0.9's number, whose KL terms lack the
  mass terms (-p + q): at the optimum it is 0 up to rounding. The objective with the generalised
  KL, which the plan minimises, is tcfa.sinkhorn_cost(..., reach=...).value().
- Gradients: every plan and loss is differentiable with respect to M (X_s, X_t), a and b through
  the plan itself, as POT's torch backend is by unrolling its iterations; here by implicit
  differentiation of the converged plan (tcfa/compat/implicit_plan.py), equal to POT's to rounding.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from ..ot import sinkhorn as _sinkhorn_points
from ..ot_cost import sinkhorn_cost as _sinkhorn_cost
from .implicit_plan import implicit_plan

__all__ = ["sinkhorn", "sinkhorn2", "sinkhorn_log", "empirical_sinkhorn", "empirical_sinkhorn2",
           "empirical_sinkhorn_divergence", "sinkhorn_unbalanced", "sinkhorn_unbalanced2"]

BALANCED_METHODS = ("sinkhorn", "sinkhorn_log", "sinkhorn_stabilized", "sinkhorn_epsilon_scaling")
METRICS = {"sqeuclidean": "sqeuclidean", "cosine": "cosine"}


# ------------------------------------------------------------------ arrays in and out
def _tensor(name: str, value):
    """(tensor, came_from_numpy): NumPy arrays keep a floating dtype (fp32 stays fp32), lists and
    integer arrays become fp64, as POT's NumPy backend computes them."""
    if isinstance(value, torch.Tensor):
        return value, False
    if isinstance(value, (np.ndarray, np.generic, list, tuple, float, int)):
        arr = np.asarray(value)
        return torch.as_tensor(arr.astype(arr.dtype if arr.dtype.kind == "f" else np.float64)), True
    raise TypeError(f"{name} must be a torch.Tensor, a NumPy array or a list, got {type(value).__name__}")


def _out(t: torch.Tensor, numpy: bool):
    return t.detach().cpu().numpy() if numpy else t


def _hist(name: str, h, n: int, like: torch.Tensor) -> torch.Tensor:
    """POT's histogram: None or empty means uniform 1/n."""
    if h is None or (not isinstance(h, torch.Tensor) and len(h) == 0) or (isinstance(h, torch.Tensor) and h.numel() == 0):
        return torch.full((n,), 1.0 / n, dtype=like.dtype, device=like.device)
    t, _ = _tensor(name, h)
    if t.dim() != 1:
        raise ValueError(f"{name} must be one histogram (1-D); several histograms (2-D {name}) are not supported")
    return t.to(like.dtype)


def _unsupported(warmstart=None, verbose=False, kwargs=None, **flags) -> None:
    if warmstart is not None:
        raise ValueError("warmstart is not supported by tcfa.compat.pot")
    if verbose:
        raise ValueError("verbose=True is not supported by tcfa.compat.pot (the log dict holds err and niter)")
    for name, bad in flags.items():
        if bad:
            raise ValueError(f"{name} is not supported by tcfa.compat.pot")
    if kwargs:
        raise ValueError(f"tcfa.compat.pot does not support the keyword(s) {sorted(kwargs)}")


def _scalar(name: str, value, positive: bool = True) -> float:
    """POT's scalars (reg, reg_m entries) as floats: Python, NumPy or 0-d torch numbers."""
    try:
        v = float(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r}") from None
    if positive and not v > 0:
        raise ValueError(f"{name} must be > 0, got {v}")
    return v


def _solver_options(numItermax, stopThr):
    if isinstance(numItermax, bool) or not isinstance(numItermax, (int, np.integer)) or numItermax < 1:
        raise ValueError(f"numItermax must be a positive int, got {numItermax!r}")
    return int(numItermax), _scalar("stopThr", stopThr, positive=False)


def _finite(name: str, t: torch.Tensor) -> torch.Tensor:
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite")
    return t


def _warn(res, numIterMax, warn: bool) -> None:
    if warn and not bool(res.converged.all()):
        warnings.warn("Sinkhorn did not converge. You might want to increase the number of iterations "
                      f"`numItermax` ({numIterMax}) or the regularization parameter `reg`.", stacklevel=3)


def _mass(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    ma, mb = a.sum(), b.sum()
    if not bool(torch.isclose(ma, mb, rtol=1e-6, atol=0.0)):
        raise ValueError(f"a and b must have the same total mass for balanced OT, got {float(ma)} and {float(mb)} "
                         "(use sinkhorn_unbalanced for different masses)")
    return ma


def _returned(value: torch.Tensor, numpy: bool, log: dict | None):
    """POT's return: the value, or (value, log) with every tensor of the log converted like the value."""
    if log is None:
        return _out(value, numpy)
    return _out(value, numpy), {k: _out(v, numpy) if isinstance(v, torch.Tensor) else v for k, v in log.items()}


def _log(res, a, b, reg, mass, unbalanced=False) -> dict:
    f, g = res.f.reshape(-1), res.g.reshape(-1)
    if unbalanced:  # POT's unbalanced u, v multiply K = a b^T exp(-M/reg)
        return {"err": [float(res.error.max())], "niter": int(res.n_iter.max()), "logu": f / reg, "logv": g / reg}
    log_u = f / reg + torch.log(a / mass) + torch.log(mass)
    log_v = g / reg + torch.log(b / mass)
    return {"err": [float(res.error.max())], "niter": int(res.n_iter.max()), "log_u": log_u, "log_v": log_v,
            "u": log_u.exp(), "v": log_v.exp()}


# ------------------------------------------------------------------ balanced, given M
def _given_cost(a, b, M, method):
    """(M, came_from_numpy, a, b) checked for the solvers on a given cost, balanced or not."""
    if method.lower() not in BALANCED_METHODS:
        raise ValueError(f"method {method!r} is not supported by tcfa.compat.pot (supported: {list(BALANCED_METHODS)})")
    M_t, numpy = _tensor("M", M)
    if M_t.dim() != 2:
        raise ValueError(f"M must be a (n, m) cost matrix, got shape {tuple(M_t.shape)}")
    _finite("M", M_t)
    return M_t, numpy, _hist("a", a, M_t.shape[0], M_t), _hist("b", b, M_t.shape[1], M_t)


def _balanced(a, b, M, reg, method, numItermax, stopThr, warn):
    M_t, numpy, a_t, b_t = _given_cost(a, b, M, method)
    mass = _mass(a_t, b_t)
    numItermax, stopThr = _solver_options(numItermax, stopThr)
    res = _sinkhorn_cost(M_t, a_t, b_t, eps=_scalar("reg", reg), max_iter=numItermax, tol=stopThr, omega=1.0)
    _warn(res, numItermax, warn)
    return res, M_t, a_t, b_t, mass, numpy


def sinkhorn(a, b, M, reg, method="sinkhorn", numItermax=1000, stopThr=1e-9, verbose=False, log=False, warn=True,
             warmstart=None, **kwargs):
    """POT's ot.sinkhorn: the entropic OT plan of histograms a, b under cost M (and the log dict)."""
    _unsupported(warmstart, verbose, kwargs)
    res, M_t, a_t, b_t, mass, numpy = _balanced(a, b, M, reg, method, numItermax, stopThr, warn)
    P = implicit_plan(M_t, a_t, b_t, res.plan() * mass, _scalar("reg", reg))
    return _returned(P, numpy, _log(res, a_t, b_t, reg, mass) if log else None)


def sinkhorn_log(a, b, M, reg, numItermax=1000, stopThr=1e-9, verbose=False, log=False, warn=True, warmstart=None,
                 **kwargs):
    """POT's ot.bregman.sinkhorn_log (the same problem as sinkhorn)."""
    return sinkhorn(a, b, M, reg, "sinkhorn_log", numItermax, stopThr, verbose, log, warn, warmstart, **kwargs)


def sinkhorn2(a, b, M, reg, method="sinkhorn", numItermax=1000, stopThr=1e-9, verbose=False, log=False, warn=False,
              warmstart=None, **kwargs):
    """POT's ot.sinkhorn2: the loss <M, P> of the entropic plan (without the entropy term)."""
    _unsupported(warmstart, verbose, kwargs)
    res, M_t, a_t, b_t, mass, numpy = _balanced(a, b, M, reg, method, numItermax, stopThr, warn)
    loss = (M_t * implicit_plan(M_t, a_t, b_t, res.plan() * mass, _scalar("reg", reg))).sum()
    return _returned(loss, numpy, _log(res, a_t, b_t, reg, mass) if log else None)


# ------------------------------------------------------------------ balanced, from samples
def _cost(xs: torch.Tensor, xt: torch.Tensor, metric: str) -> torch.Tensor:
    """POT's ot.dist for the two supported metrics."""
    if metric == "sqeuclidean":
        return (xs.square().sum(1)[:, None] + xt.square().sum(1)[None, :] - 2 * xs @ xt.mT).clamp_min(0)
    xs_n = xs / xs.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return 1 - xs_n @ (xt / xt.norm(dim=1, keepdim=True).clamp_min(1e-30)).mT


def _empirical(X_s, X_t, reg, a, b, metric, numIterMax, stopThr, warn):
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r} is not supported by tcfa.compat.pot (supported: {list(METRICS)})")
    xs, numpy = _tensor("X_s", X_s)
    xt, _ = _tensor("X_t", X_t)
    a_t, b_t = _hist("a", a, xs.shape[0], xs), _hist("b", b, xt.shape[0], xs)
    mass = _mass(a_t, b_t)
    numIterMax, stopThr = _solver_options(numIterMax, stopThr)
    res = _sinkhorn_points(xs, xt, a_t, b_t, eps=_scalar("reg", reg), cost=METRICS[metric], max_iter=numIterMax,
                           tol=stopThr, omega=1.0)
    _warn(res, numIterMax, warn)
    return res, xs, xt, a_t, b_t, mass, numpy


def empirical_sinkhorn(X_s, X_t, reg, a=None, b=None, metric="sqeuclidean", numIterMax=10000, stopThr=1e-9,
                       isLazy=False, batchSize=100, verbose=False, log=False, warn=True, warmstart=None, **kwargs):
    """POT's ot.bregman.empirical_sinkhorn: the plan between samples X_s and X_t (cost on the fly)."""
    _unsupported(warmstart, verbose, kwargs, isLazy=isLazy)
    res, xs, xt, a_t, b_t, mass, numpy = _empirical(X_s, X_t, reg, a, b, metric, numIterMax, stopThr, warn)
    P = implicit_plan(_cost(xs, xt, metric), a_t, b_t, res.plan() * mass, _scalar("reg", reg))
    return _returned(P, numpy, _log(res, a_t, b_t, reg, mass) if log else None)


def empirical_sinkhorn2(X_s, X_t, reg, a=None, b=None, metric="sqeuclidean", numIterMax=10000, stopThr=1e-9,
                        isLazy=False, batchSize=100, verbose=False, log=False, warn=True, warmstart=None, **kwargs):
    """POT's ot.bregman.empirical_sinkhorn2: the loss <M, P> between samples."""
    _unsupported(warmstart, verbose, kwargs, isLazy=isLazy)
    res, xs, xt, a_t, b_t, mass, numpy = _empirical(X_s, X_t, reg, a, b, metric, numIterMax, stopThr, warn)
    M_t = _cost(xs, xt, metric)
    loss = (M_t * implicit_plan(M_t, a_t, b_t, res.plan() * mass, _scalar("reg", reg))).sum()
    return _returned(loss, numpy, _log(res, a_t, b_t, reg, mass) if log else None)


def empirical_sinkhorn_divergence(X_s, X_t, reg, a=None, b=None, metric="sqeuclidean", numIterMax=10000,
                                  stopThr=1e-9, verbose=False, log=False, warn=True, warmstart=None, **kwargs):
    """POT's ot.bregman.empirical_sinkhorn_divergence: max(0, W_ab - (W_aa + W_bb)/2) of the losses <M, P>."""
    _unsupported(warmstart, verbose, kwargs)
    common = dict(metric=metric, numIterMax=numIterMax, stopThr=stopThr, log=True, warn=warn)
    ab, log_ab = empirical_sinkhorn2(X_s, X_t, reg, a, b, **common)
    aa, log_a = empirical_sinkhorn2(X_s, X_s, reg, a, a, **common)
    bb, log_b = empirical_sinkhorn2(X_t, X_t, reg, b, b, **common)
    div = ab - 0.5 * (aa + bb)
    div = torch.clamp_min(div, 0) if isinstance(div, torch.Tensor) else np.maximum(0, div)
    if log:
        return div, {"sinkhorn_loss_ab": ab, "sinkhorn_loss_a": aa, "sinkhorn_loss_b": bb,
                     "log_sinkhorn_ab": log_ab, "log_sinkhorn_a": log_a, "log_sinkhorn_b": log_b}
    return div


# ------------------------------------------------------------------ unbalanced (KL)
def _reach(reg_m):
    """POT's reg_m (a number or a pair; inf keeps a marginal exact) as tcfa's reach."""
    many = isinstance(reg_m, (tuple, list)) or (hasattr(reg_m, "ndim") and reg_m.ndim > 0)
    pair = tuple(reg_m) if many else (reg_m, reg_m)
    if len(pair) != 2:
        raise ValueError(f"reg_m must be a number or a pair, got {reg_m!r}")
    values = [_scalar("reg_m", r) for r in pair]
    return tuple(None if v == float("inf") else v for v in values)


def _unbalanced(a, b, M, reg, reg_m, method, reg_type, c, numItermax, stopThr):
    if reg_type.lower() != "kl":
        raise ValueError(f"reg_type {reg_type!r} is not supported by tcfa.compat.pot: only 'kl' (POT's default)")
    _unsupported(c=c is not None)
    M_t, numpy, a_t, b_t = _given_cost(a, b, M, method)
    numItermax, stopThr = _solver_options(numItermax, stopThr)
    reach = _reach(reg_m)
    # reg_m = inf on both sides is the balanced problem, whose solver normalises the masses: its plan
    # is scaled back to theirs (equal masses required, where POT returns NaN)
    mass = _mass(a_t, b_t) if reach == (None, None) else 1.0
    res = _sinkhorn_cost(M_t, a_t, b_t, eps=_scalar("reg", reg), reach=reach, max_iter=numItermax,
                         tol=stopThr, omega=1.0)
    P = implicit_plan(M_t, a_t, b_t, res.plan() * mass, _scalar("reg", reg), reach, last="cols")
    return res, P, M_t, a_t, b_t, numpy


def sinkhorn_unbalanced(a, b, M, reg, reg_m, method="sinkhorn", reg_type="kl", c=None, warmstart=None, numItermax=1000,
                        stopThr=1e-6, verbose=False, log=False, **kwargs):
    """POT's ot.unbalanced.sinkhorn_unbalanced (reg_type "kl"): the plan of the KL-relaxed problem."""
    _unsupported(warmstart, verbose, kwargs)
    res, P, _, a_t, b_t, numpy = _unbalanced(a, b, M, reg, reg_m, method, reg_type, c, numItermax, stopThr)
    return _returned(P, numpy, _log(res, a_t, b_t, reg, None, unbalanced=True) if log else None)


def sinkhorn_unbalanced2(a, b, M, reg, reg_m, method="sinkhorn", reg_type="kl", c=None, warmstart=None,
                         returnCost="linear", numItermax=1000, stopThr=1e-6, verbose=False, log=False, **kwargs):
    """POT's ot.unbalanced.sinkhorn_unbalanced2: <M, P> ("linear") or the whole objective ("total")."""
    _unsupported(warmstart, verbose, kwargs)
    if returnCost not in ("linear", "total"):
        raise ValueError(f"returnCost must be 'linear' or 'total', got {returnCost!r}")
    res, P, M_t, a_t, b_t, numpy = _unbalanced(a, b, M, reg, reg_m, method, reg_type, c, numItermax, stopThr)
    cost = (M_t * P).sum()
    if returnCost == "total":  # POT 0.9's formula: its KL has no mass terms (see the module docstring)
        kl = lambda p, q: (p * torch.log(p / q + 1e-16)).sum()  # noqa: E731
        rho_a, rho_b = res._prob.reach or (None, None)  # None: reg_m = inf on both sides, balanced
        cost = cost + reg * kl(P, a_t[:, None] * b_t[None, :])
        cost = cost + (rho_a * kl(P.sum(1), a_t) if rho_a is not None else 0) + (
            rho_b * kl(P.sum(0), b_t) if rho_b is not None else 0)
    return _returned(cost, numpy, _log(res, a_t, b_t, reg, None, unbalanced=True) if log else None)
