# The two set-up commands: `make run` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/rswitch serve $(ARGS)

test: $(STAMP)
	$(VENV)/bin/ruff check rswitch tests benchmarks
	$(PY) -m pytest -n auto -q

bench: $(STAMP)
	$(PY) benchmarks/bench_gateway.py
