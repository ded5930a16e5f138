# Two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv when it is missing; torch is pinned to the CPU wheel
# that lies on this machine's disk *before* the package is installed, so pip
# never pulls a multi-GB CUDA build.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed

export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false

.PHONY: venv demo test test-fast lint format bench clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test,hf,plot,hls,bench,dev]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 -q tests --doctest-modules tnquant

test-fast: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q -m "not slow" tests

lint: $(STAMP)
	$(BIN)/ruff check tnquant tests benchmarks examples
	$(BIN)/mypy tnquant

format: $(STAMP)
	$(BIN)/ruff check --fix tnquant tests benchmarks examples
	$(BIN)/ruff format tnquant tests benchmarks examples

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
