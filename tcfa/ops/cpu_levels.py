"""The CPU kernels' instruction-set level: chosen at import, switchable in one process
(docs/architecture.md, "CPU dispatch")."""
from __future__ import annotations

import os

from . import _C_loader

_C = _C_loader.load()
_CPU_LIBRARIES = _C_loader.level_libraries()
_cpu_level = ""


def _use(requested: str | None, name: str) -> str:
    """Loads the level ``choose_level`` picks for ``requested`` (errors name ``name``) and
    makes it active; returns the level in use before."""
    global _cpu_level
    level = _C_loader.choose_level(_C.best_cpu_capability(), _CPU_LIBRARIES, requested, name)
    previous, _cpu_level = _cpu_level, _C.use_cpu_kernels(_CPU_LIBRARIES[level])
    return previous


def set_cpu_capability(level: str) -> str:
    """Makes ``level`` the instruction-set level of every CPU kernel from now on, in this
    process; returns the level in use before. For comparing levels in one process (the
    tests, ``tcfa bench levels``); the level chosen at import is the best one the CPU
    runs, or the one the environment variable TCFA_CPU_CAPABILITY names."""
    if not isinstance(level, str):
        raise TypeError(f"level must be a str, got {type(level).__name__}")
    return _use(level, "level")


def cpu_capability() -> str:
    """The instruction-set level the CPU kernels run at: "avx512", "avx2", "default"
    (baseline x86-64, or the compiler's default target on other architectures), or
    "native" (an opt-in -march=native build, TCFA_BUILD_NATIVE=1)."""
    return _cpu_level


def cpu_capabilities() -> list[str]:
    """Every compiled level this CPU can run, best first."""
    return [level for level in _C_loader.runnable_levels(_C.best_cpu_capability(), _CPU_LIBRARIES)
            if level in _CPU_LIBRARIES]


_use(os.environ.get(_C_loader.ENV) or None, _C_loader.ENV)
