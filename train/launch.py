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

from .config import ConfigError, RunConfig, selected_strategy, strategy_name
from .cpus import available_cpus
from .distributed import ENV_EXPECTED_WORLD, resolve_device, worker_env
from .inputs import check_inputs


def processes_per_node(requested: int, device: str) -> int:
    if requested:
        return requested
    if device == "cuda":
        import torch

        return torch.cuda.device_count()
    return 2


def accelerate_args(cfg: RunConfig, spec, nproc: int, device: str) -> list[str]:
    strategy = selected_strategy(cfg.launch)
    config_file = cfg.launch.accelerate_config or str(strategy.accelerate_config)
    cores = available_cpus()  # affinity and cgroup CPU quota, not the host's core count
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
    check_inputs(cfg, world, device)
    from .preflight import run_preflight

    run_preflight(cfg, spec, nproc, device)  # launch.preflight: off returns, only exits 0, a failed check exits 3
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
