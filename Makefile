PYTHON ?= python3
# The CPU build of torch: without the pin, resolving "torch>=2.11" pulls several GB of CUDA wheels.
TORCH_PIN ?= torch==2.13.0

.PHONY: install test demo lint format gpu-check

install:
	$(PYTHON) -m pip install -q "$(TORCH_PIN)"
	$(PYTHON) -m pip install -q -e ".[dev,demo]"

test: install
	$(PYTHON) -m pytest -q tests

demo: install
	$(PYTHON) -m kernl.demo

lint:
	$(PYTHON) -m ruff check kernl tests benchmarks scripts
	$(PYTHON) -m ruff format --check kernl tests benchmarks scripts

format:
	$(PYTHON) -m ruff check --fix kernl tests benchmarks scripts
	$(PYTHON) -m ruff format kernl tests benchmarks scripts
