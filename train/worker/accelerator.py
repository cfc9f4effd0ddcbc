"""Turn a strategy row into a running accelerate `Accelerator`, and prove it engaged.

Everything strategy-specific that is not in the accelerate config file lives here: the
environment each strategy needs on CPU, the DeepSpeed JSON with its "auto" values filled
from the run config, and the start-up checks that world size, distributed type and
sharding are what was asked for (accelerate can silently fall back to one process)."""

from __future__ import annotations

import copy
import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from train.config import ConfigError, RunConfig
from train.config.strategies import Strategy
from train.storage import work_dir
from train.worker.tracking import tracker_names

# DeepSpeed's default bucket size (elements): the floor for reduce/prefetch/allgather buckets on GPUs.
CUDA_BUCKET_FLOOR = 50_000_000


def deepspeed_config(strategy: Strategy, cfg: RunConfig, grad_accum: int, world_size: int,
                     hidden_size: int, device: str) -> dict[str, Any]:
    """The strategy's DeepSpeed JSON with every "auto" filled from the run config.

    Filling here (not leaving it to accelerate) means one resolved batch/accumulation that
    is printed and saved, instead of two configs that can disagree (accelerate#1970, #3369).
    """
    ds = json.loads(strategy.deepspeed_config.read_text())
    micro = cfg.train.micro_batch
    values = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro * grad_accum * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "bf16.enabled": cfg.train.precision == "bf16",
        "fp16.enabled": cfg.train.precision == "fp16",
        # Bucket sizes scale with the model (accelerate's own rule), which keeps ZeRO-3's
        # buffers small for tiny models instead of ~2 GB per rank with the defaults.
        "zero_optimization.reduce_bucket_size": hidden_size * hidden_size,
        "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "zero_optimization.stage3_param_persistence_threshold": 10 * hidden_size,
        "zero_optimization.offload_param.pin_memory": device == "cuda",
        "zero_optimization.offload_optimizer.pin_memory": device == "cuda",
    }
    if device == "cuda":
        # On GPUs, buckets of hidden^2 elements are too small to keep NCCL busy for small and
        # mid-size models: floor them at DeepSpeed's own 5e7 default (the CPU values stay small,
        # which keeps CI's memory low), and overlap gradient reduction with the backward pass.
        floor = CUDA_BUCKET_FLOOR
        values["zero_optimization.reduce_bucket_size"] = max(hidden_size * hidden_size, floor)
        values["zero_optimization.stage3_prefetch_bucket_size"] = max(int(0.9 * hidden_size * hidden_size), floor)

    def fill(node: dict, prefix: str) -> None:
        for k, v in node.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                fill(v, key + ".")
            elif v == "auto":
                if key not in values:
                    raise ConfigError(f"{strategy.deepspeed_config}: no run-config value for 'auto' key {key!r}")
                node[k] = values[key]

    fill(ds, "")
    zero = ds.get("zero_optimization", {})
    if device == "cuda" and zero:
        zero["overlap_comm"] = True
        if "allgather_bucket_size" in zero:
            zero["allgather_bucket_size"] = max(int(zero["allgather_bucket_size"]), CUDA_BUCKET_FLOOR)
    if cfg.train.precision == "no":
        ds.pop("fp16", None), ds.pop("bf16", None)
    elif zero:
        reduce_in_fp32(ds, cfg.train.precision)
    return ds


def reduce_in_fp32(ds: dict[str, Any], precision: str) -> None:
    """Gradients reduced across ranks and accumulated across micro-batches in fp32 under bf16/fp16,
    as DDP (fp32 parameters, so fp32 gradients) and FSDP2 (reduce_dtype=fp32) do. DeepSpeed's
    default is the model's dtype for both, which loses the small gradients' bits in the sum.

    One exception: ZeRO-1 in bf16 without offload keeps bf16 accumulation (its reduction is
    still fp32): fp32 accumulation there makes DeepSpeed replace the ZeRO optimizer with its
    BF16_Optimizer (engine._do_optimizer_sanity_check), another optimizer with another
    checkpoint layout. A value the strategy's JSON sets itself wins.
    """
    zero = ds["zero_optimization"]
    ds.setdefault("communication_data_type", "fp32")
    offloaded = any(zero.get(k, {}).get("device", "none") != "none" for k in ("offload_optimizer", "offload_param"))
    if not (precision == "bf16" and int(zero.get("stage", 0)) == 1 and not offloaded):
        ds.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")


