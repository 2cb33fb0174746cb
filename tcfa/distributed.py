"""torch.distributed reductions for sharded Sinkhorn and moment accumulators.

Sharded Sinkhorn (``tcfa.sinkhorn(..., process_group=group)``): every rank holds
a contiguous shard of x's rows (and their weights) for every problem, and all
of y. The solver then needs exactly these cross-rank steps:

* the g-update reduces over x rows, so each rank's soft-min is a partial
  log-sum-exp L_r = -out_r / eps, merged as  L = M + log sum_r exp(L_r - M),
  M = max_r L_r  (two all_reduces: MAX, then SUM of the rescaled partials);
* every per-problem sum over x rows is all_reduced (SUM): weight mass, the
  centring mean, the L1 marginal error and the x side of the dual value;
* the squared diameter of the eps-scaling schedule takes a global max/min.

The f-update reduces over y, which every rank holds whole: it stays local.
Since the errors are all_reduced, the active masks, stopping iteration and
schedule are identical on every rank, so every rank issues the same
collectives in the same order -- provided the ranks were called with the same
options: eps, tol, max_iter and scaling set the schedule and the stopping
iteration, cost whether the centring and diameter reductions run, and the
dtype and y's shape the size of every message. ShardedComm.agree compares them
across ranks before the first reduction and raises on every rank if they differ.

Every collective tcfa issues goes through :func:`all_reduce` / :func:`all_gather`, which wait
at most :func:`collective_timeout` seconds (default 600, $TCFA_COLLECTIVE_TIMEOUT or
:func:`set_collective_timeout`). Before each collective a rank writes a key for it in the
process group's rendezvous store; when a collective fails or times out (a rank died, raised, or
is stuck elsewhere) the rank raises a RuntimeError naming the call and the ranks whose key is
missing, instead of waiting forever. On NCCL the wait is bounded only with torch's
TORCH_NCCL_BLOCKING_WAIT=1 (otherwise NCCL's own watchdog applies).

The solver talks to a communicator: :data:`LOCAL` (one process, every
reduction is the identity, so the single-process path is unchanged) or
:class:`ShardedComm` (a process group). Functions here never call the
kernels; they only combine what the kernels computed on each shard.
"""
from __future__ import annotations

import datetime
import hashlib
import itertools
import os
import struct

import torch
import torch.distributed as dist

from .ragged import Ragged


# Values per rank compared by ShardedComm.agree. Fixed, not taken from the
# signature: a rank whose check raised has none, yet must send as much as the rest.
SIGNATURE_LEN = 8
_INT, _FLOAT, _NONE, _DIGEST = range(4)  # how a signature value travels as two int64s


DEFAULT_TIMEOUT = 600.0  # seconds; long enough for one rank's slow batch, short of a silent hang
_timeout: float | None = None
_sequence = itertools.count()  # collectives issued by this process, in order (the same on every rank)


def collective_timeout() -> float:
    """Seconds a tcfa collective may wait for the other ranks: set_collective_timeout, else
    $TCFA_COLLECTIVE_TIMEOUT, else DEFAULT_TIMEOUT."""
    if _timeout is not None:
        return _timeout
    return float(os.environ.get("TCFA_COLLECTIVE_TIMEOUT", DEFAULT_TIMEOUT))


def set_collective_timeout(seconds: float | None) -> None:
    """Sets the timeout of every tcfa collective (None: back to $TCFA_COLLECTIVE_TIMEOUT / the default)."""
    global _timeout
    if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float))
                                or not 0 < seconds < float("inf")):
        raise ValueError(f"seconds must be a positive finite number or None, got {seconds!r}")
    _timeout = None if seconds is None else float(seconds)


def all_reduce(t: torch.Tensor, op, group, call: str) -> None:
    """dist.all_reduce of t in place, bounded by collective_timeout(); ``call`` names it in errors."""
    _bounded(call, group, lambda: dist.all_reduce(t, op=op, group=group, async_op=True))


