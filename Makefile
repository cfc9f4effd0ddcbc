# Every target runs the one package in train/. `make help` lists targets and run settings.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# DeepSpeed JIT-builds its CPU ops (shared-memory comm, CPU Adam) once; keep them with the venv.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

# Run settings reach the package as environment variables: make exports variables given on its
# command line (`make train STRATEGY=zero2`) by itself. They are not exported here on purpose:
# an exported unset variable arrives as an empty string and would hide the value in `.env`.
# The names come from the package (the `env` of each field in train/config/load.py, listed by
# `python -m train keys --env-names`; `make keys` prints every key with its default); the same
# names work in `.env`, compose and the Kubernetes manifests. Evaluated when used, with the
# venv's Python if there is one (listing them needs only the standard library).
HERE := $(dir $(firstword $(MAKEFILE_LIST)))
# The package answers what make needs to know (`python -m train info ...`, `keys --env-names`):
# with the venv's Python once it exists, else the system one (standard library only).
PKG_PY = $(firstword $(wildcard $(abspath $(PY))) $(PYTHON))
RUN_VARS = $(or $(_RUN_VARS),$(eval _RUN_VARS := $(shell cd $(HERE) && $(PKG_PY) -m train keys --env-names))$(_RUN_VARS))
# Names given on make's command line, so the package catches a misspelt setting (`MAX_STEP=5`)
# that make would otherwise pass on and the run would silently ignore.
CLI_NAMES = $(strip $(foreach v,$(.VARIABLES),$(if $(filter command line,$(origin $(v))),$(v))))
TRAIN = TRAIN_MAKE_VARIABLES="$(CLI_NAMES)" $(PY) -m train

STAMP := $(VENV)/.installed
# Which torch build the venv gets, from the NVIDIA driver's version (`python -m train info
# torch-index`, train/launcher/nvidia.py): PyPI's Linux torch needs the newest driver (CUDA 13,
# R580+) and on an older one trains on CPU without a word. R570+ gets cu128 (the image's build),
# R525+ cu126, no driver PyTorch's CPU index (added to pip's own indexes, so a mirror or local
# wheel in pip's configuration still counts). Override: `make venv TORCH_INDEX=https://download.
# pytorch.org/whl/cu130` (a CUDA version), or `TORCH_INDEX=` for pip's configuration alone.
TORCH_INDEX ?= $(shell cd $(HERE) && $(PYTHON) -m train info torch-index)
# TORCH=system: keep the torch PYTHON already has (an NGC or cloud image's CUDA build) instead of
# installing one: the venv sees PYTHON's site-packages, torch is held at its version (a constraint)
# while the rest installs around it, and a torch outside the supported range is refused in one line.
TORCH ?=
SYSTEM_TORCH = $(filter system,$(TORCH))
PYTEST_ARGS ?=
# Extra `section.key=value` overrides for train, e.g. ARGS='optim.lr=1e-3 train.eval_every=0'
ARGS ?=

$(STAMP): constraints.txt pyproject.toml
	@# What the steps below need beyond Python, said before the long steps instead of a traceback after them.
	@$(PYTHON) -c "import venv, ensurepip" 2>/dev/null || { echo "make venv: Python's venv module is missing: apt-get install python3-venv (or your OS's equivalent)"; exit 1; }
	@command -v c++ >/dev/null || { echo "make venv: no C++ compiler (c++): DeepSpeed builds its CPU ops at install; apt-get install g++ (or build-essential)"; exit 1; }
	@$(PYTHON) -c "import os, sys, sysconfig; h = os.path.join(sysconfig.get_paths()['include'], 'Python.h'); sys.exit(0 if os.path.isfile(h) else 'make venv: the Python headers are missing (' + h + '): apt-get install python3-dev')"
	@# A driver too old for any CUDA build of torch: its one line here (make's $$(shell) would hide it).
	@$(if $(filter-out system,$(TORCH)),echo "make venv: TORCH=$(TORCH): the one value is system (keep PYTHON's torch); leave TORCH unset to install the pinned one" >&2; exit 2)
	@$(if $(SYSTEM_TORCH),cd $(HERE) && $(PYTHON) -m train info system-torch >/dev/null,$(if $(filter undefined file,$(origin TORCH_INDEX)),cd $(HERE) && $(PYTHON) -m train info torch-index >/dev/null))
	$(PYTHON) -m venv $(if $(SYSTEM_TORCH),--system-site-packages )$(VENV)
	$(VENV)/bin/pip install --quiet --upgrade "pip>=24"
