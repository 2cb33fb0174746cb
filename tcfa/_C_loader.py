"""Loads the compiled kernels (tcfa._C), which registers torch.ops.tcfa.*.

A failed load raises: tcfa never falls back silently to slower code.
"""
import importlib

BUILD_HINT = (
    "tcfa's C++ extension (tcfa._C) is not built or failed to load. Build it from the repo root "
    "with `make build` (or `pip install --no-build-isolation -e .` inside an environment that "
    "has torch==2.13.0 and ninja)."
)


def load():
    try:
        return importlib.import_module("tcfa._C")
    except ImportError as err:  # also OSError-derived symbol errors surface as ImportError
        raise ImportError(f"{BUILD_HINT}\nUnderlying error: {err}") from err
