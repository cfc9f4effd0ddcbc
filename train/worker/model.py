"""Model and tokenizer: a named preset built from a config (no download), or any causal LM
by hub id or local directory through `AutoModelForCausalLM`."""

from __future__ import annotations

import json
import os
from pathlib import Path

from train.config import ConfigError, ModelConfig, RunConfig
from train.corpus import TOKENIZER_DIR

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
    """HF_TOKEN from the environment or `.env` (load_config exports it), else `huggingface-cli login`'s."""
    if os.environ.get("HF_TOKEN"):
        return os.environ["HF_TOKEN"]
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # noqa: BLE001 - no token is a normal state
        return None


def preset_sizes(cfg: ModelConfig) -> dict:
    """The preset's LlamaConfig sizes with the model.* size overrides applied (checked)."""
    from train.config import SIZE_KEYS

    overrides = {k: getattr(cfg, k) for k in SIZE_KEYS if getattr(cfg, k)}
    if not is_preset(cfg.name):
        if overrides:
            key = next(iter(overrides))
            raise ConfigError(f"model.{key}={overrides[key]} resizes presets only ({', '.join(PRESETS)}); "
                              f"MODEL={cfg.name!r} brings its own config")
        return {}
    sizes = dict(PRESETS[cfg.name])
    for key, hf_key in (("hidden_size", "hidden_size"), ("num_layers", "num_hidden_layers"),
                        ("intermediate_size", "intermediate_size")):
        if key in overrides:
            sizes[hf_key] = overrides[key]
    if "num_heads" in overrides:
        sizes["num_attention_heads"] = sizes["num_key_value_heads"] = overrides["num_heads"]
    if sizes["hidden_size"] % sizes["num_attention_heads"]:
        raise ConfigError(f"model.hidden_size={sizes['hidden_size']} is not divisible by model.num_heads="
                          f"{sizes['num_attention_heads']}; choose a multiple")
    return sizes


def is_preset(name: str) -> bool:
    return name in PRESETS


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    source = cfg.tokenizer or (str(TOKENIZER_DIR) if is_preset(cfg.name) else cfg.name)
    try:
        tok = AutoTokenizer.from_pretrained(source, token=hf_token(), trust_remote_code=cfg.trust_remote_code)
    except Exception as e:  # noqa: BLE001 - any loader failure is a user-facing config problem
        raise ConfigError(hub_error("tokenizer", source, e) + "; use a local directory or a hub id you can reach "
                          "(TOKENIZER empty = the model's own)") from None
    if tok.eos_token_id is None:
        raise ConfigError(f"tokenizer {source!r} has no EOS token; packing needs one to separate documents")
    return tok


