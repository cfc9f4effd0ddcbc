"""(split from train/checkpoint/saver.py)"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

from train.checkpoint import provenance as prov_mod
from train.checkpoint.layout import TMP_PREFIX
from train.worker import lora
from train.worker.accelerator import wait_for_export
from train.worker.model import param_count


def export_final(accelerator, model, tokenizer, out_dir: Path, config_yaml: str, merge_lora: bool = True,
                 provenance: dict | None = None) -> Path | None:
    """Consolidated safetensors + config + tokenizer that `from_pretrained` loads.

    ``get_state_dict`` gathers ZeRO-3 partitions / FSDP shards (a collective: every rank calls
    it). The export is written beside and renamed into place, so an old export survives a crash.
    A LoRA run writes its adapter to ``adapter/`` (PeftModel.from_pretrained) and, with
    ``merge_lora``, the merged full model beside it. ``provenance`` (what produced it,
    train/checkpoint/provenance.py) goes to ``provenance.json``.
    """
    state_dict = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        wait_for_export(accelerator)
        return None
    tmp = out_dir.with_name(f"{TMP_PREFIX}{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    unwrapped = accelerator.unwrap_model(model)
    if lora.is_peft(unwrapped):
        lora.save_adapter(unwrapped, state_dict, tmp)
        tokenizer.save_pretrained(tmp / lora.ADAPTER_DIR)
        unwrapped = lora.merged_model(unwrapped, state_dict, accelerator.state.deepspeed_plugin) if merge_lora else None
        state_dict = None
    if unwrapped is not None:
        unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "run_config.yaml").write_text(config_yaml)
    if provenance:
        (tmp / prov_mod.FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    expected = param_count(unwrapped) if unwrapped is not None else 0
    saved = _safetensors_numel(tmp)
    if saved < expected:  # e.g. ZeRO-3 weights saved without gathering (LlamaFactory#253)
        raise RuntimeError(f"export holds {saved} parameters, the model has {expected}: weights were not gathered")
    old = out_dir.with_name(f"{TMP_PREFIX}old-{out_dir.name}")
    if out_dir.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    wait_for_export(accelerator)
    return out_dir


def _safetensors_numel(path: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            total += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    return total
