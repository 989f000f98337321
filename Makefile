# Tightrope: `make demo` and `make test` are the two commands of the README.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck unit integration services install clean

$(STAMP): pyproject.toml build-constraints.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: an unpinned torch would pull another build over the network
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	# build-constraints.txt: visdom (adv-lib) builds only with setuptools<81
	PIP_BUILD_CONSTRAINT=build-constraints.txt $(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/tightrope demo --out demo-out

services:
	bash .ci/ensure-services

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

# Unit tests need no service (no Redis, PostgreSQL, bubblewrap, Chromium or worker processes);
# integration tests are the rest. tests/conftest.py marks them (see the README, "Tests").
PYTEST := $(BIN)/python -m pytest -q -ra --durations=25

# Unit tests are torch on small tensors: two pytest processes of one thread each use two cores
# better than one process of two threads.
unit: $(STAMP)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PYTEST) -m "not integration and not serial" -n 2 --dist worksteal
	$(PYTEST) -m "not integration and serial"

# Most integration tests wait on processes (workers starting, sandboxed children importing
# torch): two pytest processes overlap the waits (pytest-xdist; an idle one takes tests queued
# for the other (worksteal); the longest tests first, see
# tests/conftest.py; each process has its own Redis databases: tests/fixtures/redis_dbs.py).
# Tests that hold timing bounds of a second or two (marked `serial`) run after them, alone.
integration: $(STAMP)
	$(PYTEST) -m "integration and not serial" -n 2 --dist worksteal
	$(PYTEST) -m "integration and serial"

# Under `make test` a missing service fails the tests that need it instead of skipping them.
test: export TIGHTROPE_REQUIRE_SERVICES := 1
test: $(STAMP) services lint typecheck unit integration

clean:
	rm -rf .tightrope demo-out .pytest_cache .mypy_cache .ruff_cache
