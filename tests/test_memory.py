"""tcfa.sinkhorn under memory pressure: mode="auto" from the device's free memory, and requests that
cannot fit fail before allocating, with the sizes. The 100,000^2 online solve's memory is a
benchmark (benchmarks/bench_memory.py), not a test."""
import time

import pytest
import torch

import tcfa
from tcfa import ot_checks


def clouds(n=60, m=50, d=3):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(m, d, generator=g, dtype=torch.float64)


def test_auto_stores_costs_that_fit_and_streams_the_rest():
    x, y = clouds()
    dense = tcfa.sinkhorn(x, y, eps=0.5)
    assert dense.mode == "dense"
    online = tcfa.sinkhorn(x, y, eps=0.5, memory_budget=1000)  # 60 x 50 fp64 costs are 24,000 bytes
    assert online.mode == "online"
    torch.testing.assert_close(online.f, dense.f, atol=1e-10, rtol=1e-10)
    assert tcfa.sinkhorn(x, y, eps=0.5, memory_budget=10**6).mode == "dense"


def test_default_budget_follows_the_tensors_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (123 << 20, 80 << 30))
    assert ot_checks.available_memory("cuda:0") == 123 << 20
    assert ot_checks.budget(None, "cuda:0") == int(ot_checks.DEFAULT_BUDGET_FRACTION * (123 << 20))
    assert ot_checks.available_memory("cpu") > 1 << 30  # the host's MemAvailable, not the GPU's
    x, y = clouds()
    monkeypatch.setattr(ot_checks, "available_memory", lambda device=None: 20_000)  # a quarter: 5,000 bytes
    assert tcfa.sinkhorn(x, y, eps=0.5).mode == "online"


def test_dense_that_cannot_fit_fails_before_allocating():
    x, y = torch.randn(300_000, 2), torch.randn(300_000, 2)  # a 335 GiB cost matrix
    start = time.perf_counter()
    with pytest.raises(MemoryError, match=r"mode='dense' stores the costs \(335\.28 GiB\) but only .* GiB is free "
                                          r"on cpu; mode='online' recomputes them in tiles and needs 0\.02 GiB"):
        tcfa.sinkhorn(x, y, eps=0.5, mode="dense", max_iter=1)
    assert time.perf_counter() - start < 5


def test_online_that_cannot_fit_fails_with_the_sizes(monkeypatch):
    x, y = clouds()
    monkeypatch.setattr(ot_checks, "available_memory", lambda device=None: 100)
    with pytest.raises(MemoryError, match=r"needs 0\.00 GiB even streaming the costs .* only 0\.00 GiB is free on cpu"):
        tcfa.sinkhorn(x, y, eps=0.5, mode="online")
