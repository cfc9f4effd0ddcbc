"""The launcher: check everything that can be checked before a process group exists, then
run ``accelerate launch`` (torchrun's elastic agent) under this node's supervisor.

This is what ``make train``, the containers and the Kubernetes pods run, so launch logic
lives here rather than in shell scripts. Every rank/address flag is explicit, which avoids
accelerate's 127.0.0.1 default under Kubeflow (accelerate#3414). Rendezvous is c10d, so the
agent can restart the gang after a crash; what c10d would otherwise guess is pinned down
(see ``rendezvous_env``).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

from train.config import ConfigError, RunConfig, selected_strategy, strategy_name
from train.config.schema import harness_task_list
from train.config.torch_support import check_torch_floor
from train.launcher.cpus import available_cpus
from train.launcher.inputs import check_after_preflight, check_inputs
from train.launcher.supervisor import supervise
from train.launcher.worker_env import worker_env
from train.progress import ENV_EXPECTED_WORLD
from train.worker.accelerator import resolve_device


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
            *rendezvous_args(cfg, spec, nproc),
            "--mixed_precision", cfg.train.precision,
            "--num_cpu_threads_per_process", str(max(1, cores // nproc))]
    single = spec.nnodes * nproc == 1
    if device == "cpu" and not single and strategy is not None and strategy.family == "ddp":
        args.append("--multi_gpu")  # with ACCELERATE_USE_CPU=1 this is torchrun + MULTI_CPU over gloo
    return args


def rendezvous_args(cfg: RunConfig, spec, nproc: int) -> list[str]:
    """c10d rendezvous hosted by node 0's agent, so torchrun can restart every node's workers.
    Who hosts the store is said explicitly (``is_host``): c10d's own guess matches the endpoint
    against this machine's hostnames, which misses Kubernetes FQDNs (pytorch#73380) and picks
    every node when all run on one host."""
    if spec.nnodes * nproc == 1:
        return []  # one process: accelerate runs it directly, there is no agent to restart it
    # join_timeout: how long a (re-)rendezvous waits for every node, as static rendezvous did;
    # a node that is gone for good then fails the others instead of stalling them.
    conf = f"is_host={int(spec.node_rank == 0)},join_timeout={cfg.launch.timeout_s}"
    return ["--rdzv_backend", "c10d", "--rdzv_conf", conf, "--max_restarts", str(cfg.launch.max_restarts)]


def rendezvous_env(cfg: RunConfig, spec) -> dict[str, str]:
    """torchrun options accelerate does not pass on, as torchrun's own ``PET_*`` variables.

    ``PET_LOCAL_ADDR`` decides two things in c10d: nodes get their group rank in the sorted order
    of these addresses, and the rank-0 node publishes its address to the workers as
    ``MASTER_ADDR``. Node 0 gives the master address (already checked to be reachable; the
    default, its FQDN, may not resolve in a container) and node r the same address plus
    ``~node<r>``, which sorts after it: node r's processes are then ranks r*nproc.., as with
    static rendezvous.

    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE``: by default the workers share the agent's store, which
    lives across restarts, so restarted workers read the dead ones' gloo addresses and fail to
    connect (seen here with torch 2.13); unshared, rank 0 opens a fresh store each attempt.
    """
    endpoint = f"{spec.master_addr}:{spec.master_port}"
    run_id = hashlib.sha256(f"{endpoint}|{cfg.output_dir}".encode()).hexdigest()[:16]
    local = spec.master_addr if spec.node_rank == 0 else f"{spec.master_addr}~node{spec.node_rank:05d}"
    return {"PET_RDZV_ENDPOINT": endpoint, "PET_RDZV_ID": run_id, "PET_LOCAL_ADDR": local,
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def check_gpus_usable(requested_device: str) -> None:
    """Refuse DEVICE=auto/cuda when the driver lists GPUs this torch cannot use (train/launcher/nvidia.py)."""
    import torch

    from train.launcher.nvidia import check_torch_sees_gpus

    check_torch_sees_gpus(requested_device, torch.cuda.is_available(), torch.__version__, torch.version.cuda)


def launch(cfg: RunConfig, argv: list[str]) -> int:
    from train.launcher.nodes import LAUNCHER_SCRUB_VARS, resolve_nodes, wait_for_master

    check_torch_floor("launch")
    check_gpus_usable(cfg.launch.device)
    device = resolve_device(cfg.launch.device)
    spec = resolve_nodes(cfg.launch, os.environ)
    nproc = processes_per_node(spec.nproc_per_node or cfg.launch.nproc_per_node, device)
    if nproc < 1:
        raise ConfigError(f"NPROC={nproc}: no GPUs visible on this node; set NPROC or DEVICE=cpu")
    world = spec.nnodes * nproc
    check_inputs(cfg, world, device, spec.nnodes)
    from train.launcher.preflight import run_preflight

    run_preflight(cfg, spec, nproc, device)  # launch.preflight: off returns, only exits 0, a failed check exits 3
    check_after_preflight(cfg, world, spec.nnodes)
    strategy = selected_strategy(cfg.launch)
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_SCRUB_VARS}
    env.update(worker_env(strategy, device))
    env[ENV_EXPECTED_WORLD] = str(world)
    env.update(rendezvous_env(cfg, spec))
    cmd = [sys.executable, "-m", "train.launcher.agent", *accelerate_args(cfg, spec, nproc, device),
           "-m", "train", "worker", *argv]
    print(f"[launch] {strategy_name(cfg.launch)}: node {spec.node_rank}/{spec.nnodes} "
          f"({spec.source}), {nproc} process(es) per node, world size {world}, device {device}, "
          f"master {spec.master_addr}:{spec.master_port}", flush=True)
    wait_for_master(spec, cfg.launch.master_wait_s)
    sys.stdout.flush()
    code = supervise(cmd, env, cfg, spec.node_rank, world, device)
    if code == 0 and spec.node_rank == 0 and harness_task_list(cfg.checkpoint.harness_tasks) \
            and cfg.train.until_step in (0, cfg.train.max_steps):  # (until_step stops short: no export)
        code = run_harness(cfg)
    return code


def run_harness(cfg: RunConfig) -> int:
    """checkpoint.harness_tasks on the final export, in a process of its own: lm-eval is imported
    only there, after the ranks have exited (their GPU memory is free). The export is read where
    rank 0 wrote it: OUTPUT_DIR, or for a bucket this node's scratch, whose copy was uploaded; the
    harness row it adds to the metrics then goes up too."""
    from train.checkpoint.remote import METRICS
    from train.storage import location, mirror, work_dir

    work = work_dir(cfg)
    final = work / "final"
    cmd = [sys.executable, "-m", "train", "harness", "--model", str(final), "--tasks", cfg.checkpoint.harness_tasks,
           "--limit", str(cfg.checkpoint.harness_limit), "--step", str(cfg.train.max_steps)]
    print(f"[launch] benchmark harness on {final}: {cfg.checkpoint.harness_tasks}", flush=True)
    code = subprocess.run(cmd).returncode
    mirror(work, location(cfg.output_dir), (METRICS,))  # no-op for a local OUTPUT_DIR
    return code
