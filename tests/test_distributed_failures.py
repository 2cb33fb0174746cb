"""Ranks that die, raise or lag: every tcfa collective is bounded and its error names the call and the rank.

Three gloo processes per scenario, each on the shards of tests/test_distributed.py, with a 4 s
collective timeout (tcfa.distributed.set_collective_timeout):
  * kill:  rank 2 is SIGKILLed inside the solve (at its 3rd all_reduce);
  * raise: rank 1 raises in its own code between two solves and stays alive (it does not exit,
           so only the timeout can free the others);
  * slow:  rank 0 starts 2 s late (within the timeout): the result is the one-process result; then
           the ranks build accumulators of different widths and all_reduce them: a named error.
"""
import datetime
import os
import signal
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tcfa
import tcfa.distributed as td
from test_distributed import COMMON, batch, shard_rows

TIMEOUT = 4.0
WORLD = 3


def _worker(rank, scenario, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    td.set_collective_timeout(TIMEOUT)
    x, y, a, b, _, _, y_off = batch()
    rows, x_off = shard_rows(WORLD, rank)

    def solve():
        return tcfa.sinkhorn(x[rows], y, a[rows], b, x_offsets=x_off, y_offsets=y_off, process_group=dist.group.WORLD,
                             mode="dense", **COMMON)

    out, start = {}, time.monotonic()
    try:
        if scenario == "kill" and rank == 2:
            calls, total = [0], td.ShardedComm.sum

            def dying_sum(self, t):
                calls[0] += 1
                if calls[0] == 3:
                    os.kill(os.getpid(), signal.SIGKILL)
                return total(self, t)

            td.ShardedComm.sum = dying_sum
        if scenario == "slow" and rank == 0:
            time.sleep(TIMEOUT / 2)
        out["f"] = solve().f
        if scenario == "raise":
            if rank == 1:
                try:
                    raise ValueError("the user's own code failed between two solves")
                except ValueError:
                    torch.save({"raised": True}, os.path.join(out_dir, f"rank{rank}.pt"))
                    time.sleep(TIMEOUT + 4)  # alive, sockets open, past the others' timeout: only it ends their wait
                    return
            solve()
        if scenario == "slow":
            acc = tcfa.MomentAccumulator(3, 2, 4 if rank == 1 else 3)
            try:
                acc.all_reduce()
            except ValueError as exc:
                out["shape_error"] = str(exc)
    except RuntimeError as exc:
        out["error"], out["seconds"] = str(exc), time.monotonic() - start
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    os._exit(0)  # the group may be broken: no destroy_process_group barrier


def run_scenario(scenario, tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, scenario, str(tmp_path / "init"), str(tmp_path)))
             for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        if p.is_alive():
            p.kill()
            pytest.fail(f"a rank of scenario {scenario!r} hung")
    return {r: torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD) if (tmp_path / f"rank{r}.pt").exists()}


def test_killed_rank_is_named_by_the_others(tmp_path):
    out = run_scenario("kill", tmp_path)
    assert 2 not in out  # it died
    for r in (0, 1):
        msg = out[r]["error"]
        assert "tcfa: sinkhorn (sharded)" in msg and "rank(s) [2] did not reach it" in msg, msg
        assert out[r]["seconds"] < TIMEOUT + 10


def test_raising_rank_is_named_within_the_timeout(tmp_path):
    out = run_scenario("raise", tmp_path)
    assert out[1] == {"raised": True}
    for r in (0, 2):
        msg = out[r]["error"]
        assert "tcfa: sinkhorn (sharded)" in msg and "rank(s) [1] did not reach it" in msg, msg
        assert f"{TIMEOUT:g} s collective timeout" in msg
        assert TIMEOUT - 0.5 < out[r]["seconds"] < TIMEOUT + 10


def test_slow_rank_within_the_timeout_gives_the_right_result(tmp_path):
    out = run_scenario("slow", tmp_path)
    x, y, a, b, _, x_off, y_off = batch()
    want = tcfa.sinkhorn(x, y, a, b, x_offsets=x_off, y_offsets=y_off, mode="dense", **COMMON).f
    got = torch.cat([out[r]["f"] for r in range(WORLD)])
    order = torch.cat([shard_rows(WORLD, r)[0] for r in range(WORLD)])
    torch.testing.assert_close(got, want[order], atol=1e-10, rtol=1e-10)
    for r in range(WORLD):
        assert "error" not in out[r]
        assert "MomentAccumulator.all_reduce: the ranks disagree on dy (rank 0: 3, rank 1: 4, rank 2: 3)" \
            in out[r]["shape_error"], out[r]["shape_error"]


def test_timeout_setting_is_checked():
    with pytest.raises(ValueError, match="seconds must be a positive finite number"):
        td.set_collective_timeout(0)
    td.set_collective_timeout(7.5)
    try:
        assert td.collective_timeout() == 7.5
    finally:
        td.set_collective_timeout(None)
    assert td.collective_timeout() == float(os.environ.get("TCFA_COLLECTIVE_TIMEOUT", td.DEFAULT_TIMEOUT))
