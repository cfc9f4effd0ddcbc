"""What runs leave for other tools: a small pretrained model saved once, W&B offline runs."""

from __future__ import annotations

import json
import struct
from pathlib import Path

# -- a small pretrained model, saved once, loaded by path like any hub model ----------------


def save_tiny_pretrained(path: Path, **sizes) -> Path:
    """The llama-debug preset with the built-in tokenizer, written with save_pretrained: a
    "pretrained" model for fine-tuning tests without a download. ``sizes``: model.* size keys
    (hidden_size, num_layers, intermediate_size, num_heads) for a bigger one."""
    import torch

    from train.config import ModelConfig
    from train.worker.model import build_model, load_tokenizer

    cfg = ModelConfig(name="llama-debug", **sizes)
    tok = load_tokenizer(cfg)
    torch.manual_seed(0)
    build_model(cfg, len(tok)).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


# -- W&B offline runs ------------------------------------------------------------------------
_WANDB_BLOCK, _WANDB_HEADER = 32768, 7  # LevelDB-style log: 32 KiB blocks, 7-byte record headers


def wandb_records(run_file: Path) -> list:
    """The protobuf records of an offline run's ``run-*.wandb`` file.

    wandb >= 0.2x reads this file only in its Go core; the format is a LevelDB log (a 7-byte
    file header ":W&B" + magic + version, then records of crc32, length, type, data)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(run_file).read_bytes()
    assert data[:4] == b":W&B", f"{run_file} is not a W&B run file"
    pos, chunks, records = _WANDB_HEADER, b"", []
    while pos + _WANDB_HEADER <= len(data):
        if _WANDB_BLOCK - pos % _WANDB_BLOCK < _WANDB_HEADER:  # block tail padding
            pos += _WANDB_BLOCK - pos % _WANDB_BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + _WANDB_HEADER])
        if kind == 0:
            break
        chunks += data[pos + _WANDB_HEADER:pos + _WANDB_HEADER + length]
        pos += _WANDB_HEADER + length
        if kind in (1, 4):  # FULL or LAST
            rec = pb.Record()
            rec.ParseFromString(chunks)
            records.append(rec)
            chunks = b""
    return records


def wandb_run(run_dir: Path) -> tuple[dict, list[dict]]:
    """(config, history rows) of an offline W&B run directory."""
    (run_file,) = Path(run_dir).glob("run-*.wandb")
    config, history = {}, []
    for rec in wandb_records(run_file):
        kind = rec.WhichOneof("record_type")
        items = rec.run.config.update if kind == "run" else rec.config.update if kind == "config" else []
        config.update({i.key: json.loads(i.value_json) for i in items})
        if kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return config, history


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out
