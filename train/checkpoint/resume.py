"""Set a portable checkpoint into whatever strategy this run prepared.

Runs on every rank after ``accelerator.prepare``: each rank reads the full fp32 tensors and
hands them to the library's own setter, which keeps only this rank's part:

- ddp / fsdp: ``torch.distributed.checkpoint.state_dict.set_model_state_dict`` and
  ``set_optimizer_state_dict`` with full state dicts (FSDP2 shards them into DTensors);
- deepspeed: ``deepspeed.utils.safe_set_full_fp32_param`` / ``safe_set_full_optimizer_state``
  (ZeRO 1/2/3), then the low-precision copies are refreshed from the fp32 master weights.

Then the LR scheduler state and each group's current LR (which ``load_state`` would restore
with the optimizer's param groups).
"""

from __future__ import annotations

import torch

from train.checkpoint.portable import Source
from train.worker.accelerator import innermost_optimizer


def load_portable(acc, model, optimizer, scheduler, src: Source) -> None:
    unwrapped = acc.unwrap_model(model)
    names = [n for n, _ in unwrapped.named_parameters()]
    if sorted(names) != sorted(src.names):
        raise RuntimeError(f"portable checkpoint holds parameters {sorted(set(src.names) ^ set(names))[:3]} "
                           "that this model does not share: another model's checkpoint")
    if acc.distributed_type.name == "DEEPSPEED":
        _load_deepspeed(model, unwrapped, optimizer, src)
    else:
        _load_torch(model, unwrapped, optimizer, src)
    if src.scheduler is not None:
        scheduler.load_state_dict(src.scheduler)
        inner = innermost_optimizer(optimizer)
        for group, lr in zip(inner.param_groups, src.scheduler["_last_lr"]):
            group["lr"] = lr


def _load_torch(model, unwrapped, optimizer, src: Source) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(unwrapped, {n: src.get("param", n) for n in src.names}, options=opts)
    inner = innermost_optimizer(optimizer)
    name_of = {id(p): n for n, p in unwrapped.named_parameters()}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [name_of[id(p)] for p in g["params"]]}
              for g in inner.param_groups]
    state = {n: {"step": torch.tensor(float(src.step)), "exp_avg": src.get("exp_avg", n),
                 "exp_avg_sq": src.get("exp_avg_sq", n)} for n in src.names}
    set_optimizer_state_dict(unwrapped, inner, {"state": state, "param_groups": groups}, options=opts)


def _load_deepspeed(engine, unwrapped, optimizer, src: Source) -> None:
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    zero, inner = engine.optimizer, innermost_optimizer(optimizer)
    # Adam creates its moments at the first step and DeepSpeed links them to the parameters
    # then (ZeRO 1/2: _lazy_init_hp_params_optimizer_state; ZeRO-3 reads optimizer.state
    # directly), so before a first step there is nothing to set: create them as Adam would.
    torch_step = type(inner).__module__.startswith("torch.optim")
    flats = getattr(zero, "fp32_partitioned_groups_flat", None) or zero.single_partition_of_fp32_groups
    for flat in flats:  # the fp32 partitions the inner optimizer steps on (ZeRO-3 / ZeRO 1/2)
        st = inner.state[flat]
        if "exp_avg" not in st:
            st.update(step=torch.tensor(0.0) if torch_step else 0, exp_avg=torch.zeros_like(flat),
                      exp_avg_sq=torch.zeros_like(flat))  # step: set below, where the optimizer keeps it
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
        zero._lazy_init_hp_params_optimizer_state()
    for name, p in unwrapped.named_parameters():
        safe_set_full_fp32_param(p, src.get("param", name))
        for kind in ("exp_avg", "exp_avg_sq"):
            safe_set_full_optimizer_state(p, src.get(kind, name), kind)
    set_steps(inner, src.step, as_tensor=torch_step)
    if hasattr(zero, "update_lp_params"):  # ZeRO 1/2: fp32 partitions -> the model's (all-gathered) weights
        zero.update_lp_params()
    else:
        _refresh_zero3_lp(zero)


def _refresh_zero3_lp(zero) -> None:
    """ZeRO-3: copy the fp32 partitions into the parameters' partitions. DeepSpeed does exactly
    this at the end of its universal-checkpoint load (stage3.py load_hp_checkpoint_state_from_
    checkpoint_dir_stage3) but offers no public call for it."""
    for fp32, lp in zip(zero.fp32_partitioned_groups_flat, zero.fp16_partitioned_groups_flat):
        if fp32.numel() > 0:
            lp.data.copy_(fp32.data)
    for sub, flat in enumerate(zero.fp16_partitioned_groups_flat):
        for part, q in zip(zero.fp16_partitioned_groups[sub], zero.unflatten(flat, zero.fp16_partitioned_groups[sub])):
            part.data = q.data


def set_steps(optimizer, step: int, as_tensor: bool = True) -> None:
    """Every parameter state's ``step``, kept where the optimizer itself keeps it.

    torch's rule (``Optimizer._process_value_according_to_param_policy``, what ``load_state_dict``
    applies): a fused or capturable optimizer reads ``step`` in device code, as float32 on the
    parameter's device; the others keep it as a CPU tensor. A CPU ``step`` handed to the fused
    CUDA AdamW of a ZeRO run resumed from a converted checkpoint fails its first step.
    DeepSpeed's own optimizers (CPU Adam) count in a plain int (``as_tensor=False``).
    """
    # Over the states, not the groups' params: ZeRO-3 points its optimizer's param group at one
    # fp32 partition at a time (stage3._optimizer_step), so the groups do not list every state's key.
    on_device = any(g.get("fused") or g.get("capturable") for g in optimizer.param_groups)
    for p, st in optimizer.state.items():
        if "step" not in st:
            continue
        if not as_tensor:
            st["step"] = step
        elif on_device:
            st["step"] = torch.tensor(float(step), dtype=torch.float32, device=p.device)
        else:
            st["step"] = torch.tensor(float(step))
