# metal-agent developer and install targets. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.DEFAULT_GOAL := help

.PHONY: help
help: ## List targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  %-28s %s\n", $$1, $$2}'

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	@touch $@

.PHONY: venv
venv: $(BIN)/.installed ## Create .venv with metal-agent (editable) and test dependencies

.PHONY: assets
assets: venv ## Build/cache kube-apiserver, etcd, llama-server and the tiny test models (~/.cache/metal-agent)
	scripts/build-controlplane.sh
	scripts/build-llama-server.sh
	$(BIN)/python tests/support/tiny_model.py --vocab "$$(dirname "$$(dirname "$$(scripts/build-llama-server.sh)")")/models/ggml-vocab-llama-spm.gguf"

.PHONY: dev
dev: venv assets ## Everything needed to develop and run the tests

.PHONY: test
test: venv ## Run the whole test suite against real parts (run `make dev` first)
	METAL_AGENT_REQUIRE_ASSETS=1 $(BIN)/pytest

.PHONY: test-unit
test-unit: venv ## Run only the fast unit tests (no builds needed)
	$(BIN)/pytest tests/unit

.PHONY: install-powermetrics-sudo
install-powermetrics-sudo: ## Grant this user password-less sudo for the exact powermetrics command the agent runs
	scripts/install-powermetrics-sudo.sh

.PHONY: uninstall-powermetrics-sudo
uninstall-powermetrics-sudo: ## Remove that grant
	scripts/uninstall-powermetrics-sudo.sh
