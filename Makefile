# `make run` and `make test` each set up .venv themselves on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export PATH := $(abspath $(BIN)):$(PATH)
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: setup lock lint bench-bases run test test-fast ui serve bench bench-quick clean

setup: $(STAMP)

# Installs come from requirements.lock (every package pinned, with hashes), synced by uv: a fresh
# machine gets exactly the tested set. `make lock` regenerates it after a change to pyproject.toml.
UV_VERSION := 0.13.9
UV := $(VENV)/.uv/bin/uv
# --compile-bytecode: uv writes no .pyc by default, and where PYTHONDONTWRITEBYTECODE is set (as on this
# machine kind) every process would compile torch, mlflow and prefect from source again: about 5 s per
# process, and every pipeline stage is a process. Compiling once at install takes about 40 s.
# This machine kind keeps torch's wheels on disk; uv does not read pip.conf, so they are named here.
LOCAL_WHEELS := $(wildcard /opt/wheels)
LOCAL_INDEX := $(wildcard /opt/pypi-more/simple)
UV_SOURCES := --index-strategy unsafe-best-match $(if $(LOCAL_WHEELS),--find-links $(LOCAL_WHEELS)) $(if $(LOCAL_INDEX),--extra-index-url file://$(LOCAL_INDEX))

$(UV):
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check --target $(VENV)/.uv uv==$(UV_VERSION)

$(STAMP): requirements.lock pyproject.toml | $(UV)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(UV) pip sync --quiet --python $(BIN)/python $(UV_SOURCES) --require-hashes --compile-bytecode requirements.lock
	$(UV) pip install --quiet --python $(BIN)/python --no-deps -e .
	$(UV) pip check --python $(BIN)/python
	touch $(STAMP)

lock: | $(UV)  ## re-resolve requirements.lock from pyproject.toml (then run make test and commit both)
	$(UV) pip compile pyproject.toml --extra dev --python $(BIN)/python $(UV_SOURCES) \
	  --generate-hashes --no-emit-index-url --no-emit-find-links --quiet -o requirements.lock

run: $(STAMP)  ## run the whole pipeline (dvc repro through Prefect, logged in MLflow)
	$(BIN)/emoprune run

test: $(STAMP)  ## the test suite, slow end-to-end tests included, on 2 worker processes (see README, Tests)
	$(BIN)/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder

lint: $(STAMP)  ## ruff (lint and format) and mypy over pruning/, tasks/, flows/
	$(BIN)/ruff check
	$(BIN)/ruff format --check
	$(BIN)/mypy

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

ui: $(STAMP)  ## the MLflow UI on the project's tracking store
	$(BIN)/emoprune ui

CRON ?= 0 2 * * *
PREFECT_PORT ?= 4200
serve: $(STAMP)  ## serve the pipeline on a schedule (make serve CRON="0 2 * * *"); starts a Prefect server on :4200 if none answers, log in .emoprune/prefect-server.log; Ctrl-C stops both
	$(BIN)/emoprune serve --cron "$(CRON)" --server-port $(PREFECT_PORT)

bench-bases: $(STAMP)  ## train (or resume training) the benchmarks' base models, ResNet-20 then ResNet-56 (hours on 2 cores)
	$(BIN)/python bench/bases.py resnet20 resnet56

bench: $(STAMP)  ## full benchmark profile (ResNet-56 on the CIFAR-10 copy), then docs/benchmarks.md
	$(BIN)/python bench/run.py --profile full
	$(BIN)/python bench/report.py

bench-quick: $(STAMP)  ## quick benchmark profile (ResNet-20 on the CIFAR-10 copy)
	$(BIN)/python bench/run.py --profile quick
	$(BIN)/python bench/report.py

clean:
	rm -rf data/prepared models artifacts metrics plots mlflow.db mlruns mlartifacts
