"""The memory planner (train/tools/plan.py) and FLOPs/MFU (train/flops.py): formulas, the
recommendation and the CLI. The planner against bytes measured per rank in real 2-process
runs is in test_strategies.py, on the runs it shares."""

from __future__ import annotations

import json

import pytest
from helpers import shape_of

from train.config.strategies import GRADS, OPTIM, PARAMS, STRATEGIES
from train.memory import GiB, activation_bytes, held_bytes
from train.tools.plan import COST_ORDER, Row, main, make_plan, recommend
from train.worker.model import load_model_config

P, N = 1000, 4


# -- formulas ----------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy, expected", [
    # (params, grads, Adam moments, DeepSpeed fp32 master) bytes per rank, fp32, P=1000, N=4
    ("ddp", (4000, 4000, 8000, 0)),
    ("zero1", (4000, 4000, 2000, 1000)),
    ("zero2", (4000, 1000, 2000, 1000)),
    ("zero3", (1000, 1000, 2000, 1000)),
    ("zero3-offload", (1000, 1000, 2000, 1000)),
    ("fsdp", (1000, 1000, 2000, 0)),
    ("fsdp-offload", (1000, 1000, 2000, 0)),
])
def test_held_bytes_follow_the_zero_formulas_in_fp32(strategy, expected):
    got = held_bytes(strategy, P, N, "no")
    assert (got[PARAMS], got[GRADS], got[OPTIM], got["master"]) == expected


