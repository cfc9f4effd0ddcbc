"""``python -m train export CKPT OUT`` and ``python -m train convert CKPT OUT --to STRATEGY``.

Both read any checkpoint (ddp, fsdp, deepspeed ZeRO 1/2/3, or an already converted one)
tensor by tensor through train/checkpoint/portable.py and write bounded safetensors shards, so peak
memory is about one shard plus one tensor, not the model.

export: a Hugging Face model folder (safetensors shards + index, config, tokenizer,
run_config.yaml) that ``AutoModelForCausalLM.from_pretrained`` loads; the fp32 master weights.

convert: a checkpoint folder that resumes under STRATEGY: manifest + run_config.yaml + the
portable form. The portable form loads under any world size; ``--world-size`` is recorded as
the intended one. Writing the target's native layout would need the target's process group
(N ranks), which an offline tool cannot assume; the resume sets the tensors into whatever
the run prepared instead, without reading the source's shards again.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from train.checkpoint.layout import MANIFEST, check_files, read_manifest
from train.checkpoint.provenance import FILE as PROVENANCE_FILE
from train.checkpoint.portable import (
    PORTABLE,
    SHARD_BYTES,
    TMP,
    ShardWriter,
    iter_weights,
    open_source,
    run_config,
    skeleton,
    write_portable,
)
from train.config import ConfigError
from train.config.strategies import STRATEGIES
from train.storage import RemotePath, location


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (like every config error), not argparse's usage block
        raise ConfigError(f"{self.prog}: {message}")


def _checked(path: str) -> tuple[Path, dict]:
    """A complete checkpoint as a local directory: one at an object store URL is downloaded first."""
    ckpt = location(path)
    if not (ckpt / MANIFEST).is_file():
        raise ConfigError(f"{str(ckpt)!r} is not a complete checkpoint (no {MANIFEST})")
    manifest = read_manifest(ckpt)
    check_files(manifest, ckpt)
    if isinstance(ckpt, RemotePath):
        from train.checkpoint.remote import fetch_checkpoint

        ckpt = fetch_checkpoint(ckpt)
    return ckpt, manifest


def _local_out(out: str) -> Path:
    """Where the tool writes: OUTPUT itself, or for a URL a scratch directory published after."""
    if not isinstance(location(out), RemotePath):
        return Path(out)
    from train.checkpoint.remote import scratch_dir

    return scratch_dir("out-") / location(out).name


def _replace(tmp: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def export(ckpt: Path, out: Path, max_shard_bytes: int = SHARD_BYTES) -> Path:
    cfg = run_config(ckpt)
    model, _, tok = skeleton(cfg)
    tmp = out.with_name(TMP + out.name)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    src = open_source(ckpt, model, work=tmp / "universal")
    w = ShardWriter(tmp, "model", max_shard_bytes)
    for name, t in iter_weights(src):
        w.add(name, t)
    w.flush()
    shutil.rmtree(tmp / "universal", ignore_errors=True)
    if len(w.files) == 1:
        os.replace(tmp / w.files[0], tmp / "model.safetensors")
    else:  # the sharded layout transformers writes and reads (save_pretrained's max_shard_size)
        index = {"metadata": {"total_size": w.total}, "weight_map": w.weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.copy(ckpt / "run_config.yaml", tmp / "run_config.yaml")
    provenance = read_manifest(ckpt).get("provenance")
    if provenance:  # what produced the weights travels with them, as in a run's own final/
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    _replace(tmp, out)
    return out


def convert(ckpt: Path, manifest: dict, out: Path, to: str, world_size: int | None) -> Path:
    import yaml

    tmp = out.with_name(TMP + out.name)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    src = open_source(ckpt, work=tmp / "universal")
    info = {"layout": manifest.get("form"), "strategy": manifest.get("strategy"), "world_size": manifest.get("world_size")}
    write_portable(src, tmp / PORTABLE, info)
    shutil.rmtree(tmp / "universal", ignore_errors=True)
    conf = yaml.safe_load((ckpt / "run_config.yaml").read_text())
    conf.setdefault("launch", {})["strategy"] = to
    (tmp / "run_config.yaml").write_text(yaml.safe_dump(conf, sort_keys=False))
    files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
    new = {**manifest, "strategy": to, "world_size": world_size or manifest.get("world_size"), "form": "portable",
           "converted_from": {"path": str(ckpt), "strategy": manifest.get("strategy"),
                              "world_size": manifest.get("world_size")}, "files": files}
    (tmp / MANIFEST).write_text(json.dumps(new, indent=2))
    _replace(tmp, out)
    return out


def main(cmd: str, argv: list[str]) -> None:
    p = _Parser(prog=f"python -m train {cmd}")
    p.add_argument("checkpoint")
    p.add_argument("out")
    if cmd == "convert":
        p.add_argument("--to", required=True)
        p.add_argument("--world-size", type=int, default=None)
    args = p.parse_args(argv)
    if cmd == "convert" and args.to not in STRATEGIES:
        raise ConfigError(f"--to {args.to!r} is not a strategy; choose one of {', '.join(STRATEGIES)}")
    if cmd == "convert" and args.world_size is not None and args.world_size < 1:
        raise ConfigError(f"--world-size {args.world_size} must be at least 1")
    from train.checkpoint.remote import publish_checkpoint, publish_export

    ckpt, manifest = _checked(args.checkpoint)
    out = _local_out(args.out)
    if cmd == "export":
        written = publish_export(export(ckpt, out), location(args.out))
        print(f"[export] {written} (load with AutoModelForCausalLM.from_pretrained)")
        return
    written = publish_checkpoint(convert(ckpt, manifest, out, args.to, args.world_size), location(args.out))
    print(f"[convert] {written}: resume it with STRATEGY={args.to} RESUME={written}")
