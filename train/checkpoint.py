"""Crash-safe checkpoints and the final Hugging Face export.

A checkpoint is written by every rank into ``checkpoints/.tmp-step_N`` through
``accelerator.save_state`` (collective under DeepSpeed/FSDP), then rank 0 writes
``manifest.json`` last and renames the directory to ``checkpoints/step_N``. Only directories
with a manifest count, so a process killed mid-save leaves the previous checkpoint as the
newest complete one. Rotation runs after the rename and never touches the newest.
We own this instead of accelerate's ``total_limit``, which deletes the oldest checkpoint
before writing the new one, in place.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import failpoints
from .config import ConfigError, RunConfig
from .distributed import wait_for_export
from .model import param_count

MANIFEST = "manifest.json"
PREFIX = "step_"
TMP_PREFIX = ".tmp-"
FORMAT_VERSION = 1


@dataclass
class TrainState:
    """Where the run is: the global step and the global data cursor."""

    step: int = 0
    epoch: int = 0
    samples_in_epoch: int = 0  # samples of permutation(seed, epoch) already consumed
    tokens_seen: int = 0


def versions() -> dict[str, str]:
    import accelerate
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "accelerate": accelerate.__version__, "transformers": transformers.__version__}
    try:
        import deepspeed

        out["deepspeed"] = deepspeed.__version__
    except Exception:  # noqa: BLE001 - optional at run time
        pass
    return out


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints (manifest present), oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def read_manifest(path: Path) -> dict:
    try:
        return json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"checkpoint {str(path)!r} has an unreadable manifest ({e}); remove it or pick another") from None


def checkpoint_root(cfg: RunConfig) -> Path:
    return Path(cfg.output_dir) / "checkpoints"


def find_resume(cfg: RunConfig, world_size: int) -> Path | None:
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
    path = (existing[-1] if existing else None) if mode == "auto" else Path(mode)
    if path is None:
        return None
    if not (path / MANIFEST).is_file():
        raise ConfigError(f"RESUME={mode!r}: {str(path)!r} is not a complete checkpoint (no {MANIFEST})")
    manifest = read_manifest(path)
    check_compatible(manifest, cfg, world_size, path)
    check_files(manifest, path)
    return path


def check_files(manifest: dict, path: Path) -> None:
    """Every file the manifest lists is there with its recorded size (catches truncation early)."""
    for rel, size in manifest.get("files", {}).items():
        f = path / rel
        actual = f.stat().st_size if f.is_file() else None
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
    from .config import strategy_name
    from .portable import native_loads

    saved, ours = manifest.get("strategy", "?"), strategy_name(cfg.launch)
    saved_world = manifest.get("world_size")
    if manifest.get("form") == "portable":
        return f"was converted from {manifest.get('converted_from', {}).get('strategy')}: loading its portable form"
    if native_loads(saved, saved_world, ours, world_size):
        return None
    return (f"written by {saved} on {saved_world} rank(s), this run is {ours} on {world_size}: converting through "
            "the portable form (weights, Adam moments and step, LR schedule, data cursor move; RNG states do not)")


class Checkpointer:
    def __init__(self, cfg: RunConfig, accelerator, extra_manifest: dict):
        self.cfg, self.acc, self.extra = cfg, accelerator, extra_manifest
        self.root = checkpoint_root(cfg)

    def save(self, state: TrainState, config_yaml: str) -> Path:
        acc = self.acc
        final = self.root / f"{PREFIX}{state.step:08d}"
        tmp = self.root / f"{TMP_PREFIX}{final.name}"
        if acc.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # debris of an earlier crash
            tmp.mkdir()
        acc.wait_for_everyone()
        error = None
        try:
            acc.save_state(str(tmp))
            if acc.is_main_process:
                (tmp / "run_config.yaml").write_text(config_yaml)
        except Exception as e:  # noqa: BLE001 - agreed on below, so no rank hangs alone
            error = e
        failpoints.in_save(state.step)
        failed = self._any_rank(error is not None)
        if failed:
            # A full disk surfaces as obscure stream errors from torch.save; say how much room is left.
            free = shutil.disk_usage(self.root).free / 2**20
            raise RuntimeError(f"checkpoint save to {tmp} failed on at least one rank"
                               + (f": {error}" if error else "; see the other ranks' logs")
                               + f" ({free:.1f} MiB free at {self.root}); the previous checkpoint is intact") from error
        if acc.is_main_process:
            manifest = {"format": FORMAT_VERSION, "step": state.step, "train_state": asdict(state),
                        "world_size": acc.num_processes, "form": "native", "fingerprint": self.cfg.fingerprint(),
                        "config_hash": self.cfg.fingerprint_hash(), "versions": versions(),
                        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        "files": {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()},
                        **self.extra}
            _write_durably(tmp / MANIFEST, json.dumps(manifest, indent=2))
            if final.exists():  # the same step saved again (e.g. after a resume): replace it whole
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            self._rotate()
        acc.wait_for_everyone()
        return final

    def _rotate(self) -> None:
        done = complete_checkpoints(self.root)
        for old in done[: max(0, len(done) - self.cfg.checkpoint.keep)]:
            shutil.rmtree(old, ignore_errors=True)

    def _any_rank(self, flag: bool) -> bool:
        t = torch.tensor([1.0 if flag else 0.0], device=self.acc.device)
        return bool(self.acc.reduce(t, "sum").item() > 0)

    def load(self, path: Path) -> TrainState:
        manifest = read_manifest(path)
        how = conversion(manifest, self.cfg, self.acc.num_processes)
        try:
            if how is None:
                self.acc.load_state(str(path))
            else:
                self._load_converted(path, how)
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001
            raise RuntimeError(f"checkpoint {str(path)!r} cannot be loaded ({type(e).__name__}: {e}); "
                               "it may be truncated or corrupt - remove it to resume from the previous one") from e
        return TrainState(**manifest["train_state"])

    def _load_converted(self, path: Path, how: str) -> None:
        """Another strategy or world size: the portable form (converted once, on rank 0), set into
        the prepared model/optimizer/scheduler (accelerate's own lists of what it prepared)."""
        from .portable import PortableSource, ensure_portable
        from .resume import load_portable

        acc = self.acc
        if acc.is_main_process:
            print(f"[train] checkpoint {path} {how}", flush=True)
            error = None
            try:
                ensure_portable(path)
            except Exception as e:  # noqa: BLE001 - agreed on below, so no rank waits alone
                error = e
        else:
            error = None
        if self._any_rank(error is not None):
            raise error or RuntimeError(f"converting {path} failed on rank 0; see its log")
        src = PortableSource(path / "portable")
        load_portable(acc, acc._models[0], acc._optimizers[0], acc._schedulers[0], src)


def _write_durably(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def export_final(accelerator, model, tokenizer, out_dir: Path, config_yaml: str) -> Path | None:
    """Consolidated safetensors + config + tokenizer that `from_pretrained` loads.

    ``get_state_dict`` gathers ZeRO-3 partitions / FSDP shards (a collective: every rank calls
    it). The export is written beside and renamed into place, so an old export survives a crash.
    """
    state_dict = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        wait_for_export(accelerator)
        return None
    tmp = out_dir.with_name(f"{TMP_PREFIX}{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "run_config.yaml").write_text(config_yaml)
    expected = param_count(unwrapped)
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
