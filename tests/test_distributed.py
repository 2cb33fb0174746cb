"""Sharded Sinkhorn and MomentAccumulator.all_reduce on 2 and 3 gloo processes (CPU).

Each world size is spawned once (module fixture): the workers run every case
and save their results; the tests compare them, in this process, with the
single-process solution of the whole batch (fp64, 1e-10).
"""
import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tcfa

F64 = torch.float64
TOL = 1e-10
# x rows per problem (odd sizes, a 1-row problem), y rows per problem
X_SIZES = [7, 1, 12, 5]
Y_SIZES = [9, 4, 1, 6]
# rows of each problem on each rank: uneven, with ranks holding 0 rows of a problem
SPLITS = {
    2: [[5, 2], [0, 1], [3, 9], [5, 0]],
    3: [[2, 0, 5], [0, 1, 0], [1, 6, 5], [0, 2, 3]],
}
CASES = {  # name -> sinkhorn keyword arguments
    "dense": dict(mode="dense"),
    "online": dict(mode="online"),
    "dense-scaling": dict(mode="dense", scaling=0.5),
    "online-scaling": dict(mode="online", scaling=0.5),
    "cosine-online-scaling": dict(mode="online", scaling=0.7, cost="cosine"),
}
COMMON = dict(eps=0.3, tol=1e-9, max_iter=3000)
# the value's cotangent: distinct per problem so that a mixed-up problem shows
VALUE_WEIGHTS = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=F64)
# moments: rows per rank (rank 2 of 3 holds none) and the labels' range
MOMENT_ROWS = {2: [23, 8], 3: [13, 18, 0]}
SEGMENTS, DX, DY = 3, 2, 3
# options that fix the collectives: argument -> (rank 0's value, every other rank's value)
MISMATCHES = {
    "tol": (1e-6, 1e-5),
    "eps": (0.3, 0.4),
    "scaling": (0.5, 0.6),
    "max_iter": (10, 11),
    "cost": ("sqeuclidean", "cosine"),
    "mode": ("dense", "online"),
}


# ------------------------------------------------------------------ data
def batch():
    g = torch.Generator().manual_seed(1)
    nx, ny = sum(X_SIZES), sum(Y_SIZES)
    x = torch.randn(nx, 3, generator=g, dtype=F64) + 5.0  # far from the origin: centring matters
    y = torch.randn(ny, 3, generator=g, dtype=F64) * 1.3 + 5.5
    a = torch.rand(nx, generator=g, dtype=F64) + 0.1
    b = torch.rand(ny, generator=g, dtype=F64) + 0.1
    values = torch.randn(ny, 2, generator=g, dtype=F64)
    offsets = lambda sizes: torch.tensor([0] + sizes, dtype=torch.int64).cumsum(0)  # noqa: E731
    return x, y, a, b, values, offsets(X_SIZES), offsets(Y_SIZES)


def shard_rows(world, rank):
    """Indices of this rank's x rows (contiguous within each problem) and its x_offsets."""
    starts = [0] + list(torch.tensor(X_SIZES).cumsum(0)[:-1].tolist())
    rows, sizes = [], []
    for start, split in zip(starts, SPLITS[world]):
        begin = start + sum(split[:rank])
        rows += range(begin, begin + split[rank])
        sizes.append(split[rank])
    return torch.tensor(rows, dtype=torch.int64), torch.tensor([0] + sizes, dtype=torch.int64).cumsum(0)


def moment_data():
    g = torch.Generator().manual_seed(2)
    n = sum(MOMENT_ROWS[2])
    x = torch.randn(n, DX, generator=g, dtype=F64) * 2 + 3
    y = torch.randn(n, DY, generator=g, dtype=F64) - 1
    labels = torch.randint(0, SEGMENTS, (n,), generator=g)
    labels[labels == 2] = 1
    labels[:3] = 2  # segment 2 only on rank 0: the other ranks merge in an empty segment
    return x, y, labels


