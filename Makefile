# make run   — install, start local Redis/PostgreSQL if needed, migrate, run the service
# make test  — the same set-up, then the whole test suite
VENV   := .venv
PY     := $(VENV)/bin/python
PYTHON ?= python3

.DEFAULT_GOAL := check
.PHONY: check install services migrate run test lint bench bench-peers clean

check: lint test

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

services:
	bash scripts/services.sh

migrate: install services
	$(PY) -m imsys migrate

run: migrate
	$(PY) -m imsys run

test: install services
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check imsys tests
	$(VENV)/bin/mypy imsys

# Both workloads of the design card, 5 runs each, then the medians (BENCH_RUNS=n to change;
# BENCH_MILLION=1 adds the 1,000,000-job memory run).
BENCH_RUNS ?= 5
bench: install services
	$(PY) scripts/bench_median.py $(BENCH_RUNS)

bench-peers:
	bash ../shared/bench/peers/run

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
