# Everything from nothing: `make demo` and `make test` set up first.
# The system libraries FFCV compiles against: see .ci/system-deps.sh.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench gpukit clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@bash .ci/system-deps.sh $(PYTHON)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

# The main job on the embedded default: three generations on scikit-learn's digits.
# Every launch setting given and -q: accelerate adds no warning and no traceback to
# fasttt's one-line errors (README, Training; tests/test_launch.py).
demo: setup
	$(BIN)/accelerate launch -q --num_processes 1 --num_machines 1 --mixed_precision no \
		--dynamo_backend no fasttt/train.py recipes/digits_d06.toml

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python benchmarks/loader_throughput.py --out bench_out/loader_throughput.json

# .gpukit/: FFCV and the libraries it loads, for a GPU machine without network (README, Speed)
gpukit: setup
	bash benchmarks/make_gpukit.sh

clean:
	rm -rf $(VENV) data runs bench_out .pytest_cache .ruff_cache *.egg-info
