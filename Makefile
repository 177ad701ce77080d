# The two commands of the README. Both bootstrap ./.venv first (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
export VLLM_CPU_KVCACHE_SPACE ?= 2

.PHONY: demo profile test bootstrap bootstrap-test

demo: bootstrap
	$(PY) -m vllm_heterocache.cli demo

profile: bootstrap
	$(PY) -m vllm_heterocache.cli profile-demo

test: bootstrap-test
	$(PY) -m pytest -q

bootstrap:
	HETEROCACHE_VENV=$(VENV) scripts/bootstrap.sh

bootstrap-test:
	HETEROCACHE_VENV=$(VENV) scripts/bootstrap.sh --test
