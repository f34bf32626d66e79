# Orchard: `make demo` sets up and runs the shipped jobs; `make test` sets up and runs the checks.
SHELL := /bin/bash
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed

.PHONY: install demo test lint unit ui clean sysdeps

# The whole pinned stack in ONE resolver call, so Flower's ray/packaging pins and ours hold together.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade "pip<27"
	$(PIP) install -q -c constraints.txt $$(.ci/torch-index $(PIP)) -e '.[dev]'
	@$(PY) -c "import torch, ray, flwr, mlflow, pyspark; print('stack:', 'torch', torch.__version__, '| ray', ray.__version__, '| flwr', flwr.__version__, '| mlflow', mlflow.__version__, '| pyspark', pyspark.__version__)"
	@touch $(STAMP)

install: $(STAMP) sysdeps

# Java runs Spark; it is on this image, and apt installs it elsewhere.
sysdeps:
	@command -v java >/dev/null || (apt-get update -qq && apt-get install -y -qq openjdk-17-jre-headless)

demo: install
	$(VENV)/bin/orchard demo

lint: install
	$(VENV)/bin/ruff check platform tests

unit: install
	$(PY) -m pytest -q -m "not slow"

test: install lint
	$(PY) -m pytest -q --durations=15

ui: install
	$(VENV)/bin/orchard ui

clean:
	rm -rf .orchard mlflow.db mlruns mlartifacts
