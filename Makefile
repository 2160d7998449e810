# sdrt: every target creates or refreshes .venv by itself.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# A bare `torch` requirement pulls a multi-GB CUDA build; on a machine without CUDA take the CPU build.
TORCH  ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install test demo bench gpu-suite gpu-suite-dry lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m sdrt info tiny

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache out
