# Every target runs the one package in train/. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# DeepSpeed JIT-builds its CPU ops (shared-memory comm, CPU Adam) once; keep them with the venv.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

# Run settings: passed to the package as environment variables (empty = the config's value).
# The names are train/config.py's ENV_VARS; `make help` prints them with their defaults.
RUN_VARS := STRATEGY ACCELERATE_CONFIG NPROC NNODES NODE_RANK MASTER_ADDR MASTER_PORT DEVICE \
  DIST_TIMEOUT CONFIG MODEL TOKENIZER DATASET SEQ_LEN PRECISION MICRO_BATCH GRAD_ACCUM \
  GLOBAL_BATCH MAX_STEPS LR LOG_EVERY CHECKPOINT_EVERY KEEP_CHECKPOINTS RESUME OUTPUT_DIR SEED
export $(RUN_VARS)

STAMP := $(VENV)/.installed

$(STAMP): constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade "pip>=24"
	# torch first, pinned: an unpinned torch pulls the multi-GB CUDA build on CPU machines.
	$(VENV)/bin/pip install --quiet -c constraints.txt torch
	$(VENV)/bin/pip install --quiet -c constraints.txt -e '.[dev]'
	# DeepSpeed's setup imports torch, so it cannot build in an isolated environment.
	DS_BUILD_OPS=0 $(VENV)/bin/pip install --quiet --no-build-isolation -c constraints.txt deepspeed
	$(PY) -m train warm
	touch $@

.PHONY: venv
venv: $(STAMP) ## Create the virtualenv with pinned dependencies (done automatically by other targets)
