# kubetasks: `make demo` and `make test` are the two commands; both install
# what they need on a fresh Debian machine (as root) and start throwaway
# servers under .run/.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export KUBETASKS_RUN_DIR := $(CURDIR)/.run

.PHONY: venv ui chromium dev down demo test lint unit packaging integration e2e bench cluster cluster-down clean faults

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV) || { apt-get update -qq && apt-get install -y -qq python3-venv && $(PY) -m venv $(VENV); }
	@command -v npm >/dev/null || { echo "the dashboard's page is built with Node.js 20 and npm: install them first"; exit 1; }
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,fast]'
	@touch $(STAMP)

# The editable install built the dashboard's page once; this rebuilds it when its sources changed.
venv: $(STAMP)
	@$(BIN)/python operator/_kubetasks_ui.py

ui: venv ## rebuild the dashboard's page (dashboard-ui/ -> operator/kubetasks/dashboard/static/)
	$(BIN)/python operator/_kubetasks_ui.py --force

# The browser tests drive Debian's chromium (never a downloaded browser).
chromium:
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium; }

dev: venv ## start PostgreSQL and Redis on free ports under .run/
	$(BIN)/kubetasks dev up

down: ## stop everything started under .run/, and the local node if this clone owns it
	-@pid=$$(cat .run/dashboard.pid 2>/dev/null) && grep -qa dashboard /proc/$$pid/cmdline 2>/dev/null && kill $$pid; rm -f .run/dashboard.pid
	-@test -x $(BIN)/kubetasks && $(BIN)/kubetasks dev down
	-@test -x e2e/cluster/down.sh && bash e2e/cluster/down.sh

demo: venv ## the main job on a local environment
	$(BIN)/python examples/demo.py

lint: venv
	$(BIN)/ruff check operator tests bench examples e2e
	$(BIN)/ruff format --check operator tests bench examples e2e
	$(BIN)/mypy
	cd operator && ../$(BIN)/lint-imports --config ../pyproject.toml

# No server, no network, no program but Python: tests/unit/conftest.py fails a test that tries.
unit: venv
	$(BIN)/pytest tests/unit -q

# The chart through the real helm and kubeconform (built from Go on first use), the Dockerfile
# and its install step (pip from the package registry).
packaging: venv
	bash e2e/cluster/build.sh helm kubeconform
	bash e2e/cluster/schemas.sh
	$(BIN)/pytest tests/packaging -q

integration: venv chromium
	$(BIN)/pytest tests/integration -q

e2e: venv
	$(BIN)/pytest e2e -q -p no:cacheprovider

test: venv lint chromium ## everything CI runs: unit, packaging (helm, kubeconform, pip), integration (PostgreSQL, Redis, Chromium), faults, e2e (kube-apiserver, kubectl, helm, a real node)
	bash e2e/cluster/build.sh
	bash e2e/cluster/schemas.sh
	bash tests/faults/build_toxiproxy.sh >/dev/null
	$(BIN)/pytest tests e2e -q -p no:cacheprovider

RUNS ?= 1
faults: venv ## the fault matrix (tests/faults), each scenario RUNS times; prints the table
	bash tests/faults/build_toxiproxy.sh >/dev/null
	FAULTS_RUNS=$(RUNS) FAULTS_STRICT=1 $(BIN)/pytest tests/faults -q -p no:cacheprovider

bench: venv ## kubetasks side by side with pgqueuer and procrastinate; prints a table, writes bench/results/latest.json
	$(BIN)/pip install -q -e '.[dev,fast,bench]'
	$(BIN)/python bench/run.py

cluster: ## a local control plane and this machine's node (kubelet, containerd; built on first use)
	bash e2e/cluster/up.sh --node

cluster-down: ## the node (if this clone owns it) and the control plane
	bash e2e/cluster/down.sh

clean: down
	rm -rf .run
