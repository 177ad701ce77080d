# The commands of the README. demo, profile and the tests bootstrap ./.venv first (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
export VLLM_CPU_KVCACHE_SPACE ?= 2

.PHONY: demo profile test image image-test bootstrap bootstrap-test

demo: bootstrap
	$(PY) -m vllm_heterocache.cli demo

profile: bootstrap
	$(PY) -m vllm_heterocache.cli profile-demo

test: bootstrap-test
	$(PY) -m pytest -q

# The CPU image (docker/Dockerfile.cpu), with Docker or else buildah: scripts/image.sh.
image:
	scripts/image.sh

# The image run by a real container engine, and the CPU overlay's manifests played by podman
# (builds the image first if needed): tests/test_container.py.
image-test: bootstrap-test
	$(PY) -m pytest -q -m container tests/test_container.py

bootstrap:
	HETEROCACHE_VENV=$(VENV) scripts/bootstrap.sh

bootstrap-test:
	HETEROCACHE_VENV=$(VENV) scripts/bootstrap.sh --test
