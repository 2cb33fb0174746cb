"""Test configuration shared by every test module.

Triton kernels are tested on CPU tensors by the Triton interpreter, which must
be switched on before triton is first imported (the Makefile sets it too).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tcfa import ops  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "interpreter: Triton kernel run by TRITON_INTERPRET=1 on CPU tensors")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=ops.cpu_capabilities())
def cpu_level(request):
    """Runs a test once per compiled instruction-set level this CPU can run
    (avx512, avx2, default): every level's code is exercised on this machine."""
    previous = ops.set_cpu_capability(request.param)
    assert ops.cpu_capability() == request.param
    yield request.param
    ops.set_cpu_capability(previous)
