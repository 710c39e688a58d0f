# Tessera — `make help` lists the targets.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export TESSERA_HOME ?= $(CURDIR)/.tessera

.PHONY: viewer browser bench-serving test-faults bench-load stack-install vips bench-tiling
.PHONY: kube-up kube-down crds crds-check helm-check test-k8s
.PHONY: help venv protos protos-check lint stack-up stack-down up down run status \
        test test-unit test-fuzz bench clean

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | \
	  awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip==25.3
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP) ## create .venv with the pinned dependencies (and the `tessera` CLI)

protos: $(STAMP) ## regenerate Python code from protos/ (next to each .proto)
	scripts/gen_protos.sh

protos-check: protos ## fail if the checked-in generated code is stale
	@git diff --exit-code --stat -- protos || \
	  { echo "generated code is stale: run 'make protos' and commit" >&2; exit 1; }
	@test -z "$$(git status --porcelain -- protos)" || \
	  { git status --porcelain -- protos; echo "untracked generated files" >&2; exit 1; }

lint: $(STAMP) ## ruff and mypy
	$(VENV)/bin/ruff check services tests deploy scripts
	$(VENV)/bin/ruff format --check services tests deploy scripts
	$(VENV)/bin/mypy services

stack-up: ## obtain, build (cached) and start Kafka, the S3 server and FerretDB
	deploy/local/stack.sh up

stack-install: ## obtain and build the servers into the cache (no start)
	deploy/local/stack.sh install

stack-down: ## stop Kafka, the S3 server and FerretDB
	deploy/local/stack.sh down

up: $(STAMP) viewer stack-up kube-up ## everything: servers, then the six services, waits until healthy
	$(PY) deploy/local/devstack.py up

down: ## stop exactly what `make up` started
	-@test -x $(PY) && $(PY) deploy/local/devstack.py down
	deploy/local/kube.sh down
	deploy/local/stack.sh down

status: ## health of the servers and services
	-deploy/local/stack.sh status
	-deploy/local/kube.sh status
	$(PY) deploy/local/devstack.py status

run: up ## the main job: sample slides through every service, outcome printed
	$(PY) -m services.cli.demo

test-unit: $(STAMP) ## unit tests only (no servers)
	$(PY) -m pytest -q tests/unit

FUZZ_EXAMPLES ?= 10000
test-fuzz: $(STAMP) ## long fuzzing run of the upload path and the de-identification parsers (FUZZ_EXAMPLES cases)
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m tests.fuzz.run

test: up browser ## everything set up, then all tests (unit, contract on fakes and real servers, e2e)
	$(PY) -m pytest -q -p no:cacheprovider tests -rs

kube-up: ## build (cached) and start etcd + kube-apiserver on 127.0.0.1 for the operator's tests
	deploy/local/kube.sh up

kube-down: ## stop etcd + kube-apiserver
	deploy/local/kube.sh down

crds: $(STAMP) ## regenerate the CRDs (charts/tessera/crds, deploy/k8s/crds) from services/operator/schema.py
	$(PY) -m services.operator.crds

crds-check: $(STAMP) ## fail if the committed CRDs (or the chart's dashboard copy) are stale
	$(PY) -m services.operator.crds --check

helm-check: ## helm lint + helm template of charts/tessera (helm built from its Go module, cached)
	deploy/local/kube.sh helm lint --strict charts/tessera
	deploy/local/kube.sh helm template tessera charts/tessera --set node.enabled=true >/dev/null

test-k8s: $(STAMP) stack-up kube-up ## the operator and the chart against the real kube-apiserver + local stack
	$(PY) -m pytest -q -p no:cacheprovider tests/k8s -rs

viewer: $(STAMP) ## vendor the pinned OpenSeadragon from the npm registry into the viewer (cached)
	$(PY) services/tiling/viewer/vendor.py

browser: ## Debian's chromium for the viewer's browser test (installed once, as root)
	@command -v chromium >/dev/null || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

bench-serving: $(STAMP) ## tile serving (HTTP cold/cached, gRPC) vs raw S3 reads on the running stack
	$(PY) scripts/bench_serving.py

test-faults: $(STAMP) stack-install ## fault campaign, long form: 50 slides, SIGKILLs, Kafka restart, S3/FerretDB down 30 s (own stack)
	$(PY) -m tests.faults.harness --slides 50 --outage 30

bench-load: $(STAMP) stack-install ## 10 min of sustained uploads into a second stack: throughput, lag, latency, memory
	$(PY) scripts/bench_load.py --minutes 10

vips: ## Debian's libvips-tools (`vips dzsave`, the tiling benchmark's reference; once, as root)
	@command -v vips >/dev/null || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libvips-tools >/dev/null; }

bench-tiling: $(STAMP) vips ## Deep Zoom pyramid of a generated 1.07-gigapixel SVS: Tessera vs vips dzsave
	$(PY) scripts/bench_tiling.py

bench: $(STAMP) vips ## de-identification vs a plain copy (~1.4 GB SVS), then tiling vs vips dzsave (slides cached in .tessera/cache/bench)
	$(PY) scripts/bench_deid.py
	$(PY) scripts/bench_tiling.py

clean: down ## stop everything and delete the local stack's data (keeps the download cache)
	rm -rf $(TESSERA_HOME)/stack
