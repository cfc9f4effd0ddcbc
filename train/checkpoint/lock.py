"""(split from train/checkpoint/saver.py)"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from pathlib import Path

import torch.distributed as dist

from train.checkpoint.layout import GENERATION_FILE, MANIFEST, checkpoint_root, find_resume, write_durably
from train.config import ConfigError, RunConfig
from train.storage import PreconditionFailed, RemotePath, location, read_with_tag, write_if

# How long a rank waits for the checkpoint rank 0 chose to appear in its own view of OUTPUT_DIR.
# NFS clients cache directory attributes for up to acdirmax (60 s by default).
VISIBLE_WAIT_S = 60.0


def claim_run(output_dir: str | Path, world_size: int) -> str:
    """Make this gang the owner of ``output_dir``: a new generation id in generation.json.

    Written in place (truncate + write + fsync), not by rename: NFS's close-to-open consistency
    then shows the new content to the next open() on every client, while a renamed-over path can
    stay cached as the old file. A reader that catches the write half-done sees unreadable JSON,
    which only happens while someone else is taking over, and counts as "not ours".
    """
    out = location(output_dir)
    generation = uuid.uuid4().hex
    record = {"generation": generation, "host": socket.gethostname(), "pid": os.getpid(), "world_size": world_size,
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if isinstance(out, RemotePath):
        _claim_object(out / GENERATION_FILE, record)
        return generation
    out.mkdir(parents=True, exist_ok=True)
    write_durably(out / GENERATION_FILE, json.dumps(record))
    return generation


def _claim_object(path: RemotePath, record: dict) -> None:
    """The same takeover on object storage, as a compare-and-swap on generation.json.

    A generation scheme, not an exclusive lock (If-None-Match on a lock object that a gang
    deletes when it ends): a gang killed on a node that vanished never deletes anything, so an
    exclusive lock would need a lease with an expiry, i.e. a guess about clocks and about how long
    a save may take. Here the newest gang always takes over, as on a disk, and the older one
    steps aside (exit 8) at its next check. Each claim is a conditional PUT against what the
    claimer read (If-Match its ETag, or If-None-Match: * when there was none): two gangs starting
    at once cannot both believe they replaced the same owner; the loser of the race re-reads and
    claims again, so the gang whose claim landed last owns the run and the other steps aside.
    """
    for _ in range(20):
        _, etag = read_with_tag(path)
        try:
            write_if(path, json.dumps({**record, "replaced": etag}).encode(), etag)
            return
        except PreconditionFailed:
            time.sleep(0.05)  # another gang claimed between our read and write: claim over it
    raise OSError(f"could not claim {path}: it changed under every one of 20 conditional writes")


def current_owner(output_dir: str | Path) -> dict:
    """The generation record in ``output_dir``, or {} if it is missing or being rewritten."""
    try:
        return json.loads((location(output_dir) / GENERATION_FILE).read_text())
    except (OSError, ValueError):
        return {}


def agree_resume(cfg: RunConfig, world_size: int,
                 visible_wait_s: float = VISIBLE_WAIT_S) -> tuple[str, Path | RemotePath | None]:
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
            where = ("these credentials must be allowed to write there" if isinstance(location(cfg.output_dir), RemotePath)
                     else f"the run directory must be writable by uid {os.getuid()}")
            message = {"error": f"cannot write {GENERATION_FILE} in OUTPUT_DIR {cfg.output_dir!r} "
                                f"({e.strerror or e}); {where}"}
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
        chosen = location(cfg.checkpoint.resume)
    seen = rank0 or chosen is None or _wait_visible(chosen, visible_wait_s)
    if group:
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, seen)
        if not all(everyone):
            missing = [r for r, ok in enumerate(everyone) if not ok]
            raise ConfigError(f"rank 0 chose checkpoint {message['name']} but rank(s) {missing} cannot see it after "
                              f"{visible_wait_s:.0f} s: is OUTPUT_DIR the same shared volume on every node?")
    return message["generation"], chosen


def _wait_visible(path: Path | RemotePath, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if not isinstance(path, RemotePath):
                os.listdir(path.parent)  # a fresh READDIR revalidates an NFS client's cached directory
        except OSError:
            pass
        if (path / MANIFEST).is_file():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)
