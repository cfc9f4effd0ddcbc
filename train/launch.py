"""The launcher: check everything that can be checked before a process group exists, then
exec ``accelerate launch`` with every rank/address flag explicit.

This is what ``make train``, the containers and the Kubernetes pods run, so launch logic
lives here rather than in shell scripts. Passing --main_process_ip/--machine_rank and static
rendezvous explicitly avoids accelerate's 127.0.0.1 default under Kubeflow
(accelerate#3414) and c10d's hostname matching (pytorch#73380).
"""

from __future__ import annotations

import os
import sys

from .config import ConfigError, RunConfig, resolve_batch, selected_strategy, strategy_name
from .distributed import ENV_EXPECTED_WORLD, resolve_device, worker_env


def processes_per_node(requested: int, device: str) -> int:
    if requested:
        return requested
    if device == "cuda":
        import torch

        return torch.cuda.device_count()
    return 2


def preflight(cfg: RunConfig, world_size: int, device: str) -> None:
    """Every user error we can see without starting processes: one line each, exit 2."""
    from .checkpoint import find_resume
    from .data import resolve_source
    from .model import check_model_source

    strategy = selected_strategy(cfg.launch)
    if strategy is not None and strategy.gpu_only and device == "cpu":
        raise ConfigError(f"STRATEGY={strategy.name} offloads from GPU to CPU memory and needs a CUDA GPU; "
                          "on CPU use fsdp (or zero3-offload)")
    if cfg.train.precision == "fp16" and device == "cpu":
        raise ConfigError("PRECISION=fp16 needs a CUDA GPU (on CPU it would silently train in fp32); use bf16 or no")
    if cfg.train.precision == "bf16" and device == "cuda":
        import torch

        if not torch.cuda.is_bf16_supported():
            raise ConfigError("PRECISION=bf16 is not supported by this GPU; use fp16 or no")
    resolve_batch(cfg, world_size)
    resolve_source(cfg.data)
    check_model_source(cfg.model)
    check_finetuning_and_tracking(cfg)
    find_resume(cfg, world_size)


def check_finetuning_and_tracking(cfg: RunConfig) -> None:
    """LoRA targets (on a meta-device model) and tracker names/packages: one line each, exit 2."""
    from .lora import check_lora
    from .tracking import check_trackers

    check_trackers(cfg)
    check_lora(cfg.model)


def accelerate_args(cfg: RunConfig, spec, nproc: int, device: str) -> list[str]:
    strategy = selected_strategy(cfg.launch)
    config_file = cfg.launch.accelerate_config or str(strategy.accelerate_config)
    cores = os.cpu_count() or 1
    args = ["--config_file", config_file,
            "--num_machines", str(spec.nnodes), "--machine_rank", str(spec.node_rank),
            "--num_processes", str(spec.nnodes * nproc),
            "--main_process_ip", spec.master_addr, "--main_process_port", str(spec.master_port),
            "--rdzv_backend", "static", "--same_network",
            "--mixed_precision", cfg.train.precision,
            "--num_cpu_threads_per_process", str(max(1, cores // nproc))]
    single = spec.nnodes * nproc == 1
    if device == "cpu" and not single and strategy is not None and strategy.family == "ddp":
        args.append("--multi_gpu")  # with ACCELERATE_USE_CPU=1 this is torchrun + MULTI_CPU over gloo
    if spec.nnodes > 1:
        args += ["--max_restarts", "0"]
    return args


def launch(cfg: RunConfig, argv: list[str]) -> None:
    from .nodes import LAUNCHER_SCRUB_VARS, resolve_nodes, wait_for_master

    device = resolve_device(cfg.launch.device)
    spec = resolve_nodes(cfg.launch, os.environ)
    nproc = processes_per_node(spec.nproc_per_node or cfg.launch.nproc_per_node, device)
    if nproc < 1:
        raise ConfigError(f"NPROC={nproc}: no GPUs visible on this node; set NPROC or DEVICE=cpu")
    world = spec.nnodes * nproc
    preflight(cfg, world, device)
    strategy = selected_strategy(cfg.launch)
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_SCRUB_VARS}
    env.update(worker_env(strategy, device))
    env[ENV_EXPECTED_WORLD] = str(world)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *accelerate_args(cfg, spec, nproc, device),
           "-m", "train", "worker", *argv]
    print(f"[launch] {strategy_name(cfg.launch)}: node {spec.node_rank}/{spec.nnodes} "
          f"({spec.source}), {nproc} process(es) per node, world size {world}, device {device}, "
          f"master {spec.master_addr}:{spec.master_port}", flush=True)
    wait_for_master(spec, cfg.launch.master_wait_s)
    sys.stdout.flush()
    # exec: signals (SIGTERM from docker/k8s) go straight to accelerate/torchrun, and its exit code is ours.
    os.execvpe(cmd[0], cmd, env)
