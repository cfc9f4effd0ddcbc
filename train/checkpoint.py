"""Crash-safe checkpoints and the final Hugging Face export.

A checkpoint is written by every rank into ``checkpoints/.tmp-step_N`` through
``accelerator.save_state`` (collective under DeepSpeed/FSDP), then rank 0 writes
``manifest.json`` last and renames the directory to ``checkpoints/step_N``. Only directories
with a manifest count, so a process killed mid-save leaves the previous checkpoint as the
newest complete one. Rotation runs after the rename and never touches the newest.
We own this instead of accelerate's ``total_limit``, which deletes the oldest checkpoint
before writing the new one, in place.

One gang owns an OUTPUT_DIR at a time. When a run starts, its rank 0 writes a new generation
id to ``OUTPUT_DIR/generation.json`` and picks the checkpoint to resume; every rank gets both
from it (ranks that list the directory themselves can see different newest steps on NFS
right after a rename). Before each save and before each rename the gang checks that the
generation is still its own; an older gang that finds it was superseded (a resubmitted Job
whose old pods are still terminating) writes nothing more and exits 8 (SUPERSEDED).
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import socket
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from . import failpoints, lora, progress
from .config import ConfigError, RunConfig
from .distributed import wait_for_export
from .exitcodes import SUPERSEDED
from .model import param_count

MANIFEST = "manifest.json"
PREFIX = "step_"
TMP_PREFIX = ".tmp-"
FORMAT_VERSION = 1
GENERATION_FILE = "generation.json"
# How long a rank waits for the checkpoint rank 0 chose to appear in its own view of OUTPUT_DIR.
# NFS clients cache directory attributes for up to acdirmax (60 s by default).
VISIBLE_WAIT_S = 60.0


@dataclass
class TrainState:
    """Where the run is: the global step and the global data cursor."""

    step: int = 0
    epoch: int = 0
    samples_in_epoch: int = 0  # samples of permutation(seed, epoch) already consumed
    tokens_seen: int = 0
    # Global batches skipped by loss-spike rollbacks (train/rollback.py), kept so a resume or a
    # rerun reproduces the curve: [{from_step, to_step, reason, from_cursor, to_cursor}, ...]
    skipped: list = field(default_factory=list)


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


def claim_run(output_dir: str | Path, world_size: int) -> str:
    """Make this gang the owner of ``output_dir``: a new generation id in generation.json.

    Written in place (truncate + write + fsync), not by rename: NFS's close-to-open consistency
    then shows the new content to the next open() on every client, while a renamed-over path can
    stay cached as the old file. A reader that catches the write half-done sees unreadable JSON,
    which only happens while someone else is taking over, and counts as "not ours".
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    generation = uuid.uuid4().hex
    record = {"generation": generation, "host": socket.gethostname(), "pid": os.getpid(), "world_size": world_size,
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    _write_durably(out / GENERATION_FILE, json.dumps(record))
    return generation


def current_owner(output_dir: str | Path) -> dict:
    """The generation record in ``output_dir``, or {} if it is missing or being rewritten."""
    try:
        return json.loads((Path(output_dir) / GENERATION_FILE).read_text())
    except (OSError, ValueError):
        return {}


def agree_resume(cfg: RunConfig, world_size: int, visible_wait_s: float = VISIBLE_WAIT_S) -> tuple[str, Path | None]:
    """Rank 0 takes the run over and chooses the checkpoint; every rank returns (generation, path).

    A collective when a process group exists: call it on every rank. Rank 0 alone lists the
    checkpoints; the others are told which one and wait (bounded) until it is visible to them.
    A refused resume is raised as the same ConfigError on every rank, so none waits alone.
    """
    group = dist.is_initialized() and dist.get_world_size() > 1
    rank0 = not group or dist.get_rank() == 0
    message: dict = {}
    if rank0:
        try:
            generation = claim_run(cfg.output_dir, world_size)  # first: an older gang stops renaming now
            path = find_resume(cfg, world_size)
            message = {"generation": generation, "name": None if path is None else path.name}
        except ConfigError as e:
            message = {"error": str(e)}
        except OSError as e:  # e.g. a volume uid 1000 may not write: say so on every rank, none hangs
            message = {"error": f"cannot write {GENERATION_FILE} in OUTPUT_DIR {cfg.output_dir!r} "
                                f"({e.strerror or e}); the run directory must be writable by uid {os.getuid()}"}
    if group:
        box = [message]
        dist.broadcast_object_list(box, src=0)
        message = box[0]
    if "error" in message:
        raise ConfigError(message["error"])
    # Each rank names the chosen checkpoint under its own OUTPUT_DIR (mount points may differ).
    if message["name"] is None:
        chosen = None
    elif cfg.checkpoint.resume == "auto":
        chosen = checkpoint_root(cfg) / message["name"]
    else:
        chosen = Path(cfg.checkpoint.resume)
    seen = rank0 or chosen is None or _wait_visible(chosen, visible_wait_s)
    if group:
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, seen)
        if not all(everyone):
            missing = [r for r, ok in enumerate(everyone) if not ok]
            raise ConfigError(f"rank 0 chose checkpoint {message['name']} but rank(s) {missing} cannot see it after "
                              f"{visible_wait_s:.0f} s: is OUTPUT_DIR the same shared volume on every node?")
    return message["generation"], chosen


