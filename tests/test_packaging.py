"""What a user installing tcfa into their own environment relies on: dependency ranges
(no torch pin), one version, and the benchmarks running from the package itself."""
import json
import math
import os
import subprocess
import sys
import tomllib

import tcfa
from tcfa import ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        return tomllib.load(fh)


def test_dependencies_are_ranges_without_a_torch_pin():
    doc = pyproject()
    requirements = doc["project"]["dependencies"] + doc["build-system"]["requires"]
    assert any(r.startswith("torch>=") for r in doc["project"]["dependencies"])
    assert not [r for r in requirements if "==" in r], requirements
    assert {"models", "test", "bench"} <= set(doc["project"]["optional-dependencies"])


def test_version_lives_in_one_place():
    doc = pyproject()
    assert "version" not in doc["project"] and "version" in doc["project"]["dynamic"]
    assert doc["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "tcfa._version.__version__"}
    from tcfa import _version

    assert tcfa.__version__ == _version.__version__


def test_bench_runs_from_the_package_outside_the_checkout(tmp_path):
    """`tcfa bench levels --quick` from another directory: the benchmark code ships with
    the package, and results go where --out says (never into the checkout)."""
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "tcfa", "bench", "levels", "--quick", "--no-plots", "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((out / "levels.json").read_text())
    assert doc["quick"] is True
    impls = {(row["workload"].split()[0], row["impl"]) for row in doc["rows"]}
    for level in ops.cpu_capabilities():
        assert {("sinkhorn", f"tcfa {level}"), ("routed", f"tcfa {level}"), ("moments+CCA", f"tcfa {level}")} <= impls
    # a measurement was made for every level (its value at toy sizes on a loaded machine is
    # noise, and a per-iteration difference may even come out negative: not checked)
    assert all(math.isfinite(row["ms"]) for row in doc["rows"] if row["impl"].startswith("tcfa"))


def test_bench_names_what_exists_when_nothing_matches(capsys):
    from tcfa import cli

    assert cli.main(["bench", "no-such-benchmark"]) == 1
    assert "sinkhorn" in capsys.readouterr().err


def test_every_package_folder_is_a_regular_package():
    """setup.py's find_packages ships only folders with an __init__.py: a namespace folder
    imports from a checkout but is missing from the wheel."""
    package = os.path.join(ROOT, "tcfa")
    for folder, _, files in os.walk(package):
        if "__pycache__" in folder or not any(f.endswith(".py") for f in files):
            continue
        assert "__init__.py" in files, f"{os.path.relpath(folder, ROOT)} has no __init__.py"
