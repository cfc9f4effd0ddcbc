"""The strategy table: the one place that names strategies.

A strategy is data: an accelerate config file under ``configs/strategies/`` (plus, for
DeepSpeed, the engine JSON it points at) and one row here saying what it shards. The
Makefile, compose, Kubernetes overlays and tests all read names from this table (or from
``configs/strategies/``, which a test keeps in step with it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIGS_DIR = REPO_ROOT / "configs"
STRATEGY_DIR = CONFIGS_DIR / "strategies"

# What a rank can hold a slice of instead of a full copy.
PARAMS, GRADS, OPTIM = "parameters", "gradients", "optimizer"


@dataclass(frozen=True)
class Strategy:
    name: str
    family: str  # "ddp" | "fsdp" | "deepspeed": selects the accelerate distributed type
    shards: frozenset[str]  # which of PARAMS/GRADS/OPTIM each rank holds only 1/N of
    offload: bool  # parameters/optimizer state live in CPU memory between uses
    zero_stage: int | None
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
        Strategy("ddp", "ddp", frozenset(), False, None, "full replica per rank; all-reduce gradients"),
        Strategy("zero1", "deepspeed", frozenset({OPTIM}), False, 1, "shard optimizer state"),
        Strategy("zero2", "deepspeed", frozenset({OPTIM, GRADS}), False, 2, "shard optimizer state and gradients"),
        Strategy("zero3", "deepspeed", _ALL, False, 3, "shard parameters, gradients and optimizer state"),
        Strategy("zero3-offload", "deepspeed", _ALL, True, 3, "ZeRO-3 with parameters and optimizer state in CPU RAM"),
        Strategy("fsdp", "fsdp", _ALL, False, None, "PyTorch FSDP2: shard parameters, gradients, optimizer state"),
        Strategy("fsdp-offload", "fsdp", _ALL, True, None, "FSDP2 with parameters and optimizer state in CPU RAM",
                 gpu_only=True),  # FSDP2's CPUOffloadPolicy moves shards between GPU and CPU
    )
}

CUSTOM = "custom"  # the strategy name reported when ACCELERATE_CONFIG points at a user's own file


def get_strategy(name: str) -> Strategy:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; allowed: {', '.join(STRATEGIES)}") from None
