# Every target that needs Python depends on the virtual environment, so a fresh clone needs only `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

RUN ?= $(shell ls -td runs/*/ 2>/dev/null | head -1)
RUNS_DIR ?= runs
REPOSITORY ?= models
NAME ?= vae-mnist
DATASET ?= auto

.PHONY: help install test lint format train run export clean

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  %-14s %s\n", $$1, $$2}'

install: $(STAMP) ## create .venv with the project, its training and dev extras (quick when done)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[training,dev]'
	touch $@

test: install lint ## lint, then the whole test suite (what CI runs)
	$(PY) -m pytest

lint: install ## ruff (lint + format check) and mypy
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy training serving tests $(wildcard bench/*.py)

format: install ## apply ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

train: install ## a full default training run into runs/<timestamp>
	$(PY) -m training.train --dataset $(DATASET) --out $(RUNS_DIR)/$$(date +%Y%m%d-%H%M%S)

# The newest runs/*/best.pt (a run still in its first epoch has none yet), or RUN's when RUN is given.
EXPORT_CHECKPOINT = $(if $(filter file,$(origin RUN)),$(shell ls -t $(RUNS_DIR)/*/best.pt 2>/dev/null | head -1),$(patsubst %/,%,$(RUN))/best.pt)
export: install ## export the newest run's best.pt (or RUN=runs/<name>) as the next version of $(REPOSITORY)/$(NAME)
	@test -n "$(EXPORT_CHECKPOINT)" || { echo "error: no $(RUNS_DIR)/*/best.pt: run 'make train' first, or pass RUN=runs/<name>" >&2; exit 1; }
	$(PY) -m training.export --checkpoint $(EXPORT_CHECKPOINT) --repository $(REPOSITORY) --name $(NAME)

run: install ## quickstart: train a quick model
	$(PY) -m training.train --dataset $(DATASET) --epochs 10 --out $(RUNS_DIR)/quickstart

clean: ## remove the venv, caches and build outputs (keeps runs/ and models/)
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
