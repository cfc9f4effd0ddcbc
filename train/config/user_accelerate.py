"""A user's own `accelerate config` file, mapped onto the checked strategy recipes.

accelerate's own configs do not engage several processes on CPU (MACHINE-NOTES: a
``use_cpu: true`` file starts one process and `distributed_type: FSDP` silently runs each
rank alone), so a user's file is not passed through. It is read for what it decides - the
distribution (``distributed_type`` + ZeRO stage/offload, or FSDP offload), the process and
machine counts, the rendezvous address and the precision - and the run then uses the matching
row of ``train/config/strategies.py``. What cannot be mapped is refused, naming the key.

Hand-written because accelerate has no public "what does this config mean" API: its
``ClusterConfig`` loader is for its own CLI and accepts (and then ignores) settings we cannot run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from train.config.strategies import REPO_ROOT

# accelerate key -> our dotted config key, for the settings a user's file decides.
TOPOLOGY_KEYS = {
    "num_machines": "launch.nnodes",
    "machine_rank": "launch.node_rank",
    "main_process_ip": "launch.master_addr",
    "main_process_port": "launch.master_port",
    "mixed_precision": "train.precision",
}
DDP_TYPES = ("NO", "MULTI_CPU", "MULTI_GPU")
SUPPORTED_TYPES = (*DDP_TYPES, "DEEPSPEED", "FSDP")


class UnsupportedAccelerateConfig(ValueError):
    """The file asks for something no checked recipe runs (message names the key)."""


def _off(value: Any) -> bool:
    return value in (None, "", "none", "None", False)


def _deepspeed_strategy(path: Path, ds: dict, notes: list[str]) -> str:
    file = ds.get("deepspeed_config_file")
    if file:
        json_path = Path(file)
        if not json_path.is_absolute() and not json_path.is_file():
            json_path = next((p for p in (path.parent / file, REPO_ROOT / file) if p.is_file()), json_path)
        try:
            engine = json.loads(json_path.read_text())
        except (OSError, ValueError) as e:
            raise UnsupportedAccelerateConfig(f"deepspeed_config_file {file!r} cannot be read ({e})") from None
        zero = engine.get("zero_optimization") or {}
        stage = zero.get("stage", 0)
        opt_dev = (zero.get("offload_optimizer") or {}).get("device")
        param_dev = (zero.get("offload_param") or {}).get("device")
        where = f"zero_optimization in {file}"
        notes.append(f"ZeRO stage and offload come from {file}; its other engine settings are replaced by "
                     "the checked configs/deepspeed/ recipe (batch sizes and precision from the run config)")
    else:
        stage, opt_dev, param_dev = ds.get("zero_stage", 0), ds.get("offload_optimizer_device"), ds.get("offload_param_device")
        where = "deepspeed_config"
    if stage == "auto" or not isinstance(stage, int) or stage not in (1, 2, 3):
        raise UnsupportedAccelerateConfig(f"{where}: zero_stage/stage={stage!r} is not runnable here; "
                                          "allowed: 1, 2, 3 (for no sharding use distributed_type: MULTI_GPU)")
    for key, dev in (("offload_optimizer_device", opt_dev), ("offload_param_device", param_dev)):
        if not _off(dev) and dev != "cpu":
            raise UnsupportedAccelerateConfig(f"{where}: {key}={dev!r} is not supported; allowed: none, cpu")
    offload = not _off(opt_dev) or not _off(param_dev)
    if offload and stage != 3:
        raise UnsupportedAccelerateConfig(f"{where}: CPU offload with ZeRO stage {stage} has no checked recipe; "
                                          "use stage 3 with offload (zero3-offload) or stage 1/2 without offload")
    return "zero3-offload" if offload else f"zero{stage}"


def _fsdp_strategy(fsdp: dict, notes: list[str]) -> str:
    version = int(fsdp.get("fsdp_version", 1) or 1)
    sharding = str(fsdp.get("fsdp_sharding_strategy", "FULL_SHARD"))
    if sharding not in ("FULL_SHARD", "1"):
        raise UnsupportedAccelerateConfig(f"fsdp_config: fsdp_sharding_strategy={sharding!r} has no checked recipe; "
                                          "allowed: FULL_SHARD (or use DEEPSPEED zero_stage 2 to shard only gradients "
                                          "and optimizer state)")
    if version == 1:
        notes.append("fsdp_version: 1 runs as FSDP2 (fully_shard), the checked recipe")
    return "fsdp-offload" if fsdp.get("fsdp_offload_params") in (True, "true", "True") else "fsdp"


def read(path: str) -> tuple[dict[str, Any], list[str]]:
    """(our dotted key -> value, notes) for an accelerate config file; raises on what cannot run."""
    p = Path(path)
    try:
        conf = yaml.safe_load(p.read_text())  # accelerate writes YAML or JSON; YAML reads both
    except (OSError, yaml.YAMLError) as e:
        raise UnsupportedAccelerateConfig(f"cannot be read ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(conf, dict):
        raise UnsupportedAccelerateConfig("is not a mapping of accelerate settings (run `accelerate config`)")
    notes: list[str] = []
    kind = str(conf.get("distributed_type", "NO"))
    if kind in DDP_TYPES:
        strategy = "ddp"
    elif kind == "DEEPSPEED":
        strategy = _deepspeed_strategy(p, conf.get("deepspeed_config") or {}, notes)
    elif kind == "FSDP":
        strategy = _fsdp_strategy(conf.get("fsdp_config") or {}, notes)
    else:
        raise UnsupportedAccelerateConfig(f"distributed_type={kind!r} is not supported; allowed: {', '.join(SUPPORTED_TYPES)}")
    out: dict[str, Any] = {"launch.strategy": strategy}
    for key, dotted in TOPOLOGY_KEYS.items():
        if conf.get(key) not in (None, ""):
            out[dotted] = conf[key]
    if out.get("train.precision") not in (None, "no", "bf16", "fp16"):
        raise UnsupportedAccelerateConfig(f"mixed_precision={out['train.precision']!r} is not supported; allowed: no, bf16, fp16")
    if conf.get("num_processes") not in (None, "", -1):
        machines = int(conf.get("num_machines") or 1)
        procs = int(conf["num_processes"])
        if procs < 1 or procs % machines:
            raise UnsupportedAccelerateConfig(f"num_processes={procs} is not a multiple of num_machines={machines}")
        out["launch.nproc_per_node"] = procs // machines
    if conf.get("use_cpu") in (True, "true", "True"):
        out["launch.device"] = "cpu"
    return out, notes
