# `make run` and `make test` each set up .venv themselves on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export PATH := $(abspath $(BIN)):$(PATH)
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: setup run test test-fast ui serve bench bench-quick clean

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

CRON ?= 0 2 * * *
PREFECT_PORT ?= 4200
serve: $(STAMP)  ## start a local Prefect server (UI on :4200) and serve the pipeline on a schedule: make serve CRON="0 2 * * *"
	PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api $(BIN)/prefect server status >/dev/null 2>&1 \
	  || ($(BIN)/prefect server start --background --port $(PREFECT_PORT) \
	      && PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api $(BIN)/prefect server status --wait --timeout 180)
	PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api $(BIN)/emoprune serve --cron "$(CRON)"

bench: $(STAMP)  ## full benchmark profile (ResNet-56 on the CIFAR-10 copy), then docs/benchmarks.md
	$(BIN)/python bench/run.py --profile full
	$(BIN)/python bench/report.py

bench-quick: $(STAMP)  ## quick benchmark profile (ResNet-20 on the CIFAR-10 copy)
	$(BIN)/python bench/run.py --profile quick
	$(BIN)/python bench/report.py

clean:
	rm -rf data/prepared models artifacts metrics plots mlflow.db mlruns mlartifacts
