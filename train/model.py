"""Model and tokenizer: a named preset built from a config (no download), or any causal LM
by hub id or local directory through `AutoModelForCausalLM`."""

from __future__ import annotations

import os
from pathlib import Path

from .config import ConfigError, ModelConfig
from .corpus import TOKENIZER_DIR

# Llama-style presets built from a config: nothing is downloaded. "llama-tiny" (~5M
# parameters) is the default run; "llama-debug" (~0.2M) keeps multi-process tests fast.
PRESETS: dict[str, dict] = {
    "llama-debug": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=4),
    "llama-tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=6, num_attention_heads=4,
                       num_key_value_heads=4),
    "llama-20m": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=6,
                      num_key_value_heads=6),
}


def hf_token() -> str | None:
    return os.environ.get("HF_TOKEN") or None


def is_preset(name: str) -> bool:
    return name in PRESETS


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    source = cfg.tokenizer or (str(TOKENIZER_DIR) if is_preset(cfg.name) else cfg.name)
    try:
        tok = AutoTokenizer.from_pretrained(source, token=hf_token(), trust_remote_code=cfg.trust_remote_code)
    except Exception as e:  # noqa: BLE001 - any loader failure is a user-facing config problem
        raise ConfigError(f"tokenizer {source!r} cannot be loaded ({type(e).__name__}: {_first_line(e)}); "
                          f"use a local directory, a hub id you can reach, or a preset: {', '.join(PRESETS)}") from None
    if tok.eos_token_id is None:
        raise ConfigError(f"tokenizer {source!r} has no EOS token; packing needs one to separate documents")
    return tok


def model_config(cfg: ModelConfig, vocab_size: int | None = None):
    """The transformers config for the model, without loading weights (also used by the planner)."""
    from transformers import AutoConfig, LlamaConfig

    if is_preset(cfg.name):
        # Round the vocabulary up to a multiple of 64 (tensor-core friendly; FSDP shards evenly).
        vocab = -(-(vocab_size or 640) // 64) * 64
        return LlamaConfig(vocab_size=vocab, max_position_embeddings=2048, tie_word_embeddings=False,
                           attention_dropout=0.0, rms_norm_eps=1e-5, **PRESETS[cfg.name])
    try:
        return AutoConfig.from_pretrained(cfg.name, token=hf_token(), trust_remote_code=cfg.trust_remote_code)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"model {cfg.name!r} cannot be loaded ({type(e).__name__}: {_first_line(e)}); "
                          f"use a preset ({', '.join(PRESETS)}), a local directory with config.json, "
                          "or a hub id (needs network or a filled HF cache)") from None


def check_model_source(cfg: ModelConfig) -> None:
    """Fail before any process starts if the model cannot be resolved (e.g. offline hub id)."""
    if not is_preset(cfg.name) and not Path(cfg.name).is_dir() and "/" not in cfg.name and not _looks_like_hub_id(cfg.name):
        raise ConfigError(f"model {cfg.name!r} is not a preset ({', '.join(PRESETS)}), a local directory, or a hub id")
    model_config(cfg)


def _looks_like_hub_id(name: str) -> bool:
    return bool(name) and all(c.isalnum() or c in "-_." for c in name)


def build_model(cfg: ModelConfig, vocab_size: int):
    """Build (preset) or load (hub/local) the model in fp32; accelerate handles precision."""
    import torch
    from transformers import AutoModelForCausalLM

    conf = model_config(cfg, vocab_size)
    if is_preset(cfg.name):
        model = AutoModelForCausalLM.from_config(conf, attn_implementation=cfg.attn_implementation,
                                                 dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            cfg.name, config=conf, token=hf_token(), trust_remote_code=cfg.trust_remote_code,
            attn_implementation=cfg.attn_implementation, dtype=torch.float32)
    if model.config.vocab_size < vocab_size:
        model.resize_token_embeddings(vocab_size)
    if cfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


def param_count(model) -> int:
    """Full-size parameter count, also for ZeRO-3 (whose partitioned params keep it in ds_numel)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]
