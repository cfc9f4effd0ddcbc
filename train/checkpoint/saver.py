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

With OUTPUT_DIR at an object store URL (train/storage.py) the same rule holds without a rename:
every rank writes to ``.tmp-step_N`` in node-local scratch, each node's first rank uploads its
files to ``checkpoints/step_N/``, rank 0 confirms every object's size in one listing and writes
the manifest last. Resume downloads the chosen checkpoint to scratch once per node."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from train import progress
from train.checkpoint.async_writer import AsyncWriter
from train.checkpoint.layout import (
    FORMAT_VERSION,
    GENERATION_FILE,
    MANIFEST,
    PREFIX,
    TMP_PREFIX,
    checkpoint_root,
    complete_checkpoints,
    conversion,
    fsync_dir,
    read_manifest,
    remote_checkpoints,
    versions,
    write_durably,
)
from train.checkpoint.lock import agree_resume, current_owner
from train.checkpoint.remote import METRICS, fetch_into
from train.config import ConfigError, RunConfig
from train.config.exitcodes import SUPERSEDED
from train.storage import RemotePath, local_dir, location, mirror, upload, verify
from train.worker import failpoints

# Files of OUTPUT_DIR's top level that a remote run keeps in scratch and copies up at each save.
MIRRORED = (METRICS, "final_probe.pt")


@dataclass
class TrainState:
    """Where the run is: the global step and the global data cursor."""

    step: int = 0
    epoch: int = 0
    samples_in_epoch: int = 0  # samples of permutation(seed, epoch) already consumed
    tokens_seen: int = 0
    # Global batches skipped by loss-spike rollbacks (train/worker/rollback.py), kept so a resume or a
    # rerun reproduces the curve: [{from_step, to_step, reason, from_cursor, to_cursor}, ...]
    skipped: list = field(default_factory=list)


@dataclass
class _Pending:
    """A save whose files are (being) written: completed by ``Checkpointer._complete``."""

    tmp: Path
    final: Path | RemotePath
    step: int
    manifest: dict  # rank 0's, taken when the save started ("files" is added on completion)
    writes: list = field(default_factory=list)  # futures of background writes (checkpoint.async_save)


