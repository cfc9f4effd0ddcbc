"""Memory planner: per-GPU bytes of every strategy for a model, and the cheapest that fits.

    python -m train plan [--gpus-per-node 8] [--nodes 1] [--gpu-memory 80] [--json] [KEY=value ...]
    make plan MODEL=meta-llama/Llama-3.1-8B GPUS_PER_NODE=8 NODES=2 GPU_MEMORY=80 PRECISION=bf16

The model comes from the run config (MODEL, CONFIG, SEQ_LEN, MICRO_BATCH, PRECISION, ...
exactly as for training): a preset, a local directory or ``config.json``, or a hub id (only
its config is fetched, never weights). Parameters are counted on a meta-device model.

What a rank holds (P parameters, N ranks, Adam), the ZeRO paper's accounting:

    bytes/param        params  grads  Adam moments  fp32 master  sharded over N
    ddp                  4       4        8             -        nothing
    zero1                4       4        8            (4)       moments, master
    zero2                4       4        8            (4)       grads, moments, master
    zero3 / fsdp         4       4        8            (4)       everything
    ... with PRECISION=bf16/fp16: DeepSpeed holds 2-byte params and grads plus an fp32
    master copy (2 + 2 + 12); DDP and FSDP keep fp32 parameters and autocast (4 + 4 + 8).

DeepSpeed always keeps its own fp32 master partition (``master``), even in fp32 training;
DDP/FSDP step on the parameters themselves. The ``parameters``/``gradients``/``optimizer``
columns are what train/worker/loop.py measures per rank as ``held_bytes`` (optimizer = Adam
moments), and ``make bench`` compares them with measured runs. Offload strategies hold the
same bytes in CPU RAM instead (column ``offloaded``) and only working buffers on the GPU.

``buffers`` are working memory that is not state: for DDP only autocast's 16-bit weight copies
(its gradients are views into the all-reduce buckets: ``gradient_as_bucket_view``, set in
train/worker/accelerator.py), DeepSpeed's reduce bucket (hidden² elements, set in
train/worker/accelerator.py), and for ZeRO-3/FSDP the gathered full weights of the live layers (FSDP2
also keeps the root module - embeddings, head - gathered).

Activations are an estimate for the sequence length and micro-batch (Korthikanti et al.
2022 style, counted for a Llama block with SDPA attention and checked against the tensors
autograd saves on CPU): per token per decoder layer

    e · (7·h + 2·kv·d + 4·I)  +  16·h (16-bit only)        bytes
      7h + 2kv·d: both norms' outputs, q, k, v, attention output, o_proj input, ...
      4I: MLP gate, up, silu(gate), their product; + H·T with eager attention (softmax)
      16h: in 16-bit the RMSNorms still keep fp32 internals (and autocast an fp32 residual)

with e = 4 bytes in fp32 and 2 in bf16/fp16, plus V·(8 or 10) bytes per token around the
loss (logits, their fp32 copy, log-softmax output) and the embedding/final-norm outputs.
With activation checkpointing (one checkpoint per decoder layer) each layer keeps only its
input (h) and one layer at a time is recomputed. DDP with 16-bit autocast also caches a
16-bit copy of every matmul weight during the step (2·N bytes, counted in ``buffers``).

Fits = total <= usable = 0.9 x GPU memory - 1 GiB (CUDA context, NCCL buffers, allocator
fragmentation). The recommendation is the first that fits in this order of cost: no
recomputation before recomputation (activation checkpointing adds a forward pass, ~33% more
FLOPs, that never overlaps), and within each, ddp < zero1 < zero2 < fsdp < zero3 (more
communication, though it mostly overlaps), with CPU offload last (PCIe-bound)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass

from train.config import ConfigError, RunConfig, load_config
from train.config.strategies import GRADS, OPTIM, PARAMS, STRATEGIES
from train.memory import (
    GiB,
    ModelShape,
    activation_bytes,
    buffer_bytes,
    held_bytes,
    human,
    model_shape,
)
from train.worker.model import load_model_config

RESERVED_FRACTION, RESERVED_BYTES = 0.10, 1 * GiB
COST_ORDER = ("ddp", "zero1", "zero2", "fsdp", "zero3", "fsdp-offload", "zero3-offload")
DEFAULT_GPUS_PER_NODE, DEFAULT_GPU_MEMORY_GIB = 8, 80.0


@dataclass
class Row:
    strategy: str
    parameters: int  # per rank, wherever it lives (the ZeRO formulas; what held_bytes measures)
    gradients: int
    optimizer: int  # Adam moments
    master: int  # DeepSpeed's separate fp32 master copy
    offloaded: int  # of the above, bytes in CPU RAM (offload strategies)
    buffers: int  # on the GPU, not state
    activations: int
    activations_ckpt: int
    gpu: int  # state on the GPU + buffers (no activations)
    total: int  # gpu + activations
    total_ckpt: int  # gpu + activations with activation checkpointing
    fits: bool
    fits_ckpt: bool


@dataclass
class Plan:
    model: ModelShape
    precision: str
    seq_len: int
    micro_batch: int
    attn_implementation: str
    gpus_per_node: int
    nodes: int
    world_size: int
    gpu_memory: int
    usable: int
    rows: list[Row]
    recommendation: dict | None  # {"strategy", "activation_checkpointing", "total"} or None

    def to_dict(self) -> dict:
        return asdict(self)


def _reduce_bucket(cfg: RunConfig, shape: ModelShape, world: int) -> int:
    from train.worker.accelerator import deepspeed_config

    ds = deepspeed_config(STRATEGIES["zero2"], cfg, 1, world, shape.hidden, "cuda")
    return int(ds["zero_optimization"]["reduce_bucket_size"])


def make_plan(cfg: RunConfig, shape: ModelShape, gpus_per_node: int, nodes: int, gpu_memory: int) -> Plan:
    world = gpus_per_node * nodes
    precision, seq, mb = cfg.train.precision, cfg.data.seq_len, cfg.train.micro_batch
    usable = max(0, int(gpu_memory * (1 - RESERVED_FRACTION) - RESERVED_BYTES))
    bucket = _reduce_bucket(cfg, shape, world)
    act = activation_bytes(shape, precision, seq, mb, False, cfg.model.attn_implementation)
    act_ckpt = activation_bytes(shape, precision, seq, mb, True, cfg.model.attn_implementation)
    rows = []
    for name in COST_ORDER:
        s = STRATEGIES[name]
        held = held_bytes(s, shape.params, world, precision)
        state = sum(held.values())
        offloaded = state if s.offload else 0
        buffers = buffer_bytes(s, shape, precision, bucket)
        gpu = state - offloaded + buffers
        rows.append(Row(name, held[PARAMS], held[GRADS], held[OPTIM], held["master"], offloaded, buffers,
                        act, act_ckpt, gpu, gpu + act, gpu + act_ckpt, gpu + act <= usable, gpu + act_ckpt <= usable))
    return Plan(shape, precision, seq, mb, cfg.model.attn_implementation, gpus_per_node, nodes, world, gpu_memory,
                usable, rows, recommend(rows))


def recommend(rows: list[Row]) -> dict | None:
    """The cheapest (strategy, activation checkpointing) that fits, in the documented cost order."""
    by_name = {r.strategy: r for r in rows}
    on_gpu = [n for n in COST_ORDER if n in by_name and not STRATEGIES[n].offload]
    offload = [n for n in COST_ORDER if n in by_name and STRATEGIES[n].offload]
    for names in (on_gpu, offload):
        for ckpt in (False, True):
            for n in names:
                r = by_name[n]
                if (r.fits_ckpt if ckpt else r.fits):
                    return {"strategy": n, "activation_checkpointing": ckpt,
                            "total": r.total_ckpt if ckpt else r.total}
    return None


def format_plan(plan: Plan) -> str:
    m = plan.model
    lines = [
        f"Memory plan for {m.name} ({m.model_type}): {m.params / 1e6:.4g}M parameters, {m.layers} layers, "
        f"hidden {m.hidden}, {m.heads} heads ({m.kv_heads} kv), vocab {m.vocab}",
        f"{plan.world_size} GPU(s) = {plan.nodes} node(s) x {plan.gpus_per_node}, {human(plan.gpu_memory)} each "
        f"({human(plan.usable)} usable); precision {plan.precision}, micro_batch {plan.micro_batch} x seq_len "
        f"{plan.seq_len}, attention {plan.attn_implementation}",
        "",
        "Per GPU. state = what each rank holds (Adam moments in optim, DeepSpeed's fp32 copy in master);",
        "offload strategies keep it in CPU RAM. act = activations, +ckpt = with activation checkpointing.",
        "",
    ]
    head = ("strategy", "params", "grads", "optim", "master", "CPU offload", "buffers", "act", "act+ckpt",
            "total", "total+ckpt", "fits")
    table = [head]
    for r in plan.rows:
        fits = "yes" if r.fits else ("with ckpt" if r.fits_ckpt else "no")
        table.append((r.strategy, human(r.parameters), human(r.gradients), human(r.optimizer),
                      human(r.master) if r.master else "-", human(r.offloaded) if r.offloaded else "-",
                      human(r.buffers), human(r.activations), human(r.activations_ckpt), human(r.total),
                      human(r.total_ckpt), fits))
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    lines.append("")
    rec = plan.recommendation
    if rec is None:
        best = min(plan.rows, key=lambda r: r.total_ckpt)
        lines.append(f"Nothing fits: the smallest is {best.strategy} with activation checkpointing at "
                     f"{human(best.total_ckpt)} per GPU (usable {human(plan.usable)}). Use more GPUs, a smaller "
                     "MICRO_BATCH or SEQ_LEN (raise GRAD_ACCUM to keep the batch)"
                     + (", or PRECISION=bf16." if plan.precision == "no" else "."))
    else:
        ckpt = " with model.activation_checkpointing=true" if rec["activation_checkpointing"] else ""
        lines.append(f"Recommended: STRATEGY={rec['strategy']}{ckpt}: {human(rec['total'])} of {human(plan.usable)} "
                     "usable per GPU.")
        row = next(r for r in plan.rows if r.strategy == rec["strategy"])
        if row.offloaded:
            lines.append(f"  It needs {human(row.offloaded * plan.gpus_per_node)} of CPU RAM per node for offloaded state.")
    return "\n".join(lines)


def _default_gpus() -> tuple[int, float, str]:
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return torch.cuda.device_count(), props.total_memory / GiB, f"this node's {props.name}"
    except Exception:  # noqa: BLE001 - a broken CUDA install just means "use the defaults"
        pass
    return DEFAULT_GPUS_PER_NODE, DEFAULT_GPU_MEMORY_GIB, "default"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m train plan", description=__doc__.split("\n\n")[0],
                                     epilog="Other arguments are run-config overrides: MODEL=... SEQ_LEN=... "
                                            "MICRO_BATCH=... PRECISION=bf16 model.attn_implementation=eager")
    parser.add_argument("--gpus-per-node", type=int, default=None, help="GPUs per node (default: visible GPUs, else 8)")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpu-memory", type=float, default=None, help="GiB per GPU (default: this GPU's, else 80)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args, rest = parser.parse_known_args(argv)
    cfg = load_config(rest)
    gpus, mem, source = _default_gpus()
    gpus = args.gpus_per_node or gpus
    mem = args.gpu_memory or mem
    if gpus < 1 or args.nodes < 1 or mem <= 0:
        raise ConfigError("--gpus-per-node and --nodes must be >= 1 and --gpu-memory (GiB) > 0")
    conf = load_model_config(cfg)
    shape = model_shape(conf, cfg.model.name, cfg.model.trust_remote_code)
    plan = make_plan(cfg, shape, gpus, args.nodes, int(mem * GiB))
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        if args.gpus_per_node is None or args.gpu_memory is None:
            print(f"(GPU count/memory not given: using {source} values; set --gpus-per-node, --gpu-memory)")
        print(format_plan(plan))
    sys.stdout.flush()
