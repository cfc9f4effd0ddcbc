"""(split from train/checkpoint/saver.py)"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

from train.config import ConfigError, RunConfig
from train.storage import RemotePath, location

MANIFEST = "manifest.json"
PREFIX = "step_"
TMP_PREFIX = ".tmp-"
FORMAT_VERSION = 1
GENERATION_FILE = "generation.json"


def versions() -> dict[str, str]:
    """Installed versions, read from package metadata: importing DeepSpeed just to ask (seconds)
    would stall the first checkpoint save of a run that does not use it."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("accelerate", "transformers", "deepspeed"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:  # deepspeed is optional at run time
            pass
    return out


def complete_checkpoints(root: Path | RemotePath) -> list[Path | RemotePath]:
    """Complete checkpoints (manifest present), oldest first. On object storage a directory
    without its manifest is an upload in progress or one a kill cut short: never counted."""
    if isinstance(root, RemotePath):
        return remote_checkpoints(root)[0]
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / MANIFEST).is_file()]
    return _by_step(found)


def _by_step(found: list) -> list:
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def remote_checkpoints(root: RemotePath) -> tuple[list[RemotePath], list[RemotePath]]:
    """(complete, partial) checkpoint directories on object storage from one listing, oldest first:
    partial ones have objects but no manifest (uploads in progress or cut short)."""
    tops: dict[str, bool] = {}
    for rel in root.sizes():
        top = rel.split("/")[0]
        if top.startswith(PREFIX) and "/" in rel:
            tops[top] = tops.get(top, False) or rel == f"{top}/{MANIFEST}"
    return (_by_step([root / n for n, done in tops.items() if done]),
            _by_step([root / n for n, done in tops.items() if not done]))


def read_manifest(path: Path | RemotePath) -> dict:
    try:
        return json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"checkpoint {str(path)!r} has an unreadable manifest ({e}); remove it or pick another") from None


def checkpoint_root(cfg: RunConfig) -> Path | RemotePath:
    return location(cfg.output_dir) / "checkpoints"


def find_resume(cfg: RunConfig, world_size: int) -> Path | RemotePath | None:
    """The checkpoint to resume from, checked against this run; None = start fresh.

    Runs in the launcher too, so a checkpoint from a different run is refused before any
    process group starts.
    """
    mode = cfg.checkpoint.resume
    existing = complete_checkpoints(checkpoint_root(cfg))
    if mode == "never":
        if existing:
            raise ConfigError(f"OUTPUT_DIR {cfg.output_dir!r} already holds checkpoints ({existing[-1].name}); "
                              "use RESUME=auto to continue, or another OUTPUT_DIR")
        return None
    path = (existing[-1] if existing else None) if mode == "auto" else location(mode)
    if path is None:
        return None
    if not (path / MANIFEST).is_file():
        raise ConfigError(f"RESUME={mode!r}: {str(path)!r} is not a complete checkpoint (no {MANIFEST})")
    manifest = read_manifest(path)
    check_compatible(manifest, cfg, world_size, path)
    check_files(manifest, path)
    return path


def check_files(manifest: dict, path: Path | RemotePath) -> None:
    """Every file the manifest lists is there with its recorded size (catches truncation early)."""
    listed = path.sizes() if isinstance(path, RemotePath) else None  # one listing, not a request per file
    for rel, size in manifest.get("files", {}).items():
        f = path / rel
        actual = listed.get(rel) if listed is not None else f.stat().st_size if f.is_file() else None
        if actual != size:
            state = "missing" if actual is None else f"{actual} bytes, expected {size}"
            raise ConfigError(f"checkpoint {str(path)!r} is damaged: {rel} is {state}; remove this checkpoint to "
                              "resume from the previous one, or pass RESUME=<older checkpoint dir>")


def check_compatible(manifest: dict, cfg: RunConfig, world_size: int, path: Path) -> None:
    theirs, ours = manifest.get("fingerprint", {}), cfg.fingerprint()
    diff = [f"{k}: checkpoint has {theirs.get(k)!r}, this run has {v!r}" for k, v in ours.items() if theirs.get(k) != v]
    if diff:
        raise ConfigError(f"checkpoint {str(path)!r} is from a different run ({'; '.join(diff)}); "
                          "use another OUTPUT_DIR or restore the original settings")


def conversion(manifest: dict, cfg: RunConfig, world_size: int) -> str | None:
    """None when the checkpoint loads natively into this run; else what the conversion moves."""
    from train.checkpoint.portable import native_loads
    from train.config import strategy_name

    saved, ours = manifest.get("strategy", "?"), strategy_name(cfg.launch)
    saved_world = manifest.get("world_size")
    if manifest.get("form") == "portable":
        return f"was converted from {manifest.get('converted_from', {}).get('strategy')}: loading its portable form"
    if native_loads(saved, saved_world, ours, world_size):
        return None
    return (f"written by {saved} on {saved_world} rank(s), this run is {ours} on {world_size}: converting through "
            "the portable form (weights, Adam moments and step, LR schedule, data cursor move; RNG states do not)")


def write_durably(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