def solve(x, y, a, b, values, x_offsets, y_offsets, **kw):
    """Solve, then value (with gradients) and barycentric map; everything to save."""
    x, y, a, b = (t.clone().requires_grad_(True) for t in (x, y, a, b))
    r = tcfa.sinkhorn(x, y, a, b, x_offsets=x_offsets, y_offsets=y_offsets, **COMMON, **kw)
    value = r.value()
    (value * VALUE_WEIGHTS).sum().backward()
    return dict(f=r.f, g=r.g, n_iter=r.n_iter, error=r.error, converged=r.converged, value=value.detach(),
                T=tcfa.barycentric_map(r, values), dx=x.grad, dy=y.grad, da=a.grad, db=b.grad)


# ------------------------------------------------------------------ workers
def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    # a regression that hangs then fails the test (after the timeout) instead of blocking it forever
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        x, y, a, b, values, _, y_off = batch()
        rows, x_off = shard_rows(world, rank)
        group = dist.group.WORLD
        out = {name: solve(x[rows], y, a[rows], b, values, x_off, y_off, process_group=group, **kw)
               for name, kw in CASES.items()}
        out["errors"] = _bad_inputs(rank, x[rows], y, a[rows], x_off, y_off, group)
        mx, my, labels = moment_data()
        begin = sum(MOMENT_ROWS[world][:rank])
        mine = slice(begin, begin + MOMENT_ROWS[world][rank])
        acc = tcfa.MomentAccumulator(SEGMENTS, DX, DY)
        if MOMENT_ROWS[world][rank]:
            half = begin + MOMENT_ROWS[world][rank] // 2  # two updates: a streamed state, not one batch
            acc.update(mx[begin:half], my[begin:half], labels[begin:half])
            acc.update(mx[half:mine.stop], my[half:mine.stop], labels[half:mine.stop])
        out["moments"] = acc.all_reduce().state_dict()
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _bad_inputs(rank, x, y, a, x_off, y_off, group):
    """Errors each rank gets when one rank's input is bad (no rank may hang)."""
    errors = {}
    bad_a = a.clone()
    if rank == 1:
        bad_a[-1] = -1.0
    try:
        tcfa.sinkhorn(x, y, bad_a, x_offsets=x_off, y_offsets=y_off, eps=0.3, process_group=group)
    except ValueError as exc:
        errors["negative_a"] = str(exc)
    y_rows = y if rank == 0 else y[:-1]  # rank 0 holds one y row more than the others
    y_sizes = y_off.clone()
    y_sizes[-1] = y_rows.shape[0]
    try:
        tcfa.sinkhorn(x, y_rows, a, x_offsets=x_off, y_offsets=y_sizes, eps=0.3, process_group=group)
    except ValueError as exc:
        errors["y_differs"] = str(exc)
    for name, (first, other) in MISMATCHES.items():
        options = {"eps": 0.3, name: first if rank == 0 else other}
        try:
            tcfa.sinkhorn(x, y, a, x_offsets=x_off, y_offsets=y_off, process_group=group, **options)
        except ValueError as exc:
            errors[f"{name}_differs"] = str(exc)
    return errors


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def world(request, tmp_path_factory):
    """(world size, [each rank's saved results]) after one spawn of all the workers."""
    n = request.param
    tmp = tmp_path_factory.mktemp(f"world{n}")
    mp.start_processes(_worker, args=(n, str(tmp / "init"), str(tmp)), nprocs=n, join=True, start_method="spawn")
    return n, [torch.load(tmp / f"rank{r}.pt") for r in range(n)]


@pytest.fixture(scope="module")
def single():
    """The single-process solution of the whole batch, per case."""
    x, y, a, b, values, x_off, y_off = batch()
    return {name: solve(x, y, a, b, values, x_off, y_off, **kw) for name, kw in CASES.items()}


def close(got, want):
    assert got.shape == want.shape
    err = float((got - want).abs().max()) if got.numel() else 0.0
    assert err <= TOL, f"max abs difference {err:.3e} > {TOL}"


