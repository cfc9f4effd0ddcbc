"""What a run and the offline tools (export, convert) move between node-local scratch and an object
store OUTPUT_DIR, besides the checkpoints themselves (train/checkpoint/saver.py uploads those).

Every directory that is published follows the checkpoint rule: the objects a reader takes as the
sign of a complete directory (a checkpoint's ``manifest.json``, an export's ``config.json``, which
``from_pretrained`` cannot do without) are written last, after every other object's size was
confirmed by a listing.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from train.checkpoint.layout import MANIFEST, read_manifest
from train.config import RunConfig
from train.storage import RemotePath, download, local_files, location, scratch_root, verify, work_dir

METRICS = "metrics.jsonl"


def fetch_metrics(cfg: RunConfig) -> None:
    """Rank 0 of a run on a remote OUTPUT_DIR continues the run's metrics file: the bucket's copy
    replaces whatever this node's scratch holds (another node may have been rank 0 before)."""
    remote = location(cfg.output_dir)
    if not isinstance(remote, RemotePath):
        return
    local = work_dir(cfg)
    local.mkdir(parents=True, exist_ok=True)
    if (remote / METRICS).is_file():
        remote.fs.get_file((remote / METRICS).key, str(local / METRICS))
    else:
        (local / METRICS).unlink(missing_ok=True)


def publish(local: Path, dest: Path | RemotePath, last: tuple[str, ...]) -> Path | RemotePath:
    """A finished local directory to ``dest``. Local: nothing to do (it was written in place).
    Remote: the old objects go, every file but ``last`` is uploaded and its size confirmed, then
    ``last``: a reader never takes a half-uploaded directory for a complete one."""
    if not isinstance(dest, RemotePath):
        return local
    files = local_files(local)
    if dest.exists():
        for name in last:  # the completeness marker first: from now on the old directory is not whole
            if (dest / name).is_file():
                (dest / name).rmtree()
        dest.rmtree()
    body = {k: v for k, v in files.items() if k not in last}
    for rel in body:
        dest.fs.put_file(str(local / rel), f"{dest.key}/{rel}")
    verify(dest, body)
    for rel in last:
        if rel in files:
            dest.fs.put_file(str(local / rel), f"{dest.key}/{rel}")
    return dest


def publish_export(local: Path, dest: Path | RemotePath) -> Path | RemotePath:
    return publish(local, dest, last=("config.json",))


def publish_checkpoint(local: Path, dest: Path | RemotePath) -> Path | RemotePath:
    return publish(local, dest, last=(MANIFEST,))


def fetch_into(path: RemotePath, local: Path, manifest: dict) -> Path:
    """A complete remote checkpoint's files into ``local`` (sizes checked against ``manifest``), the
    manifest last, as on the store."""
    download(path, local, manifest.get("files", {}))
    (local / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return local


def fetch_checkpoint(path: RemotePath) -> Path:
    """A complete remote checkpoint in a fresh local directory (the offline tools read files)."""
    return fetch_into(path, scratch_dir("fetch-") / path.name, read_manifest(path))


def scratch_dir(prefix: str) -> Path:
    """A fresh directory in the node's scratch, for an offline tool's download or output."""
    root = scratch_root()
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=root))
