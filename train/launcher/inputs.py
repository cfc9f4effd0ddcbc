"""The user's inputs, checked before any process starts: one line each (ConfigError, exit 2).

What the launcher can see on its own - settings that contradict the device, the batch, a port,
the model, its tokenizer, a sample of the data, and the checkpoint it would resume - is checked
here, so a mistake costs seconds and one line instead of a process group's worth of tracebacks.
The node itself (shared memory, disk, devices, links) is checked separately, per node.
"""

from __future__ import annotations

import errno
import os
import socket

from train.config import ConfigError, RunConfig, exitcodes, resolve_batch, selected_strategy
from train.config.schema import harness_task_list, profile_ranks
from train.launcher import cuda_child
from train.storage import is_remote, location, probe, reason


def check_inputs(cfg: RunConfig, world_size: int, device: str, nnodes: int = 1) -> None:
    """Every user error we can see without starting processes. Also says, and exits 0, when
    the run is already finished (resuming at max_steps would train nothing)."""
    for note in cfg.notes:
        print(f"[config] {note}", flush=True)
    deferred = defers_storage(cfg, nnodes)
    if not deferred:
        check_storage(cfg)
    check_device(cfg, device)
    check_async_save(cfg)
    profile_ranks(cfg.log, world_size)  # a rank the job does not have records nothing: say so now
    _, global_batch = resolve_batch(cfg, world_size)
    check_port(cfg)
    tokenizer = check_model(cfg)
    check_finetuning_and_tracking(cfg)
    check_harness(cfg)
    check_data(cfg, tokenizer, global_batch)
    if not deferred:
        check_resume(cfg, world_size, global_batch)


def defers_storage(cfg: RunConfig, nnodes: int) -> bool:
    """A bucket OUTPUT_DIR on several nodes: preflight asks every node first (credentials and
    endpoints are per node) and names the one that cannot; the checks that read the bucket
    (``check_after_preflight``) follow it. Otherwise a node without access would fail alone
    and node 0 could only say that it never answered."""
    return nnodes > 1 and cfg.launch.preflight != "off" and is_remote(cfg.output_dir)


def check_after_preflight(cfg: RunConfig, world_size: int, nnodes: int) -> None:
    if defers_storage(cfg, nnodes):
        check_resume(cfg, world_size, resolve_batch(cfg, world_size)[1])


def check_storage(cfg: RunConfig) -> None:
    """An object-store OUTPUT_DIR (or RESUME) this node cannot write, read and delete in is one
    line now (a missing bucket, denied writes, a missing protocol package), not a failed first save."""
    if is_remote(cfg.output_dir):
        problem = probe(cfg.output_dir)
        if problem:
            raise ConfigError(problem)


def check_device(cfg: RunConfig, device: str) -> None:
    strategy = selected_strategy(cfg.launch)
    if strategy is not None and strategy.gpu_only and device == "cpu":
        raise ConfigError(f"STRATEGY={strategy.name} offloads from GPU to CPU memory and needs a CUDA GPU; "
                          "on CPU use fsdp (or zero3-offload)")
    if cfg.train.precision == "fp16" and device == "cpu":
        raise ConfigError("PRECISION=fp16 needs a CUDA GPU (on CPU it would silently train in fp32); use bf16 or no")
    if cfg.train.precision == "bf16" and device == "cuda":
        # In a child: asking creates a CUDA context, which the launcher must not keep (cuda_child.py).
        try:
            supported = cuda_child.call(bf16_supported)
        except cuda_child.ChildFailed:
            return  # a GPU that cannot answer fails the preflight's GPU checks, named there
        if not supported:
            raise ConfigError("PRECISION=bf16 is not supported by this GPU; use fp16 or no")


def bf16_supported() -> bool:
    import torch

    return torch.cuda.is_bf16_supported()


def check_async_save(cfg: RunConfig) -> None:
    """checkpoint.async_save exists where the library saves asynchronously: FSDP2 through
    torch.distributed.checkpoint (train/checkpoint/saver.py's AsyncWriter)."""
    strategy = selected_strategy(cfg.launch)
    if cfg.checkpoint.async_save and (strategy is None or strategy.family != "fsdp"):
        name = strategy.name if strategy else "from ACCELERATE_CONFIG"
        raise ConfigError(f"ASYNC_SAVE=true: asynchronous saving needs STRATEGY fsdp or fsdp-offload "
                          f"(torch.distributed.checkpoint.async_save), this run's is {name}; ddp and DeepSpeed "
                          "(its decoupled engine needs the async-I/O op) save synchronously: set ASYNC_SAVE=false")


