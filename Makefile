# clipforge: `make run` and `make test` do all their own set-up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.clipforge-installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEBS := prometheus prometheus-pushgateway docker.io debootstrap
RUN_ID ?= demo
ROOT ?= ./runs
REGISTRY ?= ghcr.io/clipforge
TAG ?= latest
# make images: BASE_IMAGE= bootstraps Debian bookworm (no registry needed); WHEELHOUSE is made from
# constraints.txt when empty, or carried in for an air-gapped build; PUSH=1 pushes to REGISTRY.
BASE_IMAGE ?=
WHEELHOUSE ?= .wheelhouse
PUSH ?=
DOCKER_ENGINE_DIR ?= /var/lib/clipforge-docker
PYTEST_ARGS ?=

.PHONY: setup system-deps run test test-fast bench lint pipeline images monitor clean

setup: $(STAMP)

# torch comes first and alone: the pinned CUDA build installs from local disk.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt torch torchvision
	$(PIP) install -q -c constraints.txt -e '.[all]'
	@touch $@

# Debian packages the tests and `make monitor` run for real (Prometheus, Pushgateway, kubectl,
# the Docker engine and debootstrap for the image tests).
system-deps:
	@missing=""; \
	for pkg in $(DEBS); do dpkg -s $$pkg >/dev/null 2>&1 || missing="$$missing $$pkg"; done; \
	command -v kubectl >/dev/null 2>&1 || missing="$$missing kubernetes-client"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

run: setup
	$(VENV)/bin/clipforge pipeline run --local --root $(ROOT) --run-id $(RUN_ID)

test: setup system-deps
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup system-deps
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(PY) -m bench

lint: setup
	$(VENV)/bin/ruff check stages pipelines tests bench
	$(VENV)/bin/hadolint docker/*.Dockerfile

pipeline: setup
	$(VENV)/bin/clipforge pipeline compile --output pipelines/clip_pipeline.yaml

# Uses the Docker engine $DOCKER_HOST reaches; with none (and as root) a private dockerd with its
# data in DOCKER_ENGINE_DIR runs for the build and is stopped by its pid afterwards.
images: setup system-deps
	@engine=""; docker info >/dev/null 2>&1 || engine="--engine-dir $(DOCKER_ENGINE_DIR)"; \
	$(PY) docker/build.py --wheelhouse $(WHEELHOUSE) --registry $(REGISTRY) --tag $(TAG) \
	  $(if $(BASE_IMAGE),--base-image $(BASE_IMAGE)) $(if $(PUSH),--push) $$engine

monitor: setup system-deps
	$(PY) -m stages.common.monitor_local --root $(ROOT)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
