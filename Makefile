# compatkit: `make demo` and `make test` each build .venv from scratch if needed.
# torch==2.13.0 is installed first (a CPU wheel pip finds locally); an unpinned torch would pull
# a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP_CORE := $(VENV)/.installed-core
STAMP_DEV := $(VENV)/.installed-dev
DEMO_ARGS ?=

.PHONY: demo test lint install install-dev bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0

$(STAMP_CORE): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e ".[plots,service]"
	touch $@

$(STAMP_DEV): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e ".[plots,service,dev]"
	touch $@ $(STAMP_CORE)

install: $(STAMP_CORE)

install-dev: $(STAMP_DEV)

demo: $(STAMP_CORE)
	$(BIN)/compatkit demo $(DEMO_ARGS)

lint: $(STAMP_DEV)
	$(BIN)/ruff check src tests benchmarks

test: $(STAMP_DEV)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest

# speed benchmarks (tables on stdout; docs/RESULTS.md has the measured numbers);
# benchmarks/methods.py and benchmarks/hot_refresh.py train models and are run by hand
bench: $(STAMP_DEV)
	$(BIN)/python benchmarks/eval_engine.py
	$(BIN)/python benchmarks/backfill_curve.py
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/serve_load.py
	$(BIN)/python benchmarks/backfill_throughput.py
	$(BIN)/python benchmarks/ann_recall.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
