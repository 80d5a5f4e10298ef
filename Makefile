# The two commands a newcomer runs: `make demo` and `make test`. Each does all its own set-up.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Installed when pyproject.toml changes; the stamp keeps repeated runs fast.
STAMP := $(VENV)/.installed

.PHONY: demo test test-unit test-service test-cluster lint format tools cluster-up cluster-down cluster-status clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[all,dev]'
	touch $(STAMP)

venv: $(STAMP)

## tools: etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, helm into ~/.cache/aar/bin;
## chromium and promtool (Debian's prometheus package) for the web UI and alert-rule tests
tools: $(STAMP)
	$(BIN)/aar-devcluster install

## demo: the main job: the control plane, the operator and services, and a 9-agent run applied
demo: tools
	$(BIN)/aar-devcluster demo

## test: lint, then every tier; e2e is skipped with its reason when Docker is absent
# pytest exits 5 when it collected nothing: said plainly, and still a failure.
test: lint tools
	$(BIN)/pytest tests || { status=$$?; \
	  if [ $$status -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; exit $$status; }

# The tiers, by what their tests need (tests/README.md).
test-unit: tools
	$(BIN)/pytest tests/unit

test-service: tools
	$(BIN)/pytest tests/service

test-cluster: tools
	$(BIN)/pytest tests/cluster

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

cluster-up: tools
	$(BIN)/aar-devcluster up

cluster-down: $(STAMP)
	$(BIN)/aar-devcluster down

cluster-status: $(STAMP)
	$(BIN)/aar-devcluster status

clean:
	-$(BIN)/aar-devcluster destroy
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