def model_config(cfg: ModelConfig, vocab_size: int | None = None):
    """The transformers config for the model, without loading weights (also used by the planner)."""
    from transformers import AutoConfig, LlamaConfig

    if is_preset(cfg.name):
        # Round the vocabulary up to a multiple of 64 (tensor-core friendly; FSDP shards evenly).
        vocab = -(-(vocab_size or 640) // 64) * 64
        # BOS/EOS are the tokenizer's (LlamaConfig's own 1/2 would make `generate` run past the EOS
        # that ends a chat reply); pad stays unset: it would change the embedding's init.
        tok = load_tokenizer(cfg)
        return LlamaConfig(vocab_size=vocab, max_position_embeddings=2048, tie_word_embeddings=False,
                           attention_dropout=0.0, rms_norm_eps=1e-5, bos_token_id=tok.bos_token_id,
                           eos_token_id=tok.eos_token_id, **preset_sizes(cfg))
    preset_sizes(cfg)  # refuses size overrides for a non-preset
    try:
        return AutoConfig.from_pretrained(cfg.name, token=hf_token(), trust_remote_code=cfg.trust_remote_code)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(hub_error("model", cfg.name, e) + f"; use a preset ({', '.join(PRESETS)}), a local "
                          "directory with config.json, or a hub id (needs network or a filled HF cache)") from None


def hub_error(what: str, name: str, e: BaseException) -> str:
    """One line for a failed hub load, saying what can be said offline about access (HF_TOKEN)."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if isinstance(e, GatedRepoError) or isinstance(e.__cause__, GatedRepoError):
        return (f"{what} {name!r} is gated: " + ("HF_TOKEN's account has not been granted access; request it on "
                "the model's hub page" if hf_token() else "set HF_TOKEN (environment or .env) to a token of an "
                "account that has accepted its license"))
    if _meant_as_path(name) and not Path(name).expanduser().exists():
        return f"{what} directory {name!r} not found"
    msg = f"{what} {name!r} cannot be loaded ({type(e).__name__}: {_first_line(e)})"
    if Path(name).is_dir():
        return msg
    if isinstance(e, RepositoryNotFoundError) or isinstance(e.__cause__, RepositoryNotFoundError):
        msg = f"{what} {name!r} is not on the hub, or is private"
    if not hf_token():
        msg += "; HF_TOKEN is not set (needed for gated and private repos)"
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        msg += "; HF_HUB_OFFLINE is set, so only the local cache (HF_HOME) is searched"
    return msg


def check_model_source(cfg: ModelConfig):
    """Fail before any process starts if the model or its tokenizer cannot be resolved, or do not
    fit each other. Returns the tokenizer (the data check tokenizes a sample with it)."""
    for what, name in (("model", cfg.name), ("tokenizer", cfg.tokenizer)):
        if name and _meant_as_path(name) and not Path(name).expanduser().exists():  # before the hub's retries
            raise ConfigError(f"{what} directory {name!r} not found (a local path; a hub id looks like org/name)")
    if not is_preset(cfg.name) and not Path(cfg.name).is_dir() and "/" not in cfg.name and not _looks_like_hub_id(cfg.name):
        raise ConfigError(f"model {cfg.name!r} is not a preset ({', '.join(PRESETS)}), a local directory, or a hub id")
    conf = model_config(cfg)
    if not (is_preset(cfg.name) and cfg.attn_implementation == "sdpa"):  # a preset with sdpa is known to build
        _check_buildable(cfg, conf)
    tok = load_tokenizer(cfg)
    vocab = getattr(conf, "vocab_size", None)
    # Presets size their vocabulary from the tokenizer. A pretrained model's embedding rows mean
    # its own tokenizer's ids: another tokenizer with more ids would index rows that do not exist
    # (build_model would silently add random ones).
    if cfg.tokenizer and not is_preset(cfg.name) and vocab and len(tok) > vocab:
        raise ConfigError(f"TOKENIZER={cfg.tokenizer!r} has {len(tok)} tokens but model {cfg.name!r} has a vocabulary of "
                          f"{vocab}; use the model's own tokenizer (leave TOKENIZER empty) or one made for it")
    return tok


def _check_buildable(cfg: ModelConfig, conf) -> None:
    """Build the model on the meta device (no memory, no weights): catches an attn_implementation
    that does not exist or is not installed, or an architecture with no causal-LM class."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            AutoModelForCausalLM.from_config(conf, attn_implementation=cfg.attn_implementation,
                                             trust_remote_code=cfg.trust_remote_code)
    except Exception as e:  # noqa: BLE001 - whatever transformers refuses, the user must change
        raise ConfigError(f"model {cfg.name!r} cannot be built with model.attn_implementation="
                          f"{cfg.attn_implementation!r} ({type(e).__name__}: {_first_line(e)})") from None


def _meant_as_path(name: str) -> bool:
    """A name no hub id can be: absolute, relative to here or home, more than org/name deep, or
    under a directory that exists here. Without this, a typo in a local path is sent to the hub
    (a minute of retries offline, then "Repo id must be in the form ...")."""
    parts = name.split("/")
    return name.startswith(("/", "./", "../", "~")) or len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).is_dir())


def _looks_like_hub_id(name: str) -> bool:
    return bool(name) and all(c.isalnum() or c in "-_." for c in name)


def build_model(cfg: ModelConfig, vocab_size: int, without_weights: bool = False):
    """Build (preset) or load (hub/local) the model in fp32; accelerate handles precision.

    ``without_weights``: the architecture with uninitialised parameters and nothing read, for a
    rank that receives its weights from rank 0 (FSDP2: ``loads_on_rank0_only``). Built on the meta
    device, then given CPU memory that is never written here, so the kernel backs none of it until
    the broadcast shard replaces it. Not left on meta: accelerate maps the optimizer's parameters
    to the sharded ones by data pointer, and every meta tensor's is 0. Buffers keep the values
    they were built with: non-persistent ones (rotary frequencies) are never broadcast."""
    import torch
    from transformers import AutoModelForCausalLM

    conf = model_config(cfg, vocab_size)
    if without_weights:
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(conf, attn_implementation=cfg.attn_implementation,
                                                     dtype=torch.float32, trust_remote_code=cfg.trust_remote_code)
        buffers = dict(model.named_buffers())
        model.to_empty(device="cpu")
        for name, value in buffers.items():
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner)._buffers[leaf] = value
        if getattr(model.config, "tie_word_embeddings", False):
            model.tie_weights()  # to_empty gave each tied parameter its own tensor
    elif is_preset(cfg.name):
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


def load_model_config(cfg: RunConfig):
    """The transformers config for the run's model: a ``config.json`` file, a preset (with the
    built-in tokenizer's vocabulary, as training uses), a local directory or a hub id."""
    from train.worker.model import is_preset, load_tokenizer, model_config

    name = cfg.model.name
    path = Path(name)
    if path.is_file():
        from transformers import AutoConfig

        try:
            raw = json.loads(path.read_text())
            return AutoConfig.for_model(raw.pop("model_type"), **raw)
        except (ValueError, KeyError) as e:
            raise ConfigError(f"model config {name!r} is not a transformers config.json ({type(e).__name__}: {e})") from None
    vocab = len(load_tokenizer(cfg.model)) if is_preset(name) else None
    return model_config(cfg.model, vocab)
