"""(split from train/tools/plan.py)"""

from __future__ import annotations

from dataclasses import dataclass

from train.config import ConfigError
from train.config.strategies import GRADS, OPTIM, PARAMS, STRATEGIES, Strategy

GiB = 2**30


@dataclass
class ModelShape:
    name: str
    model_type: str
    params: int  # P, every parameter tensor once
    matmul_params: int
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    layer_params: int  # one decoder layer
    root_params: int  # everything outside the decoder layers (embeddings, head, final norm)


# -- the model -------------------------------------------------------------------------------
def model_shape(conf, name: str, trust_remote_code: bool = False) -> ModelShape:
    from train.flops import param_counts

    for attr in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if getattr(conf, attr, None) is None:
            raise ConfigError(f"model {name!r}: its config has no {attr}; the planner handles decoder-only "
                              "transformers configs (Llama, Mistral, Qwen, Gemma, GPT-NeoX, ...)")
    matmul, total = param_counts(conf, trust_remote_code)
    h, layers, heads = conf.hidden_size, conf.num_hidden_layers, conf.num_attention_heads
    kv = getattr(conf, "num_key_value_heads", None) or heads
    d = getattr(conf, "head_dim", None) or h // heads
    inter = getattr(conf, "intermediate_size", None) or 4 * h
    vocab = conf.vocab_size
    tied = bool(getattr(conf, "tie_word_embeddings", False))
    root = vocab * h * (1 if tied else 2) + h  # embeddings (+ untied head) + final norm
    layer = max(0, (total - root) // layers)
    return ModelShape(name, conf.model_type, total, matmul, layers, h, heads, kv, d, inter, vocab, layer,
                      total - layer * layers)


# -- bytes ---------------------------------------------------------------------------------
def _bytes_per_param(strategy: Strategy, precision: str) -> tuple[int, int, int, int]:
    """(params, grads, Adam moments, separate fp32 master) bytes per parameter, unsharded."""
    half = precision in ("bf16", "fp16")
    if strategy.family == "deepspeed":
        return (2, 2, 8, 4) if half else (4, 4, 8, 4)
    return 4, 4, 8, 0  # DDP / FSDP: fp32 parameters, autocast for 16-bit compute


def held_bytes(strategy: str | Strategy, params: int, world_size: int, precision: str = "no") -> dict[str, int]:
    """Bytes one rank holds (on GPU or offloaded): the ZeRO paper's formulas for this strategy.

    Keys: parameters, gradients, optimizer (Adam moments), master (DeepSpeed's fp32 copy).
    ZeRO-1's gradients are counted in full: that is what it holds through the backward pass.
    """
    s = STRATEGIES[strategy] if isinstance(strategy, str) else strategy
    p, g, m, master = _bytes_per_param(s, precision)
    n = max(1, world_size)

    def share(b: int, cat: str) -> int:
        return -(-params * b // n) if cat in s.shards else params * b

    return {PARAMS: share(p, PARAMS), GRADS: share(g, GRADS), OPTIM: share(m, OPTIM), "master": share(master, OPTIM)}


def buffer_bytes(strategy: Strategy, shape: ModelShape, precision: str, reduce_bucket: int) -> int:
    """Working memory on the GPU that is not training state (see the module docstring)."""
    half = precision in ("bf16", "fp16")
    compute = 2 if half else 4  # dtype weights are gathered in
    _, g, _, _ = _bytes_per_param(strategy, precision)
    if strategy.family == "ddp":  # autocast's weight cache (the gradient buckets are the gradients)
        return shape.matmul_params * 2 if half else 0
    if strategy.family == "deepspeed" and strategy.zero_stage in (1, 2):
        return reduce_bucket * g
    biggest = max(shape.layer_params, shape.vocab * shape.hidden)
    if strategy.family == "deepspeed":  # ZeRO-3: the module being run and the prefetched one
        return 2 * biggest * compute + reduce_bucket * g
    # FSDP2: root (embeddings, head) stays gathered for the step, plus current and prefetched
    # layer, plus one layer's unsharded gradients before the reduce-scatter (all in param_dtype).
    return (shape.root_params + 3 * shape.layer_params) * compute


def activation_bytes(shape: ModelShape, precision: str, seq_len: int, micro_batch: int,
                     checkpointing: bool, attn_implementation: str = "sdpa") -> int:
    """Estimated activation memory of one micro-batch (see the module docstring)."""
    half = precision in ("bf16", "fp16")
    b = 2 if half else 4
    h, kv, d, inter = shape.hidden, shape.kv_heads, shape.head_dim, shape.intermediate
    per_layer = 7 * h + 2 * kv * d + 4 * inter
    if attn_implementation == "eager":
        per_layer += shape.heads * seq_len  # softmax probabilities, T per head per token
    layer = per_layer * b + (16 * h if half else 0)
    outside = 3 * h * b + shape.vocab * (10 if half else 8)  # embedding, final norm, logits and loss
    if checkpointing:
        per_token = shape.layers * h * b + layer + outside
    else:
        per_token = shape.layers * layer + outside
    return int(per_token * seq_len * micro_batch)


# -- output --------------------------------------------------------------------------------
def human(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}" if n / size < 100 else f"{n / size:.0f} {unit}"
    return f"{int(n)} B"
