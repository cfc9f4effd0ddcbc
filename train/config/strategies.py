"""The strategy table: the one place that names strategies.

A strategy is data: an accelerate config file under ``configs/strategies/`` (plus, for
DeepSpeed, the engine JSON it points at) and one row here saying what it shards. The
Makefile, compose, Kubernetes overlays and tests all read names from this table (or from
``configs/strategies/``, which a test keeps in step with it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]  # train/config/strategies.py -> the checkout
CONFIGS_DIR = REPO_ROOT / "configs"
STRATEGY_DIR = CONFIGS_DIR / "strategies"

# What a rank can hold a slice of instead of a full copy.
PARAMS, GRADS, OPTIM = "parameters", "gradients", "optimizer"


@dataclass(frozen=True)
class Strategy:
    name: str
    family: str  # "ddp" | "fsdp" | "deepspeed": selects the accelerate distributed type
    shards: frozenset[str]  # which of PARAMS/GRADS/OPTIM each rank holds only 1/N of
    offload: bool  # parameters/optimizer state live in CPU memory between uses (must match the config files)
    zero_stage: int | None  # DeepSpeed's zero_optimization.stage (tests/test_config.py checks both against the files)
    summary: str
    gpu_only: bool = False  # refused on CPU-only machines, with the reason below

    @property
    def accelerate_config(self) -> Path:
        return STRATEGY_DIR / f"{self.name}.yaml"

    @property
    def deepspeed_config(self) -> Path | None:
        return CONFIGS_DIR / "deepspeed" / f"{self.name}.json" if self.family == "deepspeed" else None

    @property
    def distributed_type(self) -> str:
        """accelerate's DistributedType name this strategy must engage as (checked at start)."""
        return {"ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed": "DEEPSPEED"}[self.family]


_ALL = frozenset({PARAMS, GRADS, OPTIM})

STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy(name="ddp", family="ddp", shards=frozenset(), offload=False, zero_stage=None,
                 summary="full replica per rank; all-reduce gradients"),
        Strategy(name="zero1", family="deepspeed", shards=frozenset({OPTIM}), offload=False, zero_stage=1,
                 summary="shard optimizer state"),
        Strategy(name="zero2", family="deepspeed", shards=frozenset({OPTIM, GRADS}), offload=False, zero_stage=2,
                 summary="shard optimizer state and gradients"),
        Strategy(name="zero3", family="deepspeed", shards=_ALL, offload=False, zero_stage=3,
                 summary="shard parameters, gradients and optimizer state"),
        Strategy(name="zero3-offload", family="deepspeed", shards=_ALL, offload=True, zero_stage=3,
                 summary="ZeRO-3 with parameters and optimizer state in CPU RAM"),
        Strategy(name="fsdp", family="fsdp", shards=_ALL, offload=False, zero_stage=None,
                 summary="PyTorch FSDP2: shard parameters, gradients, optimizer state"),
        # FSDP2's CPUOffloadPolicy moves shards between GPU and CPU: no CPU-only path.
        Strategy(name="fsdp-offload", family="fsdp", shards=_ALL, offload=True, zero_stage=None,
                 summary="FSDP2 with parameters and optimizer state in CPU RAM", gpu_only=True),
    )
}

CUSTOM = "custom"  # the strategy name reported when ACCELERATE_CONFIG points at a user's own file