def all_gather(out: list, t: torch.Tensor, group, call: str) -> None:
    """dist.all_gather into ``out``, bounded by collective_timeout()."""
    _bounded(call, group, lambda: dist.all_gather(out, t, group=group, async_op=True))


def _bounded(call: str, group, start) -> None:
    group = group or dist.group.WORLD
    key = f"tcfa/collective/{next(_sequence)}"
    store = _store()
    if store is not None:
        store.set(f"{key}/{dist.get_rank()}", call)
    seconds = collective_timeout()
    try:
        work = start()
        work.wait(timeout=datetime.timedelta(seconds=seconds))
    except RuntimeError as err:
        ranks = dist.get_process_group_ranks(group)
        raise RuntimeError(f"tcfa: {call} failed on rank {dist.get_rank()} within the {seconds:g} s collective "
                           f"timeout: {_missing(store, key, ranks)} ({err})") from err


def _store():
    """The default group's rendezvous store, or None if this torch does not expose it."""
    try:
        return dist.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):
        return None


def _missing(store, key: str, ranks: list[int]) -> str:
    """Which ranks never reached collective ``key`` (their key is absent from the store)."""
    if store is None:
        return "the ranks that did not reach it are unknown (no rendezvous store)"
    try:
        absent = [r for r in ranks if not store.check([f"{key}/{r}"])]
    except Exception:  # the store's host (rank 0) is gone too
        return "the rendezvous store is unreachable (its host, rank 0, may have died)"
    if not absent:
        return "every rank reached this collective (one may have died inside it)"
    return f"rank(s) {absent} did not reach it (died, raised, or are stuck elsewhere)"


class LocalComm:
    """One process holds every row: the reductions are the identity."""

    sharded = False
    world_size = 1

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def max(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def merge_softmin(self, out: torch.Tensor, eps: float) -> torch.Tensor:
        return out

    def agree(self, check, *args):
        *result, _signature = check(*args)
        return result

    def normalise_x(self, name, w, r: Ragged) -> torch.Tensor:
        return w  # _validate.weights already normalised them


LOCAL = LocalComm()


def communicator(process_group, call: str = "sinkhorn (sharded)"):
    """LOCAL for None, else a ShardedComm over the given group (or dist.group.WORLD) whose
    collectives are named ``call`` in their errors."""
    if process_group is None:
        return LOCAL
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("process_group was given but torch.distributed is not initialised; "
                         "call torch.distributed.init_process_group first (or pass process_group=None)")
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup (e.g. dist.group.WORLD) "
                        f"or None, got {type(process_group).__name__}")
    return ShardedComm(process_group, call=call)


