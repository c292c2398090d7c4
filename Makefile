# DeepMarket: `make demo` and `make test` do every set-up step themselves.
# Needs only Python 3.11 and Node 20 with npm; everything else comes from PyPI and npm.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP_PY := $(VENV)/.installed
STAMP_NODE := node_modules/.installed
STAMP_BUILD := build/contracts/.compiled

export PATH := $(CURDIR)/node_modules/.bin:$(CURDIR)/$(VENV)/bin:$(PATH)
export SOLCX_BINARY_PATH := $(CURDIR)/toolchain/solcx
export TF_CPP_MIN_LOG_LEVEL := 2
export TF_ENABLE_ONEDNN_OPTS := 0
export TF_USE_LEGACY_KERAS := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

# One setting picks the local chain everywhere: DEEPMARKET_CHAIN=ganache (default) or anvil.
DEEPMARKET_CHAIN ?= ganache
export DEEPMARKET_CHAIN
BROWNIE_NETWORK := $(if $(filter anvil,$(DEEPMARKET_CHAIN)),anvil,ganache-cli)

.PHONY: setup demo walkthrough test test-contracts test-python lint clean

setup: $(STAMP_PY) $(STAMP_NODE) $(STAMP_BUILD)

$(STAMP_PY): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.lock
	# tf-keras without its dependencies: they would pull the full GPU tensorflow build.
	$(PY) -m pip install --quiet --no-deps tf-keras==2.21.0
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

$(STAMP_NODE): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

$(STAMP_BUILD): $(STAMP_PY) $(STAMP_NODE) $(wildcard contracts/*.sol contracts/*/*.sol) brownie-config.yaml
	$(VENV)/bin/brownie compile
	touch $@

demo: setup
	$(PY) -m deepmarket demo

walkthrough: setup
	$(PY) -m deepmarket walkthrough

test: setup test-python test-contracts

test-python: setup
	$(PY) -m pytest tests -p no:pytest-brownie --ignore=tests/contracts

test-contracts: setup
	$(VENV)/bin/brownie test tests/contracts --network $(BROWNIE_NETWORK)

lint: setup
	$(VENV)/bin/ruff check deepmarket scripts tests bench

clean:
	rm -rf build reports .deepmarket
