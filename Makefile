# The two commands of README.md: `make demo` and `make test`. Everything else
# here is what they need on a fresh clone: a .venv at the repo root with the
# pinned CPU torch (the wheel on this machine's disk; an unpinned torch would
# download a multi-GB CUDA build) and the compiled extension.
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
TORCH  := torch==2.13.0
DEPS   := numpy scipy scikit-learn POT triton pytest hypothesis ninja pybind11 safetensors setuptools wheel transformers tqdm matplotlib
# timm is not installed: it imports torchvision, and PyPI's torchvision cannot
# load beside the CPU torch 2.13.0 wheel ("operator torchvision::nms does not
# exist"). The models in tests and the demo come from transformers' configs.
# peers timed by the benchmarks only (jax is large: not needed for test/demo)
BENCH_DEPS := geomloss ott-jax
STAMP  := $(VENV)/.deps-installed

.PHONY: all build test demo bench clean

all: build

$(PY):
	python3 -m venv $(VENV)

$(STAMP): $(PY) Makefile
	$(PIP) install -q $(TORCH)
	$(PIP) install -q $(DEPS) $(TORCH)
	touch $(STAMP)

build: $(STAMP)
	$(PIP) install -q --no-build-isolation --no-deps -e .

# Triton kernels are tested on CPU tensors by the interpreter; the variable
# must be set before triton is imported, so it is set for the whole run.
test: build
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests

demo: build
	$(VENV)/bin/tcfa demo --out demo_output

bench: build
	$(PIP) install -q $(BENCH_DEPS) $(TORCH)
	$(VENV)/bin/tcfa bench
	$(PY) benchmarks/report.py

clean:
	rm -rf build *.egg-info tcfa/_C*.so
