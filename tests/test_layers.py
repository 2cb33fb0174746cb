"""The package's layers (docs/architecture.md, "Layers"): imports point downward only, and no file is long.

Every module under tcfa/ is parsed with ast; each import, at module level or inside a
function, is resolved to the tcfa module it names and must not sit in a higher layer
than the importer.
"""
from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "tcfa"
MAX_LINES = 400

# Lowest first. The key is a module's first name below tcfa; "" is the package itself,
# whose __init__ re-exports from every layer, so importing it is importing the top.
LAYERS = {
    "op access and kernels": ("ops", "kernels", "ragged", "_version"),
    "numerics": ("ot", "ot_grad", "ot_cost", "ot_checks", "ot_unbalanced", "divergence", "stats", "linear_maps", "maps", "stitch", "distributed",
                 "artifacts", "grams", "similarity", "correspondence", "lora", "shared_stitch"),
    "model pipeline": ("pipeline", "compat"),
    "applications": ("cli", "bench", "__main__", ""),
}
RANK = {head: rank for rank, heads in enumerate(LAYERS.values()) for head in heads}
NAMES = list(LAYERS)


def module_name(path: pathlib.Path) -> str:
    parts = ["tcfa", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> int:
    head = module.split(".")[1] if "." in module else ""
    assert head in RANK, f"{module} is in no layer: add it to LAYERS in tests/test_layers.py"
    return RANK[head]


def imported(module: str, path: pathlib.Path):
    """(line, tcfa module) of every import of a tcfa module in the file, wherever it is."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "tcfa":
                    yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != "tcfa":
                continue
            for alias in node.names:  # `from tcfa.x import y` imports the module tcfa.x.y when there is one
                sub = f"{source}.{alias.name}"
                yield node.lineno, sub if sub in MODULES else source


def test_every_module_is_in_a_layer():
    for module in MODULES:
        layer(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_downward(module):
    path = MODULES[module]
    mine = layer(module)
    upward = [f"{path.relative_to(PACKAGE.parent)}:{line} imports {target} ({NAMES[layer(target)]})"
              for line, target in imported(module, path) if layer(target) > mine]
    assert not upward, f"{module} ({NAMES[mine]}) imports upward:\n" + "\n".join(upward)


def test_the_import_resolver_sees_local_and_relative_imports(tmp_path):
    """The check above must catch a function-local relative import of a higher layer."""
    source = "def f():\n    from .pipeline import models\n    from . import cli\n    import tcfa.bench.common\n"
    fake = tmp_path / "ot.py"
    fake.write_text(source)
    assert [t for _, t in imported("tcfa.ot", fake)] == ["tcfa.pipeline.models", "tcfa.cli", "tcfa.bench.common"]


def test_no_file_exceeds_the_line_limit():
    long = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"