def _wait_visible(path: Path, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            os.listdir(path.parent)  # a fresh READDIR revalidates an NFS client's cached directory
        except OSError:
            pass
        if (path / MANIFEST).is_file():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)


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


class AsyncWriter:
    """checkpoint.async_save under FSDP2: what ``accelerator.save_state`` writes, in its layout,
    with the model and optimizer written in the background.

    accelerate's ``save_fsdp_model`` / ``save_fsdp_optimizer`` write {"model": get_model_state_dict}
    to ``pytorch_model_fsdp_<i>/`` and {"optimizer": get_optimizer_state_dict} to ``optimizer_<i>/``
    with torch.distributed.checkpoint (DCP). The same state dicts, taken with the same options, go
    to ``dcp.async_save`` here, whose stager (the FileSystemWriter) copies them to CPU memory before
    it returns: training may change the parameters right after. The rest (scheduler, sampler, RNG
    states) is small and written at once by accelerate's own ``save_accelerator_state``. So
    ``load_state`` and the portable reader (train/portable.py) read the result unchanged.

    Each background write coordinates over a gloo process group of its own, created here once on
    every rank: on the default group its collectives would interleave with training's, and the
    model's and the optimizer's writes run in two threads at once.
    """

    def __init__(self, cfg: RunConfig, accelerator):
        from accelerate.utils import DistributedType
        from torch.distributed.fsdp.fully_sharded_data_parallel import StateDictType

        plugin = getattr(accelerator.state, "fsdp_plugin", None)
        if (accelerator.distributed_type != DistributedType.FSDP or plugin is None or plugin.fsdp_version != 2
                or plugin.state_dict_type != StateDictType.SHARDED_STATE_DICT or not dist.is_initialized()):
            raise ConfigError("ASYNC_SAVE=true needs FSDP2 with sharded state dicts in a process group "
                              "(STRATEGY fsdp or fsdp-offload)")
        self.acc = accelerator
        timeout = timedelta(seconds=cfg.launch.timeout_s)
        count = len(accelerator._models) + len(accelerator._optimizers)
        self.groups = [dist.new_group(backend="gloo", timeout=timeout) for _ in range(count)]

    def start(self, tmp: Path) -> list:
        """Write ``tmp`` as ``save_state`` would; returns the background writes' futures."""
        import torch.distributed.checkpoint as dcp
        from accelerate.checkpointing import save_accelerator_state, save_custom_state
        from accelerate.utils.constants import FSDP_MODEL_NAME, OPTIMIZER_NAME
        from accelerate.utils.fsdp_utils import _prepare_sd_options
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        acc = self.acc
        options = _prepare_sd_options(acc.state.fsdp_plugin)
        parts = [(f"{FSDP_MODEL_NAME}_{i}", {"model": get_model_state_dict(m, options=options)})
                 for i, m in enumerate(acc._models)]
        parts += [(f"{OPTIMIZER_NAME}_{i}", {"optimizer": get_optimizer_state_dict(acc._models[i], opt, options=options)})
                  for i, opt in enumerate(acc._optimizers)]
        writes = []
        for (name, state_dict), group in zip(parts, self.groups):
            (tmp / name).mkdir(parents=True, exist_ok=True)
            writes.append(dcp.async_save(state_dict, storage_writer=dcp.FileSystemWriter(str(tmp / name)),
                                         planner=_save_planner(), process_group=group))
        # What save_state writes after the FSDP model and optimizer, the same way.
        for hook in acc._save_model_state_pre_hook.values():
            hook(acc._models, [], str(tmp))
        each_node = acc.project_configuration.save_on_each_node
        save_accelerator_state(str(tmp), [], [], acc._schedulers, acc._dataloaders, acc.state.process_index,
                               acc.step, acc.scaler, save_on_each_node=each_node)
        for i, obj in enumerate(acc._custom_objects):
            save_custom_state(obj, str(tmp), i, save_on_each_node=each_node)
        acc.project_configuration.iteration += 1
        return writes


