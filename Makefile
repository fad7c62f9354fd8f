# Everything from nothing: `make demo` and `make test` set up first.
# System libraries FFCV compiles against (Debian): see SYSTEM_PACKAGES.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SYSTEM_PACKAGES := pkg-config libturbojpeg0-dev libopencv-dev libgl1 libglib2.0-0
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@bash .ci/system-deps.sh $(SYSTEM_PACKAGES)
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
	rm -rf $(VENV) data runs .pytest_cache