def build_accelerator(cfg: RunConfig, strategy: Strategy | None, grad_accum: int, world_size: int,
                      hidden_size: int, device: str, log_dir: str):
    from accelerate import Accelerator
    from accelerate.utils import (
        DeepSpeedPlugin,
        DistributedDataParallelKwargs,
        InitProcessGroupKwargs,
        ProjectConfiguration,
    )

    if device == "cpu" and strategy is not None and strategy.family == "fsdp":
        from train.worker.cpu_fsdp import allow_fsdp_on_cpu

        allow_fsdp_on_cpu()
    # Our resolved accumulation wins over a value an accelerate config file put in the env.
    os.environ["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"] = str(grad_accum)
    if cfg.model.compile:
        check_compile_toolchain(device)
    kwargs: dict[str, Any] = {}
    if strategy is not None and strategy.family == "deepspeed":
        ds = deepspeed_config(strategy, cfg, grad_accum, world_size, hidden_size, device)
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=copy.deepcopy(ds))
    if strategy is not None and strategy.family == "fsdp":
        fsdp = fsdp_plugin_settings(cfg, device)
        if fsdp:
            from accelerate.utils import FullyShardedDataParallelPlugin

            kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(**fsdp)
    pg = InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.launch.timeout_s),
                                backend="gloo" if device == "cpu" else None)
    # DDP: gradients live in the all-reduce buckets instead of being copied in and out of them
    # every step (one gradient-sized copy less of memory and of work; accelerate leaves it off).
    ddp = DistributedDataParallelKwargs(gradient_as_bucket_view=True)
    accelerator = Accelerator(
        mixed_precision=cfg.train.precision,
        gradient_accumulation_steps=grad_accum,
        cpu=device == "cpu" and (strategy is None or strategy.family == "ddp"),
        log_with=tracker_names(cfg) or None,
        project_config=ProjectConfiguration(project_dir=str(work_dir(cfg)), logging_dir=log_dir),
        kwargs_handlers=[pg, ddp],
        step_scheduler_with_optimizer=False,
        dynamo_backend="inductor" if cfg.model.compile else None,  # model.compile: torch.compile via accelerate
        **kwargs,
    )
    if device == "cuda":
        set_tf32(cfg.train.tf32)  # after the Accelerator: under dynamo it turns TF32 on by itself
    if cfg.checkpoint.export:
        make_export_group(cfg.checkpoint.export_timeout_s)
    return accelerator


def prepare_alone(accelerator, model):
    """Prepare a 1-process CPU job's model without DDP; any other model is left to ``prepare``.

    accelerate wraps every MULTI_CPU model in DDP, a world of one included (a model on one GPU it
    leaves unwrapped): each step would pay DDP's hooks and an all-reduce with itself, which a
    plain loop and HF Trainer do not. Prepared here as accelerate prepares a 1-GPU model; the
    later ``accelerator.prepare`` sees it is prepared and keeps it as it is.
    """
    if accelerator.distributed_type.name == "MULTI_CPU" and accelerator.num_processes == 1:
        return accelerator.prepare_model(model, evaluation_mode=True)  # evaluation_mode: no wrapper
    return model


_EXPORT_GROUP: list = []  # the process group wait_for_export uses, made by make_export_group


def make_export_group(timeout_s: int) -> None:
    """A CPU (gloo) process group with its own timeout for the final export's wait.

    The other ranks wait while rank 0 alone writes the export; a large model on network
    storage can take longer than DIST_TIMEOUT, the bound meant to catch a dead peer in a
    collective. Every rank must call this at the same point (new_group is collective): right
    after the process group starts. Gloo, so a long CPU-side wait trips no NCCL watchdog.
    """
    import torch.distributed as dist

    _EXPORT_GROUP.clear()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        _EXPORT_GROUP.append(dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s)))


def wait_for_export(accelerator) -> None:
    """Every rank waits here until rank 0 has written the export, bounded by export_timeout_s."""
    if _EXPORT_GROUP:
        torch.distributed.barrier(group=_EXPORT_GROUP[0])
    else:
        accelerator.wait_for_everyone()


def set_tf32(enabled: bool) -> None:
    """TF32 tensor-core math for fp32 matmuls and convolutions (CUDA only; no effect on CPU).

    On by default, as in torchtitan: fp32 runs (PRECISION=no) on Ampere and newer then go ~8x
    faster than IEEE fp32, and train.tf32=false gives true fp32. MFU's peak follows this switch
    (train/flops.py reads it back). The legacy ``allow_tf32`` flags, not ``fp32_precision``:
    accelerate sets the legacy one, and torch refuses to read a mix of the two.
    """
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def fsdp_plugin_settings(cfg: RunConfig, device: str) -> dict[str, Any]:
    """FSDP2 settings that differ from accelerate's defaults (the rest comes from the strategy's
    accelerate config, through the environment the launcher sets).

    - Mixed precision: parameters and outputs in bf16/fp16, gradients *reduced in fp32*
      (torchtitan's default). accelerate's default policy reduces in the low precision, which
      loses the small gradients' bits when summing across many ranks.
    - A pretrained model loads on rank 0 only and is broadcast while sharding
      (cpu_ram_efficient_loading; the other ranks build it without weights: ``loads_on_rank0_only``):
      otherwise every rank holds the full fp32 model in host RAM (8 x 32 GB per node for an 8B model).
    """
    out: dict[str, Any] = {}
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision)
    if low is not None:
        out["mixed_precision_policy"] = {"param_dtype": low, "reduce_dtype": torch.float32, "output_dtype": low}
    if loads_on_rank0_only(cfg, "fsdp"):
        out["cpu_ram_efficient_loading"] = True
    return out


