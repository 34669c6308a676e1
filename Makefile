# Set up a virtual environment and run moeshard. `make demo` and `make test` are all a newcomer needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_DIR := models/demo
PROMPT ?= The capital of France is

.PHONY: setup demo test bench clean

# torch is pinned to the CPU build; numpy<2.4 is what mistral-common supports on Python 3.11.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install "torch==2.13.0" "numpy<2.4" -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/moeshard demo-model $(DEMO_DIR)
	$(BIN)/moeshard generate $(DEMO_DIR) --prompt "$(PROMPT)" --max-tokens 32 --temperature 0

test: setup
	$(BIN)/pytest

bench: setup
	$(BIN)/python -m moeshard.kernels.bench

clean:
	rm -rf $(VENV) $(DEMO_DIR)
