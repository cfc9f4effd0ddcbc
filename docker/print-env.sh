#!/bin/sh
# What this container sees: versions, GPUs, NCCL, DeepSpeed ops, and the limits NCCL needs.
# Installed in the image as `print-env`; `make docker-env` / `make docker-cpu-env` run it.
set -u
echo "== image"
echo "flavour        ${TRAIN_FLAVOUR:-?}   user $(id -un) ($(id -u):$(id -g))"
echo "== python -m train env"
python -m train env
echo "== GPUs (nvidia-smi)"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
  nvidia-smi topo -m 2>/dev/null || true
else
  echo "nvidia-smi not present: no GPUs passed to this container"
fi
echo "== DeepSpeed ops (ds_report)"
ds_report 2>&1 | sed -n '/^op name/,/^DeepSpeed general environment info/p'
echo "JIT-built ops cached in TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-unset}:"
ls "${TORCH_EXTENSIONS_DIR:-/nonexistent}"/*/*.so 2>/dev/null | sed 's/^/  /' || echo "  none"
echo "== limits NCCL cares about"
echo "/dev/shm       $(df -h /dev/shm | awk 'NR==2 {print $2}')  (Docker's default 64M is too small: use ipc: host or shm_size)"
echo "memlock        $(ulimit -l)  (unlimited wanted for InfiniBand/RDMA)"
echo "stack          $(ulimit -s)"
env | grep -E '^(NCCL|GLOO|TORCH_NCCL|TORCH_DISTRIBUTED)_' | sort || true
