# e3: two commands do everything on a fresh machine.
#   make run   the main job: E3 training on the arithmetic task, embedded defaults
#   make test  the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup run test test-unit base-model stubs clean compose-check k8s-check
.PHONY: bench-learning bench-learning-quick bench-system bench-system-quick

setup:
	@bash scripts/bootstrap.sh $(VENV)

base-model: setup
	@$(PY) -m e3.model.base

run: setup
	@$(PY) -m services run

test: setup base-model compose-check k8s-check
	@$(PY) -m pytest -q $(PYTEST_ARGS)

test-unit: setup
	@$(PY) -m pytest -q tests/unit

# Deployment files against their specifications and the code (docs/deploy.md).
compose-check: setup
	@bash scripts/fetch_deploy_tools.sh $(VENV)
	@$(PY) scripts/compose_check.py

k8s-check: setup
	@$(PY) scripts/k8s_check.py

# checkov's Kubernetes policies over the rendered overlays, against deploy/k8s/checkov-accepted.txt.
# Not part of `make test`: checkov (pinned here) lives in its own virtualenv, outside the project's lock.
CHECKOV_VERSION := 3.3.30
CHECKOV_VENV := $(VENV)/e3-tools/checkov
.PHONY: k8s-checkov
k8s-checkov: setup
	@[ -x $(CHECKOV_VENV)/bin/checkov ] && $(CHECKOV_VENV)/bin/checkov --version | grep -qx '$(CHECKOV_VERSION)' || \
		{ $(PY) -m venv $(CHECKOV_VENV) && $(CHECKOV_VENV)/bin/pip install -q checkov==$(CHECKOV_VERSION); }
	@$(PY) scripts/k8s_checkov.py --checkov $(CHECKOV_VENV)/bin/checkov

# Benchmarks (docs in services/bench/learning.py and system.py); results land in bench/results/.
# The -quick targets are the CI smoke sizes and write to runs/bench-quick/ instead.
# BENCH_ARGS="--only trainer --device cuda" runs the trainer section alone, on a GPU (trainer.json/.md).
bench-learning: setup base-model
	@$(PY) -m services.bench.learning $(BENCH_ARGS)

bench-learning-quick: setup base-model
	@$(PY) -m services.bench.learning --quick $(BENCH_ARGS)

bench-system: setup base-model
	@$(PY) -m services.bench.system $(BENCH_ARGS)

bench-system-quick: setup base-model
	@$(PY) -m services.bench.system --quick $(BENCH_ARGS)

# The scheduler under 256 and 512 simulated replicas on Redis (docs in services/bench/scheduler_load.py):
# bench/results/scheduler_load.json and .md. Needs redis-server, no model.
.PHONY: bench-scheduler-load
bench-scheduler-load: setup
	@$(PY) -m services.bench.scheduler_load $(BENCH_ARGS)

# A SIMULATION (no model): every allocation policy on the simulated learner, two difficulty mixes, fixed seeds.
.PHONY: bench-allocation
bench-allocation: setup
	@$(PY) -m services.bench.allocation_sim $(BENCH_ARGS)

# Every allocation policy TRAINING the real model in one process (docs in services/bench/policy_learning.py):
# 6 policies x 5 seeds x 2 difficulty mixes, about an hour on two cores; bench/results/policies.json and .md.
# BENCH_ARGS="--resume" continues an interrupted run; the -quick target is the CI smoke size (runs/bench-quick/).
.PHONY: bench-policies bench-policies-quick
bench-policies: setup base-model
	@$(PY) -m services.bench.policy_learning $(BENCH_ARGS)

bench-policies-quick: setup base-model
	@$(PY) -m services.bench.policy_learning --quick $(BENCH_ARGS)

stubs: setup
	@$(PY) -m e3.contracts.build

clean:
	rm -rf runs .pytest_cache .hypothesis
