# `make run` and `make test` each set up .venv themselves on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export PATH := $(abspath $(BIN)):$(PATH)
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: setup run test test-fast ui bench bench-quick clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)  ## run the whole pipeline (dvc repro through Prefect, logged in MLflow)
	$(BIN)/emoprune run

test: $(STAMP)  ## the test suite, slow end-to-end tests included
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

ui: $(STAMP)  ## the MLflow UI on the project's tracking store
	$(BIN)/emoprune ui

bench: $(STAMP)  ## full benchmark profile (ResNet-56 on the CIFAR-10 copy), then docs/benchmarks.md
	$(BIN)/python bench/run.py --profile full
	$(BIN)/python bench/report.py

bench-quick: $(STAMP)  ## quick benchmark profile (ResNet-20 on the CIFAR-10 copy)
	$(BIN)/python bench/run.py --profile quick
	$(BIN)/python bench/report.py

clean:
	rm -rf data/prepared models artifacts metrics plots mlflow.db mlruns mlartifacts