class ShardedComm:
    """Collectives of sharded Sinkhorn over one process group (see the module docstring)."""

    sharded = True

    def __init__(self, group, caller: str = "process_group", call: str = "sinkhorn (sharded)"):
        self.group = group
        self.caller = caller  # what a disagreement's error names: the argument, or the function
        self.call = call  # what a failed collective's error names
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    # ------------------------------------------------------------ reductions
    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks (a new tensor; t is untouched)."""
        t = t.clone()
        all_reduce(t, dist.ReduceOp.SUM, self.group, f"{self.call}: all_reduce SUM")
        return t

    def max(self, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        all_reduce(t, dist.ReduceOp.MAX, self.group, f"{self.call}: all_reduce MAX")
        return t

    def merge_softmin(self, out: torch.Tensor, eps: float) -> torch.Tensor:
        """The soft-min over all ranks' x rows from each rank's soft-min over its shard.

        out_r = -eps L_r, L_r the shard's log-sum-exp (+inf out for a shard
        without rows of a problem: L_r = -inf, an empty sum). Returns
        -eps (M + log sum_r exp(L_r - M)), M = max_r L_r.
        """
        lse = -out / eps
        top = self.max(lse)
        # M = -inf only where no rank has rows (inactive problems are 0, not inf):
        # shift by 0 there so that exp gives 0 and the result is +inf, not NaN.
        shift = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        total = self.sum(torch.exp(lse - shift))
        return -eps * (shift + torch.log(total))

    # ------------------------------------------------------------ validation
    def agree(self, check, *args):
        """Runs a rank-local check, then makes every rank agree before any further collective.

        A rank that raised would otherwise leave the others waiting in the
        next collective forever, and so would ranks whose options make them
        issue different collectives. ``check`` returns its results plus, last,
        a dict {argument name: value} of up to SIGNATURE_LEN values every rank
        must share (the options that fix the number and order of collectives,
        y's shape); a mismatch raises a ValueError on every rank naming the
        argument(s) that differ.
        """
        try:
            *result, signature = check(*args)
            if len(signature) > SIGNATURE_LEN:
                raise RuntimeError(f"{check.__name__}'s signature has {len(signature)} values, "
                                   f"more than SIGNATURE_LEN={SIGNATURE_LEN}")
            error = None
        except Exception as exc:  # any local failure, or the other ranks would wait forever
            result, signature, error = None, {}, exc
        every = self._gather(error is not None, signature)
        failed = [r for r, (f, _) in enumerate(every) if f]
        if error is not None:
            raise error
        if failed:
            raise ValueError(f"{self.caller}: rank(s) {failed} rejected their input (see the error on those ranks)")
        differ = _disagreements(signature, [codes for _, codes in every])
        if differ:
            raise ValueError(f"{self.caller}: the ranks disagree on {'; '.join(differ)}; every rank must pass the "
                             f"same value, or their collectives would not match")
        return result

    def _gather(self, failed: bool, signature: dict) -> list[tuple[bool, list[tuple[int, int]]]]:
        """Every rank's (failed, encoded signature), in one all_gather of a fixed-size tensor."""
        codes = [c for v in signature.values() for c in _encode(v)]
        padded = [int(failed), *codes] + [0] * (2 * SIGNATURE_LEN - len(codes))
        # NCCL only moves CUDA tensors; gloo takes CPU ones
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(self.group) == "nccl" \
            else torch.device("cpu")
        mine = torch.tensor(padded, dtype=torch.int64, device=device)
        every = [torch.empty_like(mine) for _ in range(self.world_size)]
        all_gather(every, mine, self.group, f"{self.call}: the ranks' agreement on their options")
        flat = [t.tolist() for t in every]
        return [(bool(f[0]), list(zip(f[1::2], f[2::2]))) for f in flat]

    def normalise_x(self, name, w, r: Ragged) -> torch.Tensor:
        """w / (mass of w's problem over all ranks), differentiable across ranks.

        The mass is a differentiable sum over ranks (_SumOverRanks), so
        d value / d w is exact for the rows of this shard (and backward is
        then a collective call).
        """
        index = r.problem_index()
        local = torch.zeros(r.num_problems, dtype=w.dtype, device=w.device).index_add(0, index, w)
        mass = _SumOverRanks.apply(local, self.group) if w.requires_grad else self.sum(local)
        if bool((mass <= 0).any()):
            k = int((mass <= 0).nonzero()[0])
            what = "has no rows on any rank" if (self.sum(r.sizes) == 0)[k] else f"{name} is all zero on every rank"
            raise ValueError(f"x {what} in problem {k}: every problem needs positive mass")
        return w / mass[index]


def _encode(value) -> tuple[int, int]:
    """(kind, payload) int64s that are equal on two ranks iff the values are.

    Ints travel as themselves and floats bit for bit (so the error message can
    show every rank's value); anything else (a str, a dtype) as a digest of its
    repr, since Python's hash() is salted per process. Callers pass canonical
    values (float(tol), not tol), so that 0 and 0.0 agree.
    """
    if value is None:
        return _NONE, 0
    if isinstance(value, int) and -2**63 <= value < 2**63:
        return _INT, int(value)
    if isinstance(value, float):
        return _FLOAT, struct.unpack("<q", struct.pack("<d", value))[0]
    digest = hashlib.blake2b(repr(value).encode(), digest_size=8).digest()
    return _DIGEST, int.from_bytes(digest, "little", signed=True)


def _shown(code: tuple[int, int], mine) -> str:
    """Another rank's value, from its code, for an error message (a digest only says whether it is this rank's)."""
    kind, payload = code
    if kind == _INT:
        return str(payload)
    if kind == _FLOAT:
        return repr(struct.unpack("<d", struct.pack("<q", payload))[0])
    if kind == _NONE:
        return "None"
    return repr(mine) if code == _encode(mine) else "another value"


def _disagreements(signature: dict, every: list[list[tuple[int, int]]]) -> list[str]:
    """'name (rank 0: v0, rank 1: v1)' for every signature value on which the ranks differ."""
    out = []
    for i, (name, mine) in enumerate(signature.items()):
        codes = [ranks_codes[i] for ranks_codes in every]
        if len(set(codes)) > 1:
            out.append(f"{name} (" + ", ".join(f"rank {r}: {_shown(c, mine)}" for r, c in enumerate(codes)) + ")")
    return out


class _SumOverRanks(torch.autograd.Function):
    """all_reduce SUM with its adjoint: every rank's input feeds every rank's output,
    so the gradient of one rank's input is the sum of all ranks' output gradients."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        t = t.clone()
        all_reduce(t, dist.ReduceOp.SUM, group, "sinkhorn (sharded): the weights' mass")
        return t

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        all_reduce(grad, dist.ReduceOp.SUM, ctx.group, "sinkhorn (sharded) backward: the weights' mass")
        return grad, None


# ------------------------------------------------------------ moments
def all_reduce_moments(acc, group=None) -> None:
    """Replaces a MomentAccumulator's state by the merge of every rank's, in place.

    Chan's parallel formula over R parts: with n = sum_r n_r and the global
    mean mu = sum_r n_r mu_r / n,

        S = sum_r (S_r + n_r (mu_x,r - mu_x)(mu_y,r - mu_y)^T),

    three all_reduces (counts, count-weighted means, corrected sums); memory
    stays that of one state. Every rank ends with the same result.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("MomentAccumulator.all_reduce needs torch.distributed to be initialised "
                         "(torch.distributed.init_process_group)")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}")
    group = group or dist.group.WORLD
    call = "MomentAccumulator.all_reduce"
    # different sizes, dtype or blocks would mix unrelated numbers, or hang on different message sizes
    ShardedComm(group, caller=call, call=call).agree(_accumulator_signature, acc)
    count = acc.count.clone()
    all_reduce(count, dist.ReduceOp.SUM, group, call + ": counts")
    n_r = acc.count.to(acc.dtype)[:, None]
    n = count.to(acc.dtype).clamp_min(1)[:, None]  # empty conditions stay all-zero
    means = torch.cat([acc.mean_x * n_r, acc.mean_y * n_r], 1)
    all_reduce(means, dist.ReduceOp.SUM, group, call + ": means")
    means /= n
    mean_x, mean_y = means[:, :acc.dx], means[:, acc.dx:]
    deltas = {"x": acc.mean_x - mean_x, "y": acc.mean_y - mean_y}
    names = list(acc.sums)
    corrected = [acc.sums[b] + n_r[:, :, None] * deltas[b[0]][:, :, None] * deltas[b[1]][:, None, :] for b in names]
    flat = torch.cat([s.reshape(-1) for s in corrected])  # one collective for every block
    all_reduce(flat, dist.ReduceOp.SUM, group, call + ": co-moment sums")
    for b, s in zip(names, flat.split([s.numel() for s in corrected])):
        acc.sums[b] = s.view_as(acc.sums[b])
    acc.count, acc.mean_x, acc.mean_y = count, mean_x.contiguous(), mean_y.contiguous()


def _accumulator_signature(acc):
    """What every rank's accumulator must share, for ShardedComm.agree."""
    return None, {"num_segments": acc.num_segments, "dx": acc.dx, "dy": acc.dy, "dtype": str(acc.dtype),
                  "blocks": tuple(acc.blocks)}
