"""Mixed-precision details of the GPU path that can be shown on CPU.

- fp16 overflow accounting with a fused AdamW: GradScaler always calls a fused optimizer and
  lets the kernel skip the update, so accelerate's `optimizer_step_was_skipped` stays False and
  the LR schedule would advance on every overflow. Shown here with torch's GradScaler and fused
  AdamW on CPU (both run on CPU in torch 2.13) and an injected inf gradient.
- The settings the run hands DeepSpeed and FSDP2 on CUDA, and which AdamW it picks.
"""

from __future__ import annotations

import pytest
import torch

from helpers import fp16_accelerator, one_step
from train.config import ConfigError, load_config
from train.config.strategies import STRATEGIES
from train.worker.accelerator import (
    CUDA_BUCKET_FLOOR,
    check_compile_toolchain,
    deepspeed_config,
    fsdp_plugin_settings,
    fused_adamw,
    optimizer_step_skipped,
)

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (make test-gpu)")])]


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_overflow_with_fused_adamw_counts_as_skipped_and_holds_the_lr(device):
    acc = fp16_accelerator(device)
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8).to(acc.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))  # the LR moves every step
    model, opt, sched = acc.prepare(model, opt, sched)
    before = [p.detach().clone() for p in model.parameters()]
    scale, lr = acc.scaler.get_scale(), sched.get_last_lr()[0]

    assert one_step(acc, model, opt, sched, inject_inf=True), "an inf gradient must count as a skipped step"
    # What made the old rule wrong: GradScaler did call the fused step, so accelerate saw no skip.
    assert not acc.optimizer_step_was_skipped
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())), "the kernel must not update"
    assert acc.scaler.get_scale() == scale / 2, "GradScaler backs off on overflow"
    assert sched.get_last_lr()[0] == lr, "the LR schedule advanced on an overflowed step"

    assert not one_step(acc, model, opt, sched, inject_inf=False), "a finite step is not skipped"
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert sched.get_last_lr()[0] < lr


def test_without_a_grad_scaler_nothing_is_reported_skipped():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    acc = Accelerator(cpu=True)
    assert not optimizer_step_skipped(acc, torch.tensor(float("inf")))  # bf16/fp32: no loss scaling


def test_fused_adamw_on_cuda_except_fp16_with_fsdp_offload():
    assert not fused_adamw(STRATEGIES["ddp"], "fp16", "cpu")
    assert fused_adamw(STRATEGIES["ddp"], "fp16", "cuda")
    assert fused_adamw(STRATEGIES["fsdp"], "fp16", "cuda")
    assert fused_adamw(STRATEGIES["fsdp-offload"], "bf16", "cuda")
    # GradScaler's found-inf flag reaches offloaded CPU parameters through a non-blocking copy.
    assert not fused_adamw(STRATEGIES["fsdp-offload"], "fp16", "cuda")


@pytest.mark.parametrize("precision, low", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_fsdp2_reduces_gradients_in_fp32_under_mixed_precision(precision, low):
    cfg = load_config([f"PRECISION={precision}", "STRATEGY=fsdp"])
    policy = fsdp_plugin_settings(cfg, "cpu")["mixed_precision_policy"]
    assert policy == {"param_dtype": low, "reduce_dtype": torch.float32, "output_dtype": low}
    assert "mixed_precision_policy" not in fsdp_plugin_settings(load_config(["PRECISION=no"]), "cpu")


def test_fsdp2_loads_a_pretrained_model_on_rank0_only(tmp_path):
    pretrained = load_config([f"MODEL={tmp_path}", "STRATEGY=fsdp"])
    assert fsdp_plugin_settings(pretrained, "cuda")["cpu_ram_efficient_loading"] is True
    assert fsdp_plugin_settings(pretrained, "cpu")["cpu_ram_efficient_loading"] is True  # RSS: test_gpu_host.py
    preset = load_config(["MODEL=llama-tiny", "STRATEGY=fsdp"])
    assert "cpu_ram_efficient_loading" not in fsdp_plugin_settings(preset, "cuda")  # built on every rank


def test_fsdp2_plugin_settings_are_accepted_by_accelerate():
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import MixedPrecisionPolicy

    cfg = load_config(["PRECISION=bf16", "STRATEGY=fsdp"])
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, **fsdp_plugin_settings(cfg, "cpu"))
    plugin.set_mixed_precision("bf16")  # what accelerate does with PRECISION: must not override ours
    assert plugin.mixed_precision_policy == MixedPrecisionPolicy(
        param_dtype=torch.bfloat16, reduce_dtype=torch.float32, output_dtype=torch.bfloat16)


@pytest.mark.parametrize("name", ["zero1", "zero2", "zero3", "zero3-offload"])
def test_deepspeed_overlaps_communication_with_floored_buckets_on_cuda_only(name):
    strategy, cfg, hidden = STRATEGIES[name], load_config([f"STRATEGY={name}"]), 64
    cpu = deepspeed_config(strategy, cfg, 1, 2, hidden, "cpu")["zero_optimization"]
    gpu = deepspeed_config(strategy, cfg, 1, 2, hidden, "cuda")["zero_optimization"]
    assert cpu["reduce_bucket_size"] == hidden * hidden, "CPU keeps small buckets (CI memory)"
    assert not cpu.get("overlap_comm")
    assert gpu["overlap_comm"] is True
    assert gpu["reduce_bucket_size"] == CUDA_BUCKET_FLOOR
    if "stage3_prefetch_bucket_size" in gpu:
        assert gpu["stage3_prefetch_bucket_size"] == CUDA_BUCKET_FLOOR
    if "allgather_bucket_size" in gpu:
        assert gpu["allgather_bucket_size"] >= CUDA_BUCKET_FLOOR
    big = deepspeed_config(strategy, cfg, 1, 2, 8192, "cuda")["zero_optimization"]
    assert big["reduce_bucket_size"] == 8192 * 8192, "the floor is a floor, not a cap"


def test_tf32_is_a_config_key_on_by_default():
    assert load_config([]).train.tf32 is True
    assert load_config(["train.tf32=false"]).train.tf32 is False


def test_compile_without_a_compiler_is_refused_naming_what_is_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no g++/gcc/c++ reachable
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(ConfigError, match=r"model.compile=true needs a C/C\+\+ compiler .*model.compile=false"):
        check_compile_toolchain("cpu")
