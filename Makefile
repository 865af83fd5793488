# e3: two commands do everything on a fresh machine.
#   make run   the main job: E3 training on the arithmetic task, embedded defaults
#   make test  the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup run test test-unit base-model stubs clean

setup:
	@bash scripts/bootstrap.sh $(VENV)

base-model: setup
	@$(PY) -m e3.model.base

run: setup
	@$(PY) -m e3 run

test: setup base-model
	@$(PY) -m pytest -q $(PYTEST_ARGS)

test-unit: setup
	@$(PY) -m pytest -q tests/unit

stubs: setup
	@$(PY) -m e3.contracts.build

clean:
	rm -rf runs .pytest_cache .hypothesis
