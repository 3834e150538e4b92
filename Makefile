# Quick start:  make demo   (sets up .venv with the core install + the broker extra and runs the closed-loop demo)
#               make test   (sets up .venv with the dev + foundation + cluster + broker extras and runs the tests)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
# torch/torchvision pinned to the releases that lie on this machine's disk (no multi-GB download)
TORCH  ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test bench install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.core: pyproject.toml setup.py | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[broker]'
	touch $@

$(VENV)/.test: pyproject.toml setup.py | $(BIN)/python
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[dev,foundation,cluster,broker]'
	touch $@ $(VENV)/.core

install: $(VENV)/.core
install-test: $(VENV)/.test

demo: $(VENV)/.core
	$(BIN)/qcloop demo

test: $(VENV)/.test
	$(BIN)/python -m pytest -q

bench: $(VENV)/.test
	$(BIN)/python bench/analyze.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