class Checkpointer:
    def __init__(self, cfg: RunConfig, accelerator, extra_manifest: dict):
        self.cfg, self.acc, self.extra = cfg, accelerator, extra_manifest
        self.root = checkpoint_root(cfg)
        self.remote = isinstance(self.root, RemotePath)
        # Where files are written before they count: beside the checkpoints on a disk (renamed
        # into place), node-local scratch for an object store (uploaded from there).
        self.local = local_dir(cfg.output_dir, cfg.checkpoint.scratch_dir)
        self.staging = self.local / "checkpoints" if self.remote else self.root
        self.generation: str | None = None  # set by claim_and_find_resume; None = no ownership checks
        self.background = AsyncWriter(cfg, accelerator) if cfg.checkpoint.async_save else None
        self._pending: _Pending | None = None  # an asynchronous save not yet complete
        self.upload_s: float | None = None  # object storage: how long the last completed save's upload took
        self.saved_step = 0  # the step the newest checkpoint holds (saved, or loaded by resume/rollback)

    def due(self, step: int) -> bool:
        """Whether ``step`` saves on the way (``checkpoint.every``); the last step always saves (``save_last``)."""
        every = self.cfg.checkpoint.every
        return bool(every) and step % every == 0 and step != self.saved_step

    def save_last(self, state: TrainState, config_yaml: str, log=None) -> None:
        """The end of a run or a stop: save the step unless it is saved already, then wait for it."""
        if state.step != self.saved_step:
            self.save(state, config_yaml, log)
        self.finalize()  # an asynchronous save (checkpoint.async_save) counts once it is written

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
        self.saved_step = state.step
        acc = self.acc
        final = self.root / f"{PREFIX}{state.step:08d}"
        # Not per generation: a newer gang resumes from a step the older one already saved, so
        # both writing one step's temp dir at once would take a save longer than the newer
        # gang's start-up plus the steps in between; the checks below stop the older first.
        tmp = self.staging / f"{TMP_PREFIX}{final.name}"
        self._step_aside_if_superseded(None)
        if acc.is_main_process if not self.remote else acc.is_local_main_process:  # scratch: one per node
            self.staging.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # debris of an earlier crash
            tmp.mkdir()
        if self.remote and acc.is_main_process and final.exists():
            final.rmtree()  # the same step saved again: its objects are replaced whole, manifest first gone
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
            uploaded = {"checkpoint_upload_s": self.upload_s} if self.remote and self.background is None else {}
            log.log({"step": state.step, "checkpoint_stall_s": time.perf_counter() - t0, **uploaded})
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
        free = shutil.disk_usage(self.staging).free / 2**20
        raise RuntimeError(f"checkpoint save to {tmp} failed on at least one rank"
                           + (f": {error}" if error else "; see the other ranks' logs")
                           + f" ({free:.1f} MiB free at {self.staging}); the previous checkpoint is intact") from error

    def _complete(self, pending: _Pending) -> None:
        """The written files become checkpoint step_N: manifest last, rename, rotation."""
        acc, tmp, final = self.acc, pending.tmp, pending.final
        failpoints.in_save(pending.step)
        if self.remote:
            self._complete_remote(pending)
            return
        if acc.is_main_process:
            manifest = {**pending.manifest,
                        "files": {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}}
            write_durably(tmp / MANIFEST, json.dumps(manifest, indent=2))
        self._step_aside_if_superseded(tmp)
        if acc.is_main_process:
            if final.exists():  # the same step saved again (e.g. after a resume): replace it whole
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(self.root)
            self._rotate()
        acc.wait_for_everyone()

    def _complete_remote(self, pending: _Pending) -> None:
        """Object storage: upload (each node its own files), confirm sizes, manifest last, rotate."""
        import torch.distributed as dist

        acc, tmp, final = self.acc, pending.tmp, pending.final
        t0 = time.perf_counter()
        files, error = {}, None
        if acc.is_local_main_process:
            try:
                files = upload(tmp, final, on_file=lambda n: failpoints.in_upload(pending.step, n))
            except Exception as e:  # noqa: BLE001 - agreed on below, so no rank waits alone
                error = e
        self._raise_if_failed(error, tmp)
        everyone = [files]
        if dist.is_initialized() and dist.get_world_size() > 1:
            everyone = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, files)
        if acc.is_main_process:
            listed = {k: v for node in everyone for k, v in (node or {}).items()}
            try:
                verify(final, listed)
            except RuntimeError as e:
                error = e
        self._raise_if_failed(error, tmp)
        self._step_aside_if_superseded(tmp)
        if acc.is_main_process:
            manifest = {**pending.manifest, "files": listed}
            (final / MANIFEST).write_text(json.dumps(manifest, indent=2))  # the checkpoint counts from here
            self.upload_s = time.perf_counter() - t0  # upload, size check and manifest: part of the stall
            mirror(self.local, location(self.cfg.output_dir), MIRRORED)
            self._rotate()
        if acc.is_local_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
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
        progress.fatal(SUPERSEDED, f"superseded: OUTPUT_DIR {self.cfg.output_dir} now belongs to {who}; this gang "
                       f"(generation {self.generation[:8]}) stopped without writing")

    def _rotate(self) -> None:
        done, debris = remote_checkpoints(self.root) if self.remote else (complete_checkpoints(self.root), [])
        for old in done[: max(0, len(done) - self.cfg.checkpoint.keep)]:
            if isinstance(old, RemotePath):
                (old / MANIFEST).rmtree()  # manifest first: a kill mid-delete leaves a partial, not a damaged checkpoint
                old.rmtree()
            else:
                shutil.rmtree(old, ignore_errors=True)
        for partial in debris:  # uploads a kill cut short (no manifest): the run's owner, after a good save, removes them
            partial.rmtree()

    def _any_rank(self, flag: bool) -> bool:
        t = torch.tensor([1.0 if flag else 0.0], device=self.acc.device)
        return bool(self.acc.reduce(t, "sum").item() > 0)

    def load(self, path: Path | RemotePath) -> TrainState:
        self.finalize()  # never load while a save is still being written
        manifest = read_manifest(path)
        if isinstance(path, RemotePath):
            path = self._fetch(path, manifest)
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
        state = TrainState(**manifest["train_state"])
        self.saved_step = state.step
        return state

    def _fetch(self, path: RemotePath, manifest: dict) -> Path:
        """A remote checkpoint, downloaded once per node into scratch (sizes checked against its manifest)."""
        local = self.local / "resume" / path.name
        error = None
        if self.acc.is_local_main_process:
            try:
                fetch_into(path, local, manifest)
            except Exception as e:  # noqa: BLE001 - agreed on below
                error = e
        if self._any_rank(error is not None):
            raise RuntimeError(f"checkpoint {path} cannot be downloaded to {local}"
                               + (f" ({type(error).__name__}: {error})" if error else "; see the other ranks' logs"))
        return local

    def _load_converted(self, path: Path, how: str) -> None:
        """Another strategy or world size: the portable form (converted once, on rank 0), set into
        the prepared model/optimizer/scheduler (accelerate's own lists of what it prepared)."""
        from train.checkpoint.portable import PortableSource, ensure_portable
        from train.checkpoint.resume import load_portable

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
