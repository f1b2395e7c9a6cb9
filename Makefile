# normlab: `make demo` runs the main job on the embedded default, `make test` runs the suite.
# Both bootstrap what they need: a virtual environment with the pinned packages, and Debian's
# Fashion-MNIST (and g++, for the CPU norm kernels, if no compiler is there) when apt is there.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.normlab-installed
PYTEST_ARGS ?=
# the exact versions the tests ran on; another pair runs the suite on it in its own VENV, e.g. the declared lower
# bound: make test VENV=.venv-min TORCH_PINS="torch==2.4.1 torchvision==0.19.1"
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: help install data demo test test-fast docs bench bench-quick gpu-check clean

help:
	@echo "make demo   - the normalization study on the quick preset (Fashion-MNIST subset); prints the report path"
	@echo "make test   - run the whole test suite (slow end-to-end tests included)"
	@echo "make test-fast - the suite without the tests marked slow"
	@echo "make docs   - build the documentation site into site/ (strict: broken links and references fail)"
	@echo "make bench  - every benchmark in bench/ (~2.5 h on 2 cores), then rewrite BENCHMARKS.md"
	@echo "make bench-quick - the same with fewer repeats (a smoke run; numbers are rough)"
	@echo "make gpu-check - bench/bench_gpu.py on the GPU with the Python that has torch (no install; < 8 min on an H100)"

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH_PINS)
	$(BIN)/python -m pip install -q -e '.[test]'
	@touch $@

install: $(STAMP)

data:
	@bash scripts/get-fashion-mnist.sh
	@bash scripts/get-cxx.sh
	@bash scripts/get-chromium.sh

demo: $(STAMP) data
	$(BIN)/normlab study --preset quick --out studies/quick
	@echo "report: $$(pwd)/studies/quick/report.html  (run again: finished runs are skipped)"

test: $(STAMP) data
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP) data
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

# the docs extra is part of the test extra, so the venv of `make test` has it
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site
	@echo "docs: $$(pwd)/site/index.html"

bench: $(STAMP) data
	$(BIN)/python bench/run_all.py

bench-quick: $(STAMP) data
	$(BIN)/python bench/run_all.py --quick

# The GPU machine's own Python and torch, no virtual environment and no network: normlab from src/
# (grad-cam for the Grad-CAM part: scripts/gpu-wheels.sh, then install .whl/ there).
GPU_PYTHON ?= python3
gpu-check:
	PYTHONPATH=src$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_PYTHON) bench/bench_gpu.py --out bench/results/gpu.json

clean:
	rm -rf $(VENV) build site src/*.egg-info .pytest_cache
