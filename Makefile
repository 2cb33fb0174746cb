# The two commands of README.md: `make demo` and `make test`. Everything else
# here is what they need on a fresh clone: a .venv at the repo root and the
# compiled extension, built in place and rebuilt only where sources changed.
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# torch 2.14.1 + torchvision 0.29.1: pip takes both from this machine's disk
# (a CUDA build, which runs on the CPU here); any other torch spec downloads
# several GB. triton comes pinned by torch itself. These pins are the venv's
# only: the package's own dependencies are ranges (pyproject.toml).
TORCH  := torch==2.14.1 torchvision==0.29.1
DEPS   := numpy scipy scikit-learn POT pytest hypothesis ninja safetensors setuptools wheel \
          transformers timm tqdm matplotlib ruff clang-format geomloss peft
# peers timed by the benchmarks only (jax is large: not needed for test/demo)
BENCH_DEPS := geomloss ott-jax
# the layer_map benchmark's CKA peers, pinned: it calls their APIs as of these releases.
# --no-deps: what they import (tqdm, matplotlib, numpy) is in DEPS, and pytorch-cka's
# torch>=2.0.0 must never move the venv's torch.
BENCH_NODEPS := torch-cka==0.21 pytorch-cka==1.1.3
STAMP  := $(VENV)/.deps-installed
ONPATH := $(VENV)/.checkout-on-path

.PHONY: all build test test-cuda compile-check demo bench wheel-check lint clean

all: build

$(PY):
	python3 -m venv $(VENV)

$(STAMP): $(PY) Makefile
	$(PIP) install -q $(TORCH)
	$(PIP) install -q $(DEPS) $(TORCH)
	touch $(STAMP)

# The checkout goes on the venv's path by a .pth file (what an editable install
# writes) instead of `pip install -e .`: pip builds in a fresh temporary
# directory each time, so every target recompiled all of csrc (about 90 s).
$(ONPATH): $(STAMP)
	$(PY) -c "import os, sysconfig; open(os.path.join(sysconfig.get_paths()['purelib'], 'tcfa-checkout.pth'), 'w').write(os.getcwd() + '\n')"
	touch $(ONPATH)

# setup.py skips an up-to-date extension, and ninja recompiles only the objects
# whose sources or headers changed (one build directory per level).
build: $(ONPATH)
	$(PY) setup.py -q build_ext --inplace

# ruff (config in pyproject.toml) and clang-format (.clang-format) over the tree
lint: $(STAMP)
	$(VENV)/bin/ruff check tcfa tests benchmarks setup.py
	$(VENV)/bin/clang-format --dry-run --Werror csrc/*.cpp csrc/cpu/*

# Triton kernels are tested on CPU tensors by the interpreter; the variable
# must be set before triton is imported, so it is set for the whole run.
test: build lint
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests

# On a machine with a GPU: the CUDA tests on compiled kernels (skipped elsewhere, and under the interpreter
# they would not compile anything).
test-cuda: build
	TRITON_INTERPRET=0 $(PY) -m pytest -q tests/test_cuda.py

# Every Triton kernel compiled for sm_90 at the benchmark shapes and the extremes, no GPU needed
# (232 compiles: 7.5 min on 2 cores with triton's cache empty, 1.5 min from it); writes
# docs/kernel_compile.md. make test runs --quick (each kernel once, benchmark shapes, fp32).
compile-check: build
	$(PY) benchmarks/compile_check.py --write

demo: build
	$(PY) -m tcfa demo --out demo_output

bench: build
	$(PIP) install -q $(BENCH_DEPS) $(TORCH)
	$(PIP) install -q --no-deps $(BENCH_NODEPS)
	$(PY) -m tcfa bench
	$(PY) benchmarks/report.py

# A wheel built here, installed into a fresh venv beside the same torch, used
# from outside the checkout: `tcfa demo --quick` and `tcfa bench --quick`.
wheel-check: $(STAMP)
	bash benchmarks/wheel_check.sh $(PY)

clean:
	rm -rf build dist *.egg-info tcfa/_C*.so tcfa/_cpu_*.so
