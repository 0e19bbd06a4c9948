# The two set-up commands: `make run` and `make test`. Each creates .venv on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# llama.cpp is built from source once, as a portable x86-64 wheel (AVX2, no AVX-512/AMX:
# the native build's AMX kernels crash on machines that do not grant AMX state), and cached
# outside the clone so later clones and CI reuse it. Its progress is filtered line by line:
# every stage of the pipe flushes each line (grep --line-buffered, sed -u), so it streams.
LLAMA_VERSION := 0.3.36
WHEELS ?= $(HOME)/.cache/rswitch/wheels
LLAMA_CMAKE := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
  -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF

.PHONY: run test lint bench llama-wheel

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(MAKE) --no-print-directory llama-wheel
	$(PY) -m pip install --quiet --find-links $(WHEELS) -e '.[test,local]'
	touch $(STAMP)

llama-wheel:
	@if ls $(WHEELS)/llama_cpp_python-$(LLAMA_VERSION)-*.whl >/dev/null 2>&1; then \
	  echo "llama-cpp-python $(LLAMA_VERSION): using the cached wheel in $(WHEELS)"; \
	else \
	  echo "Building llama-cpp-python $(LLAMA_VERSION) from source, once (5-10 minutes on 2 cores; cached in $(WHEELS))"; \
	  mkdir -p $(WHEELS); \
	  set -o pipefail; CMAKE_ARGS="$(LLAMA_CMAKE)" PYTHONUNBUFFERED=1 $(PY) -m pip wheel -v --no-deps \
	    --no-cache-dir llama-cpp-python==$(LLAMA_VERSION) -w $(WHEELS) 2>&1 \
	    | grep --line-buffered -E '^ *\[ *[0-9]+(%|/[0-9]+)\]|Successfully built|ERROR|[Ee]rror:' \
	    | sed -u -E -e 's/^ *(\[[^]]*\]).* -c [^ ]*\/([^/ ]+)$$/  \1 compiling \2/' -e 's/^(.{120}).+$$/\1/' ; \
	fi

run: $(STAMP)
	$(VENV)/bin/rswitch serve $(ARGS)

test: $(STAMP)
	$(VENV)/bin/ruff check rswitch tests benchmarks
	$(PY) -m pytest -n auto -q

bench: $(STAMP)
	$(PY) benchmarks/bench_gateway.py $(ARGS)
