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

.PHONY: venv demo test test-fast lint format bench docs clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test,hf,plot,hls,bench,dev,docs,onnx,qonnx]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	@echo "== 1. MiniLM-L6: compress (recipes/minilm.toml) -> report -> fixed-point export of layer 0's FFN"
	@mkdir -p out/demo
	$(BIN)/python -m tnquant compress minilm --recipe recipes/minilm.toml --calib corpus --out out/demo/minilm --force > out/demo/minilm.log
	$(BIN)/python -m tnquant report out/demo/minilm
	$(BIN)/python -m tnquant export out/demo/minilm --fixed-point out/demo/minilm-fixed --force
	@echo "== 2. digits CNN: compress (recipes/digits.toml) -> report -> fixed-point export of the WHOLE CNN, checked bit for bit"
	OMP_NUM_THREADS=1 $(BIN)/python -m tnquant compress digits-cnn --recipe recipes/digits.toml --calib digits --out out/demo/digits --force > out/demo/digits.log
	$(BIN)/python -m tnquant report out/demo/digits
	OMP_NUM_THREADS=1 $(BIN)/python -m tnquant export out/demo/digits --fixed-point out/demo/digits-fixed --force

test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 -q tests --doctest-modules tnquant

test-fast: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q -m "not slow" tests

lint: $(STAMP)
	$(BIN)/ruff check tnquant tests benchmarks examples
	$(BIN)/ruff format --check tnquant tests benchmarks examples
	$(BIN)/lint-imports
	$(BIN)/mypy tnquant

format: $(STAMP)
	$(BIN)/ruff check --fix tnquant tests benchmarks examples
	$(BIN)/ruff format tnquant tests benchmarks examples

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

docs: $(STAMP)
	$(BIN)/mkdocs build --strict -d site

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
