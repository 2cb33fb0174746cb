"""Run-time CPU dispatch: the level is read from the CPU, can be forced lower, and
each level's library holds only the instructions its level allows."""
import os
import shutil
import subprocess
import sys

import pytest

from tcfa import ops
from tcfa.ops import _C_loader


def cpu_flags():
    """The CPU's feature flags as the kernel reports them (an independent reading of
    what __builtin_cpu_supports checks)."""
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    pytest.skip("no /proc/cpuinfo flags line")


def expected_best():
    flags = cpu_flags()
    if {"avx512f", "avx512dq", "avx512bw", "avx512vl", "avx512cd", "avx2", "fma", "bmi2"} <= flags:
        return "avx512"
    if {"avx2", "fma", "bmi1", "bmi2", "f16c", "movbe"} <= flags:
        return "avx2"
    return "default"


def test_best_level_follows_the_cpu_features():
    assert ops._C.best_cpu_capability() == expected_best()
    # with nothing forced, import picks the best level
    if not os.environ.get(_C_loader.ENV):
        assert ops.cpu_capability() == expected_best()
    assert ops.cpu_capabilities()[0] == expected_best()


def test_every_standard_level_is_compiled():
    levels = set(_C_loader.level_libraries())
    assert {"avx512", "avx2", "default"} <= levels


def run_python(code, **env):
    full = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, cwd="/")


@pytest.mark.parametrize("level", ["avx2", "default"])
def test_environment_variable_forces_a_lower_level(level):
    out = run_python("import tcfa; print(tcfa.ops.cpu_capability())", TCFA_CPU_CAPABILITY=level)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == level


def test_unknown_level_is_a_named_error():
    out = run_python("import tcfa", TCFA_CPU_CAPABILITY="sse9")
    assert out.returncode != 0
    assert "TCFA_CPU_CAPABILITY must be one of" in out.stderr and "'sse9'" in out.stderr
    with pytest.raises(ValueError, match="level must be one of"):
        ops.set_cpu_capability("sse9")
    with pytest.raises(TypeError, match="level must be a str"):
        ops.set_cpu_capability(2)


def test_level_above_the_cpu_is_refused():
    assert _C_loader.choose_level("avx2", {"avx512": "a", "avx2": "b"}, None) == "avx2"
    with pytest.raises(ValueError, match="TCFA_CPU_CAPABILITY='avx512' is above what this CPU runs"):
        _C_loader.choose_level("avx2", {"avx512": "a", "avx2": "b"}, "avx512")
    with pytest.raises(ValueError, match="this build has no such level"):
        _C_loader.choose_level("avx512", {"avx512": "a"}, "avx2")


def test_switching_levels_in_process():
    previous = ops.set_cpu_capability("default")
    try:
        assert ops.cpu_capability() == "default"
    finally:
        ops.set_cpu_capability(previous)
    assert ops.cpu_capability() == previous


def vector_registers(path):
    """Which vector register files the library's code uses (objdump's disassembly)."""
    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", path], capture_output=True, text=True,
                          check=True).stdout
    return {reg for reg in ("%xmm", "%ymm", "%zmm") if reg in text}


@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs binutils' objdump")
def test_lower_levels_hold_no_wider_instructions():
    libs = _C_loader.level_libraries()
    # the portable build: AVX-512 code only in its own library, AVX2 code not in the baseline
    assert "%zmm" in vector_registers(libs["avx512"])
    regs_avx2 = vector_registers(libs["avx2"])
    assert "%ymm" in regs_avx2 and "%zmm" not in regs_avx2
    assert vector_registers(libs["default"]) == {"%xmm"}
