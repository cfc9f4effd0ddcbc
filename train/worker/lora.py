"""LoRA fine-tuning through PEFT: wrap the built model, check targets early, export adapter + merge.

PEFT does the work (LoraConfig, get_peft_model, save_pretrained, merge_and_unload); this module
only turns the run config into its calls. The wrap happens after the model is built and before
``accelerate.prepare``, so DDP, ZeRO (which partitions the new adapter weights at initialize)
and FSDP2 (which shards frozen and trainable parameters alike) all see the wrapped model, and
the optimizer is built from ``requires_grad`` parameters: the adapters alone.
"""

from __future__ import annotations

from pathlib import Path

from train.config import ConfigError, ModelConfig

ADAPTER_DIR = "adapter"  # OUTPUT_DIR/final/adapter: a subfolder, so `AutoModelForCausalLM.from_pretrained(final)`
# loads the merged model instead of following adapter_config.json back to the base model


def enabled(cfg: ModelConfig) -> bool:
    return cfg.lora_r > 0


def lora_config(cfg: ModelConfig, model_type: str):
    """PEFT's LoraConfig for this run. Empty target modules = PEFT's default for the architecture."""
    from peft import LoraConfig
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    targets = [t.strip() for t in cfg.lora_target_modules.split(",") if t.strip()]
    if not targets:
        if model_type not in DEFAULTS:
            raise ConfigError(f"model.lora_target_modules is empty and PEFT has no default for model type "
                              f"{model_type!r}; name the modules (e.g. q_proj,v_proj) or use all-linear")
        targets = list(DEFAULTS[model_type])
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules="all-linear" if targets == ["all-linear"] else targets,
                      task_type="CAUSAL_LM")


def apply_lora(model, cfg: ModelConfig):
    """Freeze the model and add LoRA adapters (PEFT); a target the model lacks is a ConfigError."""
    from peft import get_peft_model

    conf = lora_config(cfg, model.config.model_type)
    names = cfg.lora_target_modules or ",".join(sorted(conf.target_modules))
    leaves = ", ".join(sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and not list(m.children())}))
    try:
        wrapped = get_peft_model(model, conf)
    except ValueError as e:  # PEFT: "Target modules {...} not found in the base model..."
        raise ConfigError(f"model.lora_target_modules={names!r}: {_first_line(e)} Its modules: {leaves}") from None
    if isinstance(conf.target_modules, (set, list)):
        # PEFT only refuses when no target matches; a misspelled one among good ones is an error too.
        hit = wrapped.targeted_module_names
        missing = [t for t in sorted(conf.target_modules) if not any(n == t or n.endswith("." + t) for n in hit)]
        if missing:
            raise ConfigError(f"model.lora_target_modules={names!r}: the model has no module named "
                              f"{', '.join(missing)}; its modules: {leaves}")
    return wrapped


def check_lora(cfg: ModelConfig) -> None:
    """Launcher check: wrap the model built on the meta device (no memory, no weights read)."""
    if cfg.lora_r < 0:
        raise ConfigError(f"model.lora_r={cfg.lora_r} must be >= 0 (0 = no LoRA)")
    if not enabled(cfg):
        return
    if not 0 <= cfg.lora_dropout < 1:
        raise ConfigError(f"model.lora_dropout={cfg.lora_dropout} must be in [0, 1)")
    import torch
    from transformers import AutoModelForCausalLM

    from train.worker.model import model_config

    model_conf = model_config(cfg)

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_conf, trust_remote_code=cfg.trust_remote_code)
    apply_lora(model, cfg)


def trainable_count(model) -> int:
    """Trainable parameters at full size, also under ZeRO-3 (ds_numel)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)


def is_peft(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def save_adapter(peft_model, state_dict: dict, out_dir: Path) -> None:
    """adapter_model.safetensors + adapter_config.json (PEFT picks the adapter keys from the gathered state)."""
    peft_model.save_pretrained(out_dir / ADAPTER_DIR, state_dict=state_dict, safe_serialization=True)


def merged_model(peft_model, state_dict: dict, deepspeed_plugin=None):
    """A plain CPU model with the adapters folded in (PEFT's merge_and_unload), from the gathered
    full state dict: the live model may be sharded, so a fresh copy is built on this rank alone."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.integrations import unset_hf_deepspeed_config

    base_conf = peft_model.get_base_model().config
    # Under ZeRO-3 transformers builds every model inside zero.Init, whose partitioning is a
    # collective: this rank-local copy would wait for the other ranks forever. accelerate's
    # zero3_init_context_manager(enable=False) leaves transformers' ZeRO-3 flag set, so unset
    # it here and let the plugin set it again.
    unset_hf_deepspeed_config()
    try:
        base = AutoModelForCausalLM.from_config(base_conf, dtype=torch.float32)
        copy = get_peft_model(base, peft_model.peft_config["default"])
    finally:
        if deepspeed_plugin is not None:
            deepspeed_plugin.set_deepspeed_weakref()
    copy.load_state_dict({k: v.to(torch.float32) for k, v in state_dict.items()}, strict=True)
    return copy.merge_and_unload()


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]
