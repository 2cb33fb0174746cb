"""Loads the compiled parts: tcfa._C (op schemas + CPU dispatcher) and the CPU
kernel library of one instruction-set level (docs/architecture.md, "CPU dispatch").

The level is the best one the CPU runs, unless the environment variable
TCFA_CPU_CAPABILITY names a lower one (``avx512``, ``avx2``, ``default``; or
``native`` where the build made one). A failed load raises: tcfa never falls back
silently to slower code.
"""
from __future__ import annotations

import glob
import importlib
import importlib.machinery
import os

BUILD_HINT = (
    "tcfa's C++ extension is not built or failed to load. From a checkout, build it with "
    "`make build`; into your own environment, install it with `pip install --no-build-isolation .` "
    "(needs torch and ninja there)."
)
# Highest first: a CPU that runs a level runs every level after it.
LEVELS = ("avx512", "avx2", "default")
ENV = "TCFA_CPU_CAPABILITY"


def load():
    try:
        return importlib.import_module("tcfa._C")
    except ImportError as err:  # also OSError-derived symbol errors surface as ImportError
        raise ImportError(f"{BUILD_HINT}\nUnderlying error: {err}") from err


def level_libraries() -> dict[str, str]:
    """Compiled level -> path of its library, for the levels this build holds."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the tcfa package: setup.py puts them there
    found = {}
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        for path in glob.glob(os.path.join(here, f"_cpu_*{suffix}")):
            level = os.path.basename(path)[len("_cpu_"):-len(suffix)]
            found.setdefault(level, path)
    return found


def runnable_levels(best: str, available) -> list[str]:
    """The levels this CPU runs, best first: the standard ones from ``best`` (read from the
    CPU's features) down, then ``native`` where the build made one (compiled for this
    machine, so it runs here, but is never chosen unasked)."""
    return [*LEVELS[LEVELS.index(best):], *(["native"] if "native" in available else [])]


def choose_level(best: str, available, requested: str | None, name: str = ENV) -> str:
    """The level to load: ``requested`` if given, else the best compiled standard level the
    CPU runs. Raises ValueError naming ``name`` (the variable or argument that asked) when
    the request cannot be honoured."""
    runnable = runnable_levels(best, available)
    if requested:
        if requested not in (*LEVELS, "native"):
            raise ValueError(f"{name} must be one of {[*LEVELS, 'native']}, got {requested!r}")
        if requested not in runnable:
            raise ValueError(f"{name}={requested!r} is above what this CPU runs (best: {best})")
        if requested not in available:
            raise ValueError(f"{name}={requested!r}: this build has no such level (compiled: {sorted(available)})")
        return requested
    for level in runnable:
        if level in available and level != "native":
            return level
    raise ImportError(f"{BUILD_HINT}\nNo CPU kernel library found next to tcfa._C "
                      f"(looked for tcfa/_cpu_<level> of {list(LEVELS)}).")
