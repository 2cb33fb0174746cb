#!/usr/bin/env bash
# Builds a wheel of this checkout, installs it into a fresh venv that sees the
# same torch (the checkout's venv's site-packages, linked by a .pth file, so
# nothing is downloaded), and runs `tcfa demo --quick` and `tcfa bench --quick`
# from outside the checkout. Usage: benchmarks/wheel_check.sh PYTHON (make wheel-check).
set -euo pipefail
PY=${1:?usage: wheel_check.sh PYTHON (a python with torch, setuptools, wheel, ninja)}
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d /tmp/tcfa-wheel-check.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

# In-tree build (pip's default): ninja reuses the objects under build/temp.* that
# an earlier `make build` left, so an unchanged checkout does not recompile.
# build/lib.* is what the wheel is packed from: cleared, so that a library of
# an earlier build (a TCFA_BUILD_NATIVE=1 one) cannot ride along.
rm -rf "$REPO"/build/lib.*
"$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$WORK/dist" "$REPO"
WHEEL=$(ls "$WORK"/dist/tcfa-*.whl)
echo "built $(basename "$WHEEL")"
# exactly the portable libraries: never a -march=native one left by an in-place build
"$PY" - "$WHEEL" <<'PY'
import sys, zipfile
libs = sorted(n.split("/")[-1].split(".")[0] for n in zipfile.ZipFile(sys.argv[1]).namelist() if n.endswith(".so"))
print("compiled libraries:", libs)
assert libs == ["_C", "_cpu_avx2", "_cpu_avx512", "_cpu_default"], libs
PY

python3 -m venv "$WORK/venv"
SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
FRESH_SITE=$("$WORK/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
# The same torch, numpy, ... as PY's environment; the checkout's own .pth is not
# followed (pth files are read only in site directories), so tcfa can come only
# from the wheel.
echo "$SITE" > "$FRESH_SITE/same-torch.pth"
"$WORK/venv/bin/pip" install -q --no-build-isolation "$WHEEL"

cd "$WORK"
"$WORK/venv/bin/python" - "$REPO" <<'PY'
import os, sys
import tcfa
where = os.path.dirname(tcfa.__file__)
assert not where.startswith(sys.argv[1]), f"tcfa imported from the checkout ({where}), not the wheel"
print(f"tcfa {tcfa.__version__} from {where}; CPU level {tcfa.ops.cpu_capability()} of {tcfa.ops.cpu_capabilities()}")
PY
"$WORK/venv/bin/tcfa" demo --quick --out "$WORK/demo"
test -s "$WORK/demo/results.json"
"$WORK/venv/bin/tcfa" bench --quick --out "$WORK/bench"
ls "$WORK/bench"
echo "wheel check passed"
