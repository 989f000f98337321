# Tightrope: `make demo` and `make test` are the two commands of the README.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck unit services install clean

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

unit: $(STAMP)
	$(BIN)/python -m pytest -q -ra

test: $(STAMP) services lint typecheck unit

clean:
	rm -rf .tightrope demo-out .pytest_cache .mypy_cache .ruff_cache