def loads_on_rank0_only(cfg: RunConfig, family: str | None) -> bool:
    """FSDP2 with a pretrained model: rank 0 reads the weights, every other rank builds the model
    with its parameters on the meta device (no memory), and accelerate broadcasts rank 0's
    weights shard by shard in ``prepare`` (fsdp2_load_full_state_dict). transformers' own
    rank-0 loading (``is_fsdp_enabled``) is written for FSDP1 and cannot be relied on here.
    Presets are built, not read: every rank builds its own, identically seeded."""
    from train.worker.model import is_preset

    return family == "fsdp" and not is_preset(cfg.model.name)


def fused_adamw(strategy: Strategy | None, precision: str, device: str) -> bool:
    """Whether AdamW uses its fused kernel: on CUDA, except fp16 with fsdp-offload.

    Under fp16 GradScaler hands a fused optimizer its found-inf flag to skip the update in the
    kernel; with offloaded (CPU) parameters that flag is copied device-to-host non-blocking,
    so the step can read it before it arrives. The unfused path checks it on the host first.
    """
    if device != "cuda":
        return False
    offloaded = strategy is not None and strategy.family == "fsdp" and strategy.offload
    return not (precision == "fp16" and offloaded)


def optimizer_step_skipped(accelerator, grad_norm) -> bool:
    """Whether the optimizer step just taken skipped its update (an fp16 overflow), in which
    case the LR schedule must not advance.

    accelerate answers by whether GradScaler called the optimizer's ``step``. A fused optimizer
    is always called and skips the update inside the kernel (torch/amp/grad_scaler.py), so
    accelerate never says "skipped" under DDP/FSDP fp16 with fused AdamW. GradScaler skips
    exactly when a gradient is inf/NaN after unscaling, and then the (clipped) gradient norm is
    not finite: ask that too. One host sync per step, only when a GradScaler is in use (fp16
    outside DeepSpeed, whose own overflow flag accelerate reports correctly).
    """
    if accelerator.optimizer_step_was_skipped:
        return True
    if getattr(accelerator, "scaler", None) is None or grad_norm is None:
        return False
    norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP2: DTensor
    return not bool(torch.isfinite(torch.as_tensor(norm)).all().item())


def check_compile_toolchain(device: str) -> None:
    """model.compile=true needs a C/C++ compiler and Python's headers: Inductor compiles C++
    kernels on CPU, and Triton builds its CUDA launcher against Python.h. Without them the
    first step fails deep inside Inductor; say it up front instead."""
    import shutil
    import sysconfig

    missing = []
    compiler = os.environ.get("CXX") or "c++"
    if not (shutil.which(compiler) or shutil.which("g++") or shutil.which("gcc")):
        missing.append("a C/C++ compiler (g++)")
    include = sysconfig.get_paths().get("include") or ""
    if not Path(include, "Python.h").is_file():
        missing.append(f"Python's headers ({include}/Python.h; python3-dev)")
    if missing:
        what = "C++ kernels" if device == "cpu" else "Triton's kernel launcher"
        raise ConfigError(f"model.compile=true needs {' and '.join(missing)} to build {what}; "
                          "install them, or set model.compile=false")


def innermost_optimizer(optimizer):
    """accelerate's wrapper -> DeepSpeed's ZeRO optimizer -> the torch optimizer that steps."""
    chain = [optimizer]
    while getattr(chain[-1], "optimizer", None) is not None:
        chain.append(chain[-1].optimizer)
    return next(o for o in reversed(chain) if isinstance(o, torch.optim.Optimizer))


def align_scheduler(scheduler, optimizer) -> None:
    """Point the LR scheduler at the optimizer that really steps.

    For ZeRO offload accelerate swaps our AdamW for DeepSpeedCPUAdam but leaves the scheduler
    on the AdamW: the two share parameter-group dicts, so the LR still reaches the new
    optimizer, until a checkpoint load gives it new group dicts and the LR silently freezes
    (found by the kill -9/resume test: losses drifted from the second step after a resume).
    """
    inner = innermost_optimizer(optimizer)
    sched = getattr(scheduler, "scheduler", scheduler)
    if getattr(sched, "optimizer", inner) is not inner:
        sched.optimizer = inner


def resolve_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("DEVICE=cuda but no CUDA device is visible; use DEVICE=cpu or auto")
    return requested


