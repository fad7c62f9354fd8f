# Everything from nothing: `make demo` and `make test` set up first.
# The system libraries FFCV compiles against: see .ci/system-deps.sh.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@bash .ci/system-deps.sh $(PYTHON)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

# Until the training loop lands, the main job on the embedded default is its beton build.
demo: setup
	$(BIN)/python -m beton_builders digits data/digits

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python benchmarks/loader_throughput.py --out bench_out/loader_throughput.json

clean:
	rm -rf $(VENV) data runs bench_out .pytest_cache .ruff_cache *.egg-info