def check_port(cfg: RunConfig) -> None:
    """On the master node, MASTER_PORT must be free: torchrun's store binds it, and a busy port
    fails the rendezvous only after its timeout, in every rank."""
    from train.launcher.nodes import resolve_nodes

    spec = resolve_nodes(cfg.launch, os.environ)
    if spec.node_rank != 0:
        return
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is fine, a listener is not
        try:
            s.bind(("", spec.master_port))
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                return  # e.g. no permission for a low port here: leave the verdict to torchrun
            hint = ("pick another MASTER_PORT" if spec.nnodes > 1 else
                    "pick another MASTER_PORT, or leave it unset on a single node to get a free one")
            raise ConfigError(f"MASTER_PORT={spec.master_port} is already in use on this machine (another run "
                              f"or program listens on it); {hint}") from None


def check_model(cfg: RunConfig):
    from train.worker.model import check_model_source

    return check_model_source(cfg.model)


def check_finetuning_and_tracking(cfg: RunConfig) -> None:
    """LoRA targets (on a meta-device model) and tracker names, packages and W&B login."""
    from train.worker.lora import check_lora
    from train.worker.tracking import check_trackers

    check_trackers(cfg)
    check_lora(cfg.model)


def check_harness(cfg: RunConfig) -> None:
    """checkpoint.harness_tasks are known to lm-eval, asked in a process of its own (`harness --check`):
    lm-eval is heavy and imported only where it runs. YAML files alone were checked with the config."""
    import subprocess
    import sys

    if not any(not t.endswith((".yaml", ".yml")) for t in harness_task_list(cfg.checkpoint.harness_tasks)):
        return
    p = subprocess.run([sys.executable, "-m", "train", "harness", "--check", "--tasks", cfg.checkpoint.harness_tasks],
                       capture_output=True, text=True)
    if p.returncode:
        errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error: ")]
        raise ConfigError(f"checkpoint.harness_tasks: {errors[-1][len('error: '):] if errors else p.stderr.strip()[-300:]}")


def check_data(cfg: RunConfig, tokenizer, global_batch: int) -> None:
    """A raw DATASET is prepared into its cache here, once per node before any rank exists (the
    ranks then only open it); then SEQ_LEN and the batch are checked against the manifests."""
    from train.data import build_splits, check_splits
    from train.launcher.cpus import available_cpus

    from train.data.packing import check_attention, planned

    check_attention(planned(cfg.data), cfg.model)  # before preparing anything
    splits = build_splits(cfg.data, tokenizer, cfg.seed, workers=cfg.data.prepare_workers or available_cpus())
    check_splits(splits, cfg.data, global_batch)


def check_resume(cfg: RunConfig, world_size: int, global_batch: int) -> None:
    from train.checkpoint.layout import find_resume, read_manifest

    try:
        path = find_resume(cfg, world_size)
    except OSError as e:  # a bucket this node may not list or read (PermissionError is one)
        if not is_remote(cfg.output_dir):
            raise
        raise ConfigError(f"OUTPUT_DIR={cfg.output_dir!r}: cannot read its checkpoints ({reason(e)})") from None
    if path is None:
        return
    manifest = read_manifest(path)
    step = int(manifest.get("step", 0))
    final = location(cfg.output_dir) / "final"
    if step >= cfg.train.max_steps and (final.is_dir() or not cfg.checkpoint.export):
        raise exitcodes.Exit(f"[launch] nothing to train: {path} is at step {step} and MAX_STEPS={cfg.train.max_steps}; "
              f"raise MAX_STEPS to train further, or use another OUTPUT_DIR (or delete {cfg.output_dir}) "
              "to start over", exitcodes.OK)
    saved_batch = manifest.get("global_batch")
    position = int(manifest.get("train_state", {}).get("samples_in_epoch", 0))
    if saved_batch and saved_batch != global_batch and position % global_batch:
        raise ConfigError(
            f"checkpoint {str(path)!r} was trained with a global batch of {saved_batch} "
            f"({manifest.get('world_size')} ranks) and stopped {position} samples into an epoch; this run's global "
            f"batch is {global_batch} ({world_size} ranks), which cannot continue from there: "
            + _same_batch_hint(saved_batch, world_size, cfg.train.micro_batch))


def _same_batch_hint(saved: int, world: int, micro: int) -> str:
    """Settings that keep the checkpoint's global batch on this world size, if any exist."""
    if saved % world:
        fits = [w for w in range(1, saved + 1) if saved % w == 0 and w <= 64]
        return f"{saved} does not split across {world} ranks; resume on {', '.join(map(str, fits[-4:]))} ranks"
    per_rank = saved // world
    m = max(d for d in range(1, min(micro, per_rank) + 1) if per_rank % d == 0)
    extra = "" if m == micro else f" MICRO_BATCH={m}"
    return f"set GLOBAL_BATCH={saved}{extra} (accumulation is then derived for {world} ranks)"
