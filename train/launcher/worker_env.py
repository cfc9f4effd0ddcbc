"""(split from train/worker/accelerator.py)"""

from __future__ import annotations

import os

from train.config.strategies import Strategy
from train.progress import ENV_DEVICE

# glibc malloc with fixed thresholds: keep freed heap memory instead of handing it back to the
# kernel after a step and faulting it in again on the next (its default, adaptive thresholds do
# that with a step's activations and gradients: ~3,500 page faults and 5 ms of system time per
# 0.33 s step of llama-tiny in bench-results/README.md). Blocks over 32 MiB (the most glibc
# allows) are still mmapped and returned when freed. A GLIBC_TUNABLES already set wins.
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1125899906842624"


def cpu_allocator_env() -> dict[str, str]:
    """What CPU training processes run with (read by glibc at process start: the environment)."""
    return {} if "GLIBC_TUNABLES" in os.environ else {"GLIBC_TUNABLES": MALLOC_TUNABLES}


def worker_env(strategy: Strategy | None, device: str) -> dict[str, str]:
    """Environment the workers need for this strategy on this device.

    On CPU accelerate does not engage DeepSpeed or FSDP with 2 processes on its own
    (see docs/cpu-distributed.md, "accelerate on CPU with 2 processes"); these are the
    checked recipes. On CUDA accelerate's defaults are right and nothing is added.
    On CPU the model's tensors live in malloc's heap: ``cpu_allocator_env``.

    DEVICE=cpu hides every GPU from the workers (``CUDA_VISIBLE_DEVICES`` empty): accelerate
    and DeepSpeed pick CUDA whenever they see a GPU, so on a GPU workstation fsdp and ZeRO would
    otherwise run on CUDA under the forced gloo backend.
    """
    env = {ENV_DEVICE: device}
    if device != "cpu":
        return env
    env.update(cpu_allocator_env())
    env["CUDA_VISIBLE_DEVICES"] = ""
    if strategy is None:
        return env
    if strategy.family == "ddp":
        env["ACCELERATE_USE_CPU"] = "1"  # MULTI_CPU over gloo
    elif strategy.family == "deepspeed":
        env.update(DS_ACCELERATOR="cpu", ACCELERATE_USE_CPU="0")
    elif strategy.family == "fsdp":
        env.update(ACCELERATE_USE_CPU="0", FSDP_SYNC_MODULE_STATES="false")
    return env
