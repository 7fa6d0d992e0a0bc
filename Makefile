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
assets: venv ## Build/cache kube-apiserver, etcd, Toxiproxy, Prometheus (with Kubernetes discovery), llama-server, LLMKube's manager and llama-swap (need ../shared), the tiny test models (GGUF, split GGUF, mmproj, MLX) and an older mlx-lm (~/.cache/metal-agent)
	scripts/build-controlplane.sh
	scripts/build-toxiproxy.sh
	scripts/build-prometheus.sh
	scripts/build-llama-server.sh
	$(BIN)/python tests/support/tiny_model.py --vocab "$$(dirname "$$(dirname "$$(scripts/build-llama-server.sh)")")/models/ggml-vocab-llama-spm.gguf"
	$(BIN)/python tests/support/tiny_mlx_model.py
	$(BIN)/python -m tests.support.tiny_mmproj
	$(BIN)/python tests/support/old_mlx_lm.py  # mlx-lm 0.30.5 (one 370 kB wheel) for the version-dialect test
	@# Exit 4: no vendored LLMKube source (a user's clone); the tests that need it skip.
	scripts/build-llmkube.sh || { rc=$$?; if [ $$rc -eq 4 ]; then echo ">> skipped LLMKube's manager: no ../shared (its coexistence tests will skip)"; else exit $$rc; fi; }
	@# Exit 4: no vendored llama-swap source; the front-door bench's side-by-side section skips.
	scripts/build-llama-swap.sh || { rc=$$?; if [ $$rc -eq 4 ]; then echo ">> skipped llama-swap: no ../shared (the front-door bench's side-by-side section will skip)"; else exit $$rc; fi; }

.PHONY: dev
dev: venv assets ## Everything needed to develop and run the tests

.PHONY: demo
demo: dev ## Run the whole loop locally: control plane, agent, a sample model, a chat completion, clean-up
	$(BIN)/python scripts/demo.py

.PHONY: bench
bench: dev ## Control-loop figures (latency, API load, adoption, footprint) and per-engine start figures (llama-server, mlx_lm.server); tables + bench/results/*.json
	$(BIN)/python bench/control_loop.py
	$(BIN)/python bench/runtimes.py

.PHONY: bench-fleet
bench-fleet: dev ## Three fleet Macs (needs root): failover, double serving, drain gaps, idle API load; table + bench/results/fleet.json
	$(BIN)/python bench/fleet.py

.PHONY: bench-compat
bench-compat: dev ## Status writes beside LLMKube's real controller (needs root and ../shared); table + bench/results/compat.json
	$(BIN)/python bench/compat.py --changes 5

.PHONY: bench-review-flood
bench-review-flood: dev ## 2,000 made-up bearer tokens from one source and from 40 (needs root): TokenReviews sent, a real scrape's latency during it; table + bench/results/review_flood.json, exit 1 on a missed goal
	$(BIN)/python bench/review_flood.py

.PHONY: bench-front-door
bench-front-door: dev ## Direct to llama-server vs through the front door: added latency p50/p99, streaming throughput, 64 concurrent streams; llama-swap side by side (overhead, swap time, RSS); table + bench/results/front_door.json, exit 1 on a missed goal
	$(BIN)/python bench/front_door.py --requests 2000

.PHONY: bench-on-demand
bench-on-demand: dev ## A request to a model unloaded for being idle: cold start minus the engine's own start; table + bench/results/on_demand.json
	$(BIN)/python bench/on_demand.py --rounds 10

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

WIRED_LIMIT_MB ?=

.PHONY: install-wired-limit
install-wired-limit: ## Set the GPU's wired-memory ceiling at every boot: a root LaunchDaemon running `/usr/sbin/sysctl iogpu.wired_limit_mb=$(WIRED_LIMIT_MB)` (doctor suggests a value)
	scripts/install-wired-limit.sh --limit-mb "$(WIRED_LIMIT_MB)"

.PHONY: uninstall-wired-limit
uninstall-wired-limit: ## Remove that LaunchDaemon (the ceiling stays until reboot)
	scripts/uninstall-wired-limit.sh

# agent: a LaunchAgent (runs while you are logged in at the GUI); daemon: a
# LaunchDaemon that starts at boot and runs as you (headless Macs, SSH installs).
MODE ?= agent

.PHONY: install-metal-agent
install-metal-agent: ## Install (or upgrade) the agent: own venv, plist, launchctl bootstrap + kickstart (MODE=daemon: a LaunchDaemon for headless Macs)
	scripts/install-metal-agent.sh --mode "$(MODE)"

.PHONY: uninstall-metal-agent
uninstall-metal-agent: ## Unload the LaunchAgent or LaunchDaemon, remove its plist and venv (STOP_MODELS=1 also stops llama-servers and the front door)
	scripts/uninstall-metal-agent.sh