def test_bf16_deepspeed_is_the_2_2_12_accounting_and_ddp_fsdp_keep_fp32_params():
    for name in ("zero1", "zero2", "zero3"):
        assert sum(held_bytes(name, P, 1, "bf16").values()) == 16 * P  # 2 + 2 + (4 master + 8 moments)
    z2 = held_bytes("zero2", P, N, "bf16")
    assert (z2[PARAMS], z2[GRADS], z2[OPTIM], z2["master"]) == (2 * P, 2 * P // N, 8 * P // N, 4 * P // N)
    assert held_bytes("ddp", P, N, "bf16") == held_bytes("ddp", P, N, "no")  # autocast: fp32 params and grads
    assert held_bytes("fsdp", P, N, "bf16") == held_bytes("fsdp", P, N, "no")


def test_sharded_bytes_round_up_like_padded_partitions():
    assert held_bytes("zero3", 1001, 2)[PARAMS] == 2002  # ceil(1001 * 4 / 2)


@pytest.mark.parametrize("name", ["llama-debug", "llama-tiny"])
def test_planner_counts_exactly_the_parameters_training_builds(name):
    from train.worker.model import build_model, load_tokenizer

    cfg, shape = shape_of(f"MODEL={name}")
    model = build_model(cfg.model, len(load_tokenizer(cfg.model)))
    assert shape.params == sum(p.numel() for p in model.parameters())
    assert shape.layer_params * shape.layers + shape.root_params == shape.params


def test_offload_strategies_keep_state_in_cpu_ram_and_only_buffers_on_the_gpu():
    cfg, shape = shape_of("MODEL=llama-tiny")
    plan = make_plan(cfg, shape, gpus_per_node=2, nodes=1, gpu_memory=80 * GiB)
    rows = {r.strategy: r for r in plan.rows}
    for name in ("zero3-offload", "fsdp-offload"):
        r = rows[name]
        assert r.offloaded == r.parameters + r.gradients + r.optimizer + r.master
        assert r.gpu == r.buffers
        assert r.total == r.buffers + r.activations
    state = {n: r.parameters + r.gradients + r.optimizer for n, r in rows.items()}
    assert rows["ddp"].offloaded == 0 and state["ddp"] > state["zero3"]
    # Totals are not ordered the same way on a model this small: DeepSpeed's CUDA bucket floors
    # (5e7 elements) outweigh a 5M-parameter model's state.
    assert rows["zero3"].gpu > rows["zero3-offload"].gpu


def test_activation_checkpointing_shrinks_the_estimate_and_eager_attention_grows_it():
    _, shape = shape_of("MODEL=llama-20m")
    plain = activation_bytes(shape, "bf16", 1024, 4, False)
    assert activation_bytes(shape, "bf16", 1024, 4, True) < plain / 3
    assert activation_bytes(shape, "bf16", 1024, 4, False, "eager") > plain
    assert activation_bytes(shape, "bf16", 2048, 4, False) == pytest.approx(2 * plain, rel=1e-6)


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_activation_estimate_is_within_20_percent_of_the_tensors_autograd_saves(precision):
    """Sum the bytes of every tensor saved for backward (parameters excluded) in one forward
    pass on CPU, as the loop runs it (bf16 = autocast over fp32 weights, whose 16-bit weight
    copies the planner counts in DDP's buffers)."""
    import torch

    from train.worker.model import build_model, load_tokenizer

    cfg, shape = shape_of("MODEL=llama-tiny", "SEQ_LEN=64", "MICRO_BATCH=4", f"PRECISION={precision}")
    model = build_model(cfg.model, len(load_tokenizer(cfg.model)))
    params = {p.data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        if t.data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = torch.randint(0, shape.vocab, (4, 64), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            model(input_ids=x, labels=x)
    estimate = activation_bytes(shape, precision, 64, 4, False) + (2 * shape.matmul_params if precision == "bf16" else 0)
    assert estimate == pytest.approx(sum(saved.values()), rel=0.20)


# -- recommendation ------------------------------------------------------------------------
def _row(name: str, total: int, total_ckpt: int, usable: int) -> Row:
    return Row(name, 0, 0, 0, 0, 0, 0, 0, 0, total, total, total_ckpt, total <= usable, total_ckpt <= usable)


def test_recommendation_is_the_cheapest_that_fits_in_the_documented_order():
    usable = 100
    # everything fits: ddp; ddp too big: the next in cost order that fits
    rows = [_row(n, 10, 5, usable) for n in COST_ORDER]
    assert recommend(rows) == {"strategy": "ddp", "activation_checkpointing": False, "total": 10}
    rows = [_row(n, 200 if n in ("ddp", "zero1") else 90, 50, usable) for n in COST_ORDER]
    assert recommend(rows)["strategy"] == "zero2"
    # no on-GPU strategy fits without recomputation, one fits with it: recompute before offloading
    rows = [_row(n, 200, 90 if n == "zero3" else 150, usable) if not STRATEGIES[n].offload else _row(n, 80, 40, usable)
            for n in COST_ORDER]
    assert recommend(rows) == {"strategy": "zero3", "activation_checkpointing": True, "total": 90}
    # only offload fits
    rows = [_row(n, 50 if STRATEGIES[n].offload else 500, 40 if STRATEGIES[n].offload else 400, usable)
            for n in COST_ORDER]
    assert recommend(rows)["strategy"] == "fsdp-offload"
    assert recommend([_row(n, 500, 400, usable) for n in COST_ORDER]) is None


def test_more_memory_never_recommends_a_costlier_strategy(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256).save_pretrained(tmp_path)
    cfg, shape = shape_of(f"MODEL={tmp_path / 'config.json'}", "PRECISION=bf16", "SEQ_LEN=4096", "MICRO_BATCH=1")
    assert shape.params == 8_030_261_248  # Llama-3-8B's shape, counted on the meta device

    def rank(gib: float):
        rec = make_plan(cfg, shape, 8, 1, int(gib * GiB)).recommendation
        return None if rec is None else (STRATEGIES[rec["strategy"]].offload, rec["activation_checkpointing"],
                                         COST_ORDER.index(rec["strategy"]))

    ranks = [rank(g) for g in (8, 24, 40, 80, 400)]
    assert ranks[0] is None  # 8 GiB per GPU: nothing fits
    assert ranks[-1] == (False, False, 0)  # 400 GiB per GPU: plain DDP
    got = [r for r in ranks if r is not None]
    assert got == sorted(got, reverse=True), ranks


# -- CLI -------------------------------------------------------------------------------------
def test_plan_cli_prints_every_strategy_and_a_recommendation(capsys):
    main(["--gpus-per-node", "2", "--nodes", "1", "--gpu-memory", "16", "MODEL=llama-tiny", "SEQ_LEN=128"])
    out = capsys.readouterr().out
    assert "llama-tiny" in out and "2 GPU(s)" in out
    for name in STRATEGIES:
        assert f"\n{name} " in out
    assert "Recommended: STRATEGY=ddp" in out


def test_plan_reads_the_model_from_the_environment_like_training(capsys, monkeypatch):
    monkeypatch.setenv("MODEL", "llama-debug")
    monkeypatch.setenv("MICRO_BATCH", "3")
    main(["--gpus-per-node", "4", "--gpu-memory", "0.001", "--json"])
    plan = json.loads(capsys.readouterr().out)
    assert plan["model"]["name"] == "llama-debug" and plan["micro_batch"] == 3 and plan["world_size"] == 4
    assert plan["recommendation"] is None  # 1 MiB GPUs


# -- FLOPs and MFU ----------------------------------------------------------------------------
def test_flops_per_token_is_6n_plus_the_attention_term():
    from train.flops import flops_per_token, param_counts

    cfg, shape = shape_of("MODEL=llama-debug")
    conf = load_model_config(cfg)
    h, inter, layers, vocab = conf.hidden_size, conf.intermediate_size, conf.num_hidden_layers, conf.vocab_size
    n_matmul = layers * (4 * h * h + 3 * h * inter) + h * vocab  # q,k,v,o + gate,up,down per layer, output head
    assert param_counts(conf)[0] == n_matmul
    assert flops_per_token(conf, 128) == 6 * n_matmul + 12 * layers * h * 128  # H x Q = h


@pytest.mark.parametrize("name, precision, peak", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989e12), ("NVIDIA H100 PCIe", "bf16", 756e12),
    ("NVIDIA H100 NVL", "bf16", 835e12), ("NVIDIA H200", "bf16", 989e12), ("NVIDIA A100-SXM4-80GB", "bf16", 312e12),
    ("NVIDIA A100 80GB PCIe", "fp16", 312e12), ("NVIDIA A100-SXM4-40GB", "no", 156e12), ("NVIDIA A10G", "bf16", 70e12),
    ("NVIDIA L4", "bf16", 121e12), ("NVIDIA L40S", "bf16", 362e12), ("NVIDIA GeForce RTX 4090", "bf16", 165.2e12),
    ("Tesla V100-SXM2-16GB", "bf16", None), ("Tesla V100-SXM2-16GB", "fp16", 125e12),
    ("NVIDIA H100 80GB HBM3", "fp8", None), ("cpu", "bf16", None), ("Some Future GPU", "bf16", None),
])
def test_peak_flops_table(name, precision, peak):
    from train.flops import peak_flops

    assert peak_flops(name, precision) == peak


def test_mfu_is_achieved_over_peak_and_none_without_a_peak():
    from train.flops import mfu

    assert mfu(1000.0, 6e9, 989e12) == pytest.approx(1000 * 6e9 / 989e12)
    assert mfu(1000.0, 6e9, None) is None
