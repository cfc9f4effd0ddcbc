"""(split from train/worker/accelerator.py)"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from train.config.strategies import GRADS, OPTIM, PARAMS, Strategy
from train.progress import ENV_EXPECTED_WORLD
from train.worker.accelerator import innermost_optimizer


def expected_distributed_type(strategy: Strategy, device: str) -> str:
    if strategy.family == "ddp":
        return "MULTI_CPU" if device == "cpu" else "MULTI_GPU"
    return strategy.distributed_type


def check_engaged(accelerator, strategy: Strategy | None, device: str) -> None:
    """Stop with a clear error if the job is not the distributed job that was asked for."""
    expected = int(os.environ.get(ENV_EXPECTED_WORLD, accelerator.num_processes))
    pg = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    problems = []
    if accelerator.num_processes != expected or pg != expected:
        problems.append(f"world size: asked for {expected}, accelerate sees {accelerator.num_processes}, "
                        f"process group has {pg}")
    if strategy is not None and expected > 1:
        want, got = expected_distributed_type(strategy, device), accelerator.distributed_type.name
        if got != want:
            problems.append(f"distributed type: strategy {strategy.name!r} needs {want}, accelerate engaged {got}")
    if problems:
        raise RuntimeError("the run did not engage as configured: " + "; ".join(problems))


# -- what each rank holds ------------------------------------------------------------------
def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # FSDP2 DTensor -> this rank's shard


def _bytes(t: torch.Tensor | None) -> int:
    if t is None or not torch.is_tensor(t):
        return 0
    t = _local(t)
    return t.numel() * t.element_size()


def local_param_bytes(model) -> int:
    total = 0
    for p in model.parameters():
        ds_part = getattr(p, "ds_tensor", None)  # ZeRO-3: the partition this rank owns
        total += _bytes(ds_part) if ds_part is not None else _bytes(p)
    return total


@dataclass
class HeldBytes:
    parameters: int = 0
    gradients: int = 0
    optimizer: int = 0  # Adam moments (what ZeRO's formulas call optimizer state, K=8 bytes/param in fp32)

    def as_dict(self) -> dict[str, int]:
        return {PARAMS: self.parameters, GRADS: self.gradients, OPTIM: self.optimizer}


class HeldBytesProbe:
    """Measures, on this rank, the bytes of parameters, of the gradients the optimizer steps
    on, and of optimizer state, right before each optimizer step: a torch pre-step hook on
    the innermost optimizer, which under ZeRO holds flat fp32 partitions. DeepSpeed may call
    it once per parameter group, so one optimizer step's calls are summed (``reset`` starts a step)."""

    def __init__(self, model, optimizer):
        self.model, self.last = model, None
        self._grads: dict[int, int] = {}
        self._state: dict[int, int] = {}
        self._handle = innermost_optimizer(optimizer).register_step_pre_hook(self._measure)

    def reset(self, armed: bool = True) -> None:
        """Start an optimizer step; measure it only if ``armed`` (the walk costs ~0.1 ms per step)."""
        self._grads.clear(), self._state.clear()
        self.armed = armed

    armed = True

    def _measure(self, opt, args, kwargs) -> None:
        if not self.armed:
            return
        for g in opt.param_groups:
            for p in g["params"]:
                s = opt.state.get(p)
                self._grads[id(p)] = _bytes(p.grad)
                # Before the first step Adam has no moments yet: count what it is about to allocate.
                self._state[id(p)] = (sum(_bytes(v) for k, v in s.items() if k != "step") if s else 2 * _bytes(p))
        self.last = HeldBytes(local_param_bytes(self.model), sum(self._grads.values()), sum(self._state.values()))

    def close(self) -> None:
        self._handle.remove()


def check_sharded(held: HeldBytes, full: HeldBytes, strategy: Strategy, world_size: int) -> None:
    """Sharded strategies must hold about 1/world of each sharded category (checked at step 1)."""
    if world_size < 2:
        return
    bad = []
    for cat, mine in held.as_dict().items():
        whole = full.as_dict()[cat]
        if cat in strategy.shards and whole and mine > whole / world_size * 1.25:
            bad.append(f"{cat}: holds {mine} of {whole} bytes, expected about 1/{world_size}")
    if bad:
        raise RuntimeError(f"strategy {strategy.name!r} is not sharding: " + "; ".join(bad))