def _save_planner():
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    delay = failpoints.async_write_delay()
    if not delay:
        return DefaultSavePlanner()

    class SlowPlanner(DefaultSavePlanner):  # a slow disk: the write starts late, training goes on
        def set_up_planner(self, *args, **kwargs):
            time.sleep(delay)
            super().set_up_planner(*args, **kwargs)

    return SlowPlanner()


@dataclass
class _Pending:
    """A save whose files are (being) written: completed by ``Checkpointer._complete``."""

    tmp: Path
    final: Path
    step: int
    manifest: dict  # rank 0's, taken when the save started ("files" is added on completion)
    writes: list = field(default_factory=list)  # futures of background writes (checkpoint.async_save)


class Checkpointer:
    def __init__(self, cfg: RunConfig, accelerator, extra_manifest: dict):
        self.cfg, self.acc, self.extra = cfg, accelerator, extra_manifest
        self.root = checkpoint_root(cfg)
        self.generation: str | None = None  # set by claim_and_find_resume; None = no ownership checks
        self.background = AsyncWriter(cfg, accelerator) if cfg.checkpoint.async_save else None
        self._pending: _Pending | None = None  # an asynchronous save not yet complete

    def claim_and_find_resume(self) -> Path | None:
        """Own OUTPUT_DIR from now on and return the checkpoint rank 0 chose (see agree_resume)."""
        self.generation, path = agree_resume(self.cfg, self.acc.num_processes)
        return path

    def save(self, state: TrainState, config_yaml: str, log=None) -> Path:
        """Write checkpoint ``step_N``; with ``log`` (a MetricsLog), record how long training was
        blocked here as {"step": N, "checkpoint_stall_s": seconds} (rank 0's clock).

        With checkpoint.async_save the model and optimizer are written in the background and the
        checkpoint is completed (manifest, rename, rotation) by ``finalize``: at the next save,
        before a rollback or load, and at the end of the run. Until then the previous checkpoint
        is the newest complete one.
        """
        t0 = time.perf_counter()
        self.finalize()  # the previous asynchronous save first: its wait is part of this stall
        acc = self.acc
        final = self.root / f"{PREFIX}{state.step:08d}"
        # Not per generation: a newer gang resumes from a step the older one already saved, so
        # both writing one step's temp dir at once would take a save longer than the newer
        # gang's start-up plus the steps in between; the checks below stop the older first.
        tmp = self.root / f"{TMP_PREFIX}{final.name}"
        self._step_aside_if_superseded(None)
        if acc.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # debris of an earlier crash
            tmp.mkdir()
        acc.wait_for_everyone()
        pending = _Pending(tmp, final, state.step, self._manifest(state) if acc.is_main_process else {})
        error = None
        try:
            if self.background is not None:
                pending.writes = self.background.start(tmp)
            else:
                acc.save_state(str(tmp))
            if acc.is_main_process:
                (tmp / "run_config.yaml").write_text(config_yaml)
        except Exception as e:  # noqa: BLE001 - agreed on below, so no rank hangs alone
            error = e
        self._raise_if_failed(error, tmp)
        if self.background is not None:
            self._pending = pending
        else:
            self._complete(pending)
        if log is not None:
            log.log({"step": state.step, "checkpoint_stall_s": time.perf_counter() - t0})
        return final

    def finalize(self) -> Path | None:
        """Complete the pending asynchronous save, if any (a collective: every rank calls it at the
        same point). Returns the checkpoint it completed."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        error = None
        for write in pending.writes:
            try:
                write.result()
            except Exception as e:  # noqa: BLE001 - agreed on below
                error = error or e
        self._raise_if_failed(error, pending.tmp)
        self._complete(pending)
        return pending.final

    def _manifest(self, state: TrainState) -> dict:
        """Everything of the manifest but the file list, as of now (the save's moment)."""
        return {"format": FORMAT_VERSION, "step": state.step, "train_state": asdict(state),
                "world_size": self.acc.num_processes, "form": "native", "fingerprint": self.cfg.fingerprint(),
                "config_hash": self.cfg.fingerprint_hash(), "versions": versions(), "generation": self.generation,
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **self.extra}

    def _raise_if_failed(self, error: Exception | None, tmp: Path) -> None:
        """Every rank learns whether any rank failed to write (so none waits alone) and raises."""
        if not self._any_rank(error is not None):
            return
        # A full disk surfaces as obscure stream errors from torch.save; say how much room is left.
        free = shutil.disk_usage(self.root).free / 2**20
        raise RuntimeError(f"checkpoint save to {tmp} failed on at least one rank"
                           + (f": {error}" if error else "; see the other ranks' logs")
                           + f" ({free:.1f} MiB free at {self.root}); the previous checkpoint is intact") from error

    def _complete(self, pending: _Pending) -> None:
        """The written files become checkpoint step_N: manifest last, rename, rotation."""
        acc, tmp, final = self.acc, pending.tmp, pending.final
        failpoints.in_save(pending.step)
        if acc.is_main_process:
            manifest = {**pending.manifest,
                        "files": {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}}
            _write_durably(tmp / MANIFEST, json.dumps(manifest, indent=2))
        self._step_aside_if_superseded(tmp)
        if acc.is_main_process:
            if final.exists():  # the same step saved again (e.g. after a resume): replace it whole
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            self._rotate()
        acc.wait_for_everyone()

    def _step_aside_if_superseded(self, tmp: Path | None) -> None:
        """Exit SUPERSEDED on every rank if another gang has taken OUTPUT_DIR over since we started.

        Rank 0 reads the owner and all ranks agree, so none waits alone in a collective. Nothing
        is renamed or rotated after this; our unfinished temp dir is removed.
        """
        if self.generation is None:
            return
        owner = current_owner(self.cfg.output_dir) if self.acc.is_main_process else {}
        if not self._any_rank(self.acc.is_main_process and owner.get("generation") != self.generation):
            return
        if self.acc.is_main_process:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            who = (f"generation {owner['generation'][:8]} from {owner.get('host')} since {owner.get('started')}"
                   if owner else f"nobody ({GENERATION_FILE} is missing or being rewritten)")
        else:
            who = "another gang"
        sys.stdout.flush()
        # Every rank, at once; the loop's cleanup would only write more. Through the supervisor, so
        # that this is final (no in-place restart would re-claim the run and fight the new gang).
        progress.fatal("superseded", f"superseded: OUTPUT_DIR {self.cfg.output_dir} now belongs to {who}; this gang "
                       f"(generation {self.generation[:8]}) stopped without writing", SUPERSEDED)

    def _rotate(self) -> None:
        done = complete_checkpoints(self.root)
        for old in done[: max(0, len(done) - self.cfg.checkpoint.keep)]:
            shutil.rmtree(old, ignore_errors=True)

    def _any_rank(self, flag: bool) -> bool:
        t = torch.tensor([1.0 if flag else 0.0], device=self.acc.device)
        return bool(self.acc.reduce(t, "sum").item() > 0)

    def load(self, path: Path) -> TrainState:
        self.finalize()  # never load while a save is still being written
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


def export_final(accelerator, model, tokenizer, out_dir: Path, config_yaml: str, merge_lora: bool = True) -> Path | None:
    """Consolidated safetensors + config + tokenizer that `from_pretrained` loads.

    ``get_state_dict`` gathers ZeRO-3 partitions / FSDP shards (a collective: every rank calls
    it). The export is written beside and renamed into place, so an old export survives a crash.
    A LoRA run writes its adapter to ``adapter/`` (PeftModel.from_pretrained) and, with
    ``merge_lora``, the merged full model beside it.
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
