# make run   — install, start local Redis/PostgreSQL if needed, migrate, run the service
#              in demo mode (simulated routers, demo tenant; dashboard on 127.0.0.1:8080)
# make test  — the same set-up (plus Debian's chromium for the browser test and the
#              prometheus package's promtool for the alert rules), then the whole test suite
VENV   := .venv
PY     := $(VENV)/bin/python
PYTHON ?= python3

.DEFAULT_GOAL := check
.PHONY: check install services browser promtool node-example migrate run test lint bench bench-peers clean

check: lint test

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

services:
	bash scripts/services.sh

browser:
	bash scripts/browser.sh

# promtool (Debian's prometheus package, unpacked only), for the alert rules' test.
promtool:
	bash scripts/promtool.sh

# The Node example's packages (examples/node), for its test.
node-example:
	bash scripts/node_example.sh

migrate: install services
	$(PY) -m imsys migrate

# The demo: in-process simulators and a demo tenant (IMSYS_DEMO__ENABLED=false for none).
IMSYS_DEMO__ENABLED ?= true
run: migrate
	IMSYS_DEMO__ENABLED=$(IMSYS_DEMO__ENABLED) $(PY) -m imsys run

test: install services browser promtool node-example
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check imsys tests
	$(VENV)/bin/mypy imsys

# Both workloads of the design card, 5 runs each, then the medians (BENCH_RUNS=n to change;
# BENCH_MILLION=1 adds the 1,000,000-job memory run); then `bench sync` 3 times each at
# 1 x 10,000 and 10 x 10,000 subscribers, with their medians (BENCH_SYNC=0 skips them).
BENCH_RUNS ?= 5
bench: install services
	$(PY) scripts/bench_median.py $(BENCH_RUNS)

bench-peers:
	bash ../shared/bench/peers/run

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
