# Two entry points on a fresh machine: `make run` (set up, generate on the built-in tiny model)
# and `make test` (set up, run the test suite). Both create .venv on first use.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

$(BIN)/activate:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# NOTE: torch first and pinned, so that the project's torch>=2.6 installs nothing more.
	$(BIN)/pip install -q torch==2.13.0

# NOTE: xgrammar without its Triton requirement (Triton serves only its CUDA bitmask kernel; the CPU
# environment stays free of Triton); pip then takes the installed xgrammar as satisfying the project's.
setup: $(BIN)/activate
	$(BIN)/pip install -q --no-deps "xgrammar>=0.2.9" && $(BIN)/pip install -q "apache-tvm-ffi>=0.1.11"
	$(BIN)/pip install -q -e ".[test]"

run: setup
	$(BIN)/deltaserve generate "The state of a linear attention layer" --max-tokens 24

test: setup
	$(BIN)/python -m pytest -q -x tests

.PHONY: setup run test
