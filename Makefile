# Tightrope: `make demo` and `make test` are the two commands of the README.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck unit integration services install mlserver clean

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

# MLServer (a third-party Open Inference Protocol server) in a venv of its own: its FastAPI
# pin (<0.116) clashes with ours. The endpoint tests start it on loopback (tests/workers/
# endpoints/test_mlserver.py); created once, about a minute and 330 MB.
MLSERVER_VENV := .venv-mlserver
MLSERVER_STAMP := $(MLSERVER_VENV)/.installed

$(MLSERVER_STAMP):
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required"'
	test -x $(MLSERVER_VENV)/bin/python || $(PYTHON) -m venv $(MLSERVER_VENV)
	$(MLSERVER_VENV)/bin/pip install --quiet --disable-pip-version-check mlserver==1.7.1
	touch $(MLSERVER_STAMP)

mlserver: $(MLSERVER_STAMP)

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
integration: $(STAMP) $(MLSERVER_STAMP)
	$(PYTEST) -m "integration and not serial" -n 2 --dist worksteal
	$(PYTEST) -m "integration and serial"

# Under `make test` a missing service fails the tests that need it instead of skipping them.
# MLServer's venv (mostly download and unpacking) is built while the unit tests run, not
# before the integration tests; its log is shown if it fails.
MLSERVER_LOG := $(MLSERVER_VENV).log
test: export TIGHTROPE_REQUIRE_SERVICES := 1
test: $(STAMP) services lint typecheck
	@$(MAKE) --no-print-directory mlserver > $(MLSERVER_LOG) 2>&1 & build=$$!; \
	$(MAKE) --no-print-directory unit; unit=$$?; \
	if ! wait $$build; then cat $(MLSERVER_LOG); echo "make mlserver failed"; exit 1; fi; \
	test $$unit -eq 0 && $(MAKE) --no-print-directory integration

clean:
	rm -rf .tightrope demo-out .pytest_cache .mypy_cache .ruff_cache
