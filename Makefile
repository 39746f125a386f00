# Two commands on a fresh machine:
#   make bench   set up .venv (CPU torch 2.13.0 + curry_train) and run every benchmark with --quick (reduced
#                settings, about a minute on 2 CPU cores) on the embedded model and data: bench-results/<time>/report.md
#   make test    set up .venv if needed and run the fast suite: every module's unit tests and one multi-process
#                smoke test per primitive (a few minutes on 2 cores)
#   make test-all  every test (what CI runs through .ci/run)
#   make check-latest  the Claude Code tests against today's @latest release as well as the pinned one
#   make gpu-check  on a GPU machine: every path only a GPU exercises (nccl ranks, bf16 FSDP2 vs DDP, MFU vs the bf16
#                peak, PyTorch's CP path, CUDA memory), at most 8 minutes, one report bench-results/gpu-check.md;
#                without CUDA it says it skipped (GPU_CHECK="--force-cpu" runs the checks on CPU as a test)
# make bench-full runs the full settings; BENCH="mfu ga model=small" picks benches and overrides for either.
# Re-running skips the install unless template/pyproject.toml or this Makefile changed.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.curry-train-installed
BENCH  ?=
GPU_CHECK ?=

.PHONY: bench bench-full gpu-check test test-all check-latest train setup clean

setup: $(STAMP)

$(STAMP): template/pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0 numpy
	$(PY) -m pip install --quiet -e 'template[dev]'
	touch $(STAMP)

bench: $(STAMP)
	$(PY) -m curry_train bench --quick $(BENCH)

bench-full: $(STAMP)
	$(PY) -m curry_train bench $(BENCH)

gpu-check: $(STAMP)
	$(PY) -m curry_train gpu-check $(GPU_CHECK)

test: $(STAMP)
	$(PY) -m pytest -m 'not slow'

test-all: $(STAMP)
	$(PY) -m pytest

check-latest: $(STAMP)
	PY=$(PY) .ci/check-latest

train: $(STAMP)
	$(PY) -m curry_train train

clean:
	rm -rf $(VENV) bench-results .pytest_cache