ifeq ($(TORCH),system)
	# torch: PYTHON's own (TORCH=system), held at its version while the rest installs
	sed "s/^torch==.*/torch==$$(cd $(HERE) && $(PYTHON) -m train info system-torch)/" constraints.txt > $(VENV)/constraints.txt
else
	# torch first, pinned, from the build chosen above (TORCH_INDEX): $(if $(TORCH_INDEX),$(TORCH_INDEX),pip's configuration)
	$(VENV)/bin/pip install --quiet -c constraints.txt $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) torch
	cp constraints.txt $(VENV)/constraints.txt
endif
	$(VENV)/bin/pip install --quiet -c $(VENV)/constraints.txt -e '.[dev]'
	# DeepSpeed's setup imports torch, so it cannot build in an isolated environment.
	DS_BUILD_OPS=0 $(VENV)/bin/pip install --quiet --no-build-isolation -c $(VENV)/constraints.txt deepspeed
	# The venv's bin first: torch's JIT finds the venv's ninja on PATH (not a system one, or none).
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m train warm
	touch $@

.PHONY: help venv train prepare doctor test test-fast test-gpu lint env config keys plan bench strategies clean

help: ## Show targets and run settings
	@echo "Usage: make TARGET [NAME=value ...]   e.g. make train STRATEGY=zero2 NPROC=2 MAX_STEPS=50"
	@echo
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'
	@echo
	@echo "Strategies: $$(cd $(HERE) && $(PKG_PY) -m train info strategies)"
	@echo "Run settings (environment / .env / make variables): $(RUN_VARS)"
	@echo "Every config key: make keys"

venv: $(STAMP) ## Create the virtualenv with pinned dependencies (other targets do it on first use)

train: $(STAMP) ## Train (default: tiny Llama on the built-in corpus, DDP, 2 processes, offline)
	$(TRAIN) launch $(ARGS)

prepare: $(STAMP) ## Tokenize sources into token shards once: make prepare OUT=DIR SOURCES="file-or-dir-or-hub-id ..." (MODEL/TOKENIZER as for train)
	@test -n "$(OUT)" -a -n "$(SOURCES)" || { echo 'usage: make prepare OUT=DIR SOURCES="SOURCE ..." [MODEL=...]'; exit 2; }
	$(PY) -m train prepare --out $(OUT) $(SOURCES) $(ARGS)

doctor: $(STAMP) ## Preflight checks alone on this node (shm, disk, GPUs; with NNODES>1 shared storage and links)
	$(TRAIN) doctor $(ARGS)

test: lint ## Lint, then run the whole test suite (real multi-process jobs on CPU)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: lint ## Lint, then only the tests that start no training job
	$(PY) -m pytest -m "not slow and not docker" $(PYTEST_ARGS)

test-gpu: $(STAMP) ## On NVIDIA GPUs: every strategy in bf16/fp16, fp16 skips, ~1B throughput; results in bench-results/
	@$(PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'make test-gpu needs a CUDA GPU; torch ' + torch.__version__ + ' sees none')"
	$(PY) -m pytest -m gpu -p no:cacheprovider -rs --durations=15 tests/test_gpu.py tests/test_precision.py $(PYTEST_ARGS)

lint: $(STAMP) ## ruff on train/ and tests/ (rules in pyproject.toml)
	$(VENV)/bin/ruff check $(HERE)train $(HERE)tests

env: $(STAMP) ## Print versions (torch, CUDA, NCCL, DeepSpeed, ...) and `accelerate env`
	$(PY) -m train env

config: $(STAMP) ## Print the resolved run configuration
	$(TRAIN) config

keys: $(STAMP) ## List every config key, its default and its environment name
	$(PY) -m train keys

plan: $(STAMP) ## Per-GPU memory of each strategy: make plan MODEL=... GPUS_PER_NODE=8 NODES=2 GPU_MEMORY=80
	$(TRAIN) plan $(if $(GPUS_PER_NODE),--gpus-per-node $(GPUS_PER_NODE)) $(if $(NODES),--nodes $(NODES)) \
	  $(if $(GPU_MEMORY),--gpu-memory $(GPU_MEMORY))

bench: $(STAMP) ## Benchmark table (our loop vs plain PyTorch vs HF Trainer, strategies, memory) into bench-results/
	$(PY) -m train bench $(BENCH_ARGS)

strategies: ## List strategy names (one per configs/strategies/*.yaml)
	@cd $(HERE) && $(PKG_PY) -m train info strategies | tr ' ' '\n'

clean: ## Remove outputs (keeps the virtualenv)
	rm -rf outputs build

-include docker/docker.mk
-include k8s/k8s.mk
