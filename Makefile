# The two commands of the README. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench clean-results

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[sim,dev]"
	touch $(STAMP)

## demo: set up and run the main job on the embedded default (simulated data, local profile, whole DAG)
demo: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m ptycore.demo

## test: set up and pass the tests
# the tests' processes share one compilation cache of their own (fresh with a fresh .venv);
# PYTEST_WORKERS test files run at once (pytest-xdist; a file's tests stay on one worker, so its
# module fixtures are built once; 0 runs them all in this process)
PYTEST_WORKERS ?= 2
test: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH PTYCORE_COMPILATION_CACHE=$(CURDIR)/$(VENV)/jax-cache \
	  JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0.2 $(BIN)/python -m pytest -q -m "not gpu and not mpi and not slurm" \
	  -n $(PYTEST_WORKERS) --dist loadfile ; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "no tests collected"; rc=0; fi; exit $$rc

lint: $(STAMP)
	$(BIN)/ruff check ptycore tests bench
	$(BIN)/snakefmt --check Snakefile workflow

bench: $(STAMP)
	$(BIN)/python bench/forward.py