# ------------------------------------------------------------------ sinkhorn
@pytest.mark.parametrize("case", list(CASES))
def test_sharded_sinkhorn_equals_one_process(world, single, case):
    n, ranks = world
    want = single[case]
    assert bool(want["converged"].all()) and int(want["n_iter"].min()) != int(want["n_iter"].max())
    for r, out in enumerate(ranks):
        got = out[case]
        rows, _ = shard_rows(n, r)
        close(got["f"], want["f"][rows])
        close(got["T"], want["T"][rows])  # barycentric_map on the shard
        close(got["g"], want["g"])
        assert torch.equal(got["n_iter"], want["n_iter"])
        assert torch.equal(got["converged"], want["converged"])
        close(got["error"], want["error"])
        close(got["value"], want["value"])


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_value_gradients(world, single, case):
    """x and a: the shard's rows of the one-process gradient; y and b: the whole gradient on every rank."""
    n, ranks = world
    want = single[case]
    for r, out in enumerate(ranks):
        rows, _ = shard_rows(n, r)
        close(out[case]["dx"], want["dx"][rows])
        close(out[case]["da"], want["da"][rows])
        close(out[case]["dy"], want["dy"])
        close(out[case]["db"], want["db"])


def test_shards_hold_no_rows_of_some_problems():
    """The split itself: the tests above must cover empty and one-row shards."""
    for n, split in SPLITS.items():
        assert any(0 in s for s in split)
        assert any(sum(split[k][:r]) not in (0, X_SIZES[k]) for k in range(len(X_SIZES)) for r in range(1, n))
        assert all(sum(s) == size for s, size in zip(split, X_SIZES))


def test_bad_input_on_one_rank_raises_on_every_rank(world):
    n, ranks = world
    for r, out in enumerate(ranks):
        errors = out["errors"]
        if r == 1:
            assert "a must be non-negative" in errors["negative_a"]
        else:
            assert "rank(s) [1] rejected their input" in errors["negative_a"]
        assert "disagree on rows of y (rank 0: 20, rank 1: 19" in errors["y_differs"]


@pytest.mark.parametrize("name", list(MISMATCHES))
def test_mismatched_option_raises_on_every_rank(world, name):
    """Options that set the number or order of collectives must match: an error on every rank, not a hang."""
    n, ranks = world
    first, other = MISMATCHES[name]
    for r, out in enumerate(ranks):
        msg = out["errors"].get(f"{name}_differs")
        assert msg is not None, f"rank {r} ran on with a different {name} than the other ranks"
        # every rank sees every rank's number; a string only as "this rank's" or "another value"
        values = [first] + [other] * (n - 1)
        shown = [repr(v) if isinstance(v, (int, float)) or v == values[r] else "another value" for v in values]
        assert f"disagree on {name} (" + ", ".join(f"rank {k}: {v}" for k, v in enumerate(shown)) + ")" in msg


def test_process_group_without_init_is_rejected():
    x, y, *_ = batch()
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="process_group.*not initialised"):
        tcfa.sinkhorn(x, y, eps=0.3, process_group=object())
    with pytest.raises(ValueError, match="init_process_group"):
        tcfa.MomentAccumulator(2, 2, 2).all_reduce()
    # the divergence's OT(x, x) needs all of x on both sides: refused before any collective
    with pytest.raises(ValueError, match="sinkhorn_divergence does not take process_group"):
        tcfa.sinkhorn_divergence(x, y, eps=0.3, process_group=object())


# ------------------------------------------------------------------ moments
def test_moment_all_reduce_equals_one_accumulator(world):
    n, ranks = world
    x, y, labels = moment_data()
    want = tcfa.MomentAccumulator(SEGMENTS, DX, DY).update(x, y, labels).state_dict()
    assert int(want["count"][2]) == 3 and int(want["count"].min()) > 0
    for out in ranks:
        got = out["moments"]
        assert torch.equal(got["count"], want["count"])
        for key in ("mean_x", "mean_y", "sxx", "syy", "sxy"):
            close(got[key], want[key])
    for out in ranks[1:]:  # every rank holds the same result
        for key in ("count", "mean_x", "mean_y", "sxx", "syy", "sxy"):
            assert torch.equal(out["moments"][key], ranks[0]["moments"][key])
