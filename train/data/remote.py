"""A prepared DATASET at an object store URL: fetched once per node into a bounded local cache.

Training reads shards through memory maps and ``pread`` (train/data/shards.py), which needs
local files, so each node copies the prepared directory into ``data.cache_dir/remote/`` before
any rank opens it: under the same file lock as the raw-source cache (one fetcher per node, the
others wait), every array file checked against the sha256 its manifest recorded at prepare time,
the manifest written last (a killed fetch is continued, never read half-done). The entry's name
holds a hash of the remote manifest: a re-prepared corpus at the same URL is a new entry.
The cache keeps its corpora within ``data.remote_cache_gb``, the least recently used leaving first.
Every rank then reads the same bytes as from a local directory: data order and resume are exact.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from train.config import ConfigError, DataConfig
from train.data.shards import MANIFEST, is_prepared
from train.storage import RemotePath, reason

REMOTE = "remote"


def remote_cache_root(cfg: DataConfig) -> Path:
    from train.data.prepare import cache_root

    return cache_root(cfg).parent / REMOTE


def read_remote_manifest(url: str, what: str = "DATASET") -> bytes:
    root = RemotePath(url)
    try:
        return (root / MANIFEST).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{what}={url!r} holds no {MANIFEST}: not a prepared directory (prepare it with `python -m "
                          "train prepare --out DIR SOURCE...`, then upload DIR whole)") from None
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - one line: the client library's type says nothing more
        raise ConfigError(f"{what}={url!r}: cannot read its {MANIFEST} ({reason(e)})") from None


def fetch_corpus(url: str, cfg: DataConfig, what: str = "DATASET", log=print) -> Path:
    """The local cache entry of the prepared corpus at ``url``, fetched if this node lacks it."""
    from train.data.prepare import _locked

    blob = read_remote_manifest(url, what)
    try:
        json.loads(blob)
    except ValueError as e:
        raise ConfigError(f"{what}={url!r}: its {MANIFEST} is not JSON ({e}); upload the prepared directory again") from None
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", url.rstrip("/").rsplit("/", 1)[-1])[:40]
    key = hashlib.sha256(url.encode() + b"\0" + blob).hexdigest()[:16]
    entry = remote_cache_root(cfg) / f"{slug}-{key}"
    if not is_prepared(entry):
        with _locked(entry.with_name(entry.name + ".lock"), log):
            if not is_prepared(entry):
                _fetch(RemotePath(url), entry, blob, cfg, what, log)
    os.utime(entry)  # last use, for the least-recently-used eviction
    return entry


def _files(manifest: dict) -> list[tuple[str, int, str | None]]:
    """(file name, bytes, sha256 or None) of every array file the manifest lists."""
    import numpy as np

    out = []
    for s in manifest["shards"]:
        for key, spec in manifest["arrays"].items():
            count = s["tokens"] if spec["per"] == "token" else s["documents"]
            out.append((s["name"] + spec["suffix"], count * np.dtype(spec["dtype"]).itemsize,
                        (s.get("sha256") or {}).get(key)))
    return out


def _fetch(root: RemotePath, entry: Path, blob: bytes, cfg: DataConfig, what: str, log) -> None:
    manifest = json.loads(blob)
    files = _files(manifest)
    need = sum(size for _, size, _ in files)
    limit = int(cfg.remote_cache_gb * 1e9)
    if need > limit:
        raise ConfigError(f"{what}={str(root)!r} is {need / 1e9:.3g} GB, more than the remote data cache may hold "
                          f"(DATA_REMOTE_CACHE_GB={cfg.remote_cache_gb:g}); raise it to at least {need / 1e9:.3g}")
    _make_room(entry, need, limit, log)
    log(f"[data] fetching {what}={str(root)!r} ({need / 1e6:.1f} MB, {len(manifest['shards'])} shard(s)) into {entry}")
    entry.mkdir(parents=True, exist_ok=True)
    for name, size, digest in files:
        target = entry / name
        if target.is_file() and target.stat().st_size == size and _sha256(target) == digest:
            continue  # fetched by an earlier, interrupted attempt
        part = entry / f".tmp-{name}"
        try:
            root.fs.get_file((root / name).key, str(part))
        except FileNotFoundError:
            raise ConfigError(f"{what}={str(root)!r}: shard file {name} is missing; the manifest lists it: upload the "
                              "whole prepared directory") from None
        got, h = part.stat().st_size, _sha256(part)
        if got != size or (digest is not None and h != digest):
            part.unlink()
            raise ConfigError(f"{what}={str(root)!r}: shard file {name} does not match its manifest ({got} bytes, "
                              f"expected {size}{'' if digest is None else ', or another sha256'}); upload the "
                              "prepared directory again")
        os.replace(part, target)
    tmp = entry / f".tmp-{MANIFEST}"
    tmp.write_bytes(blob)  # the bucket's bytes: the entry's name holds their hash
    os.replace(tmp, entry / MANIFEST)  # last: from here the entry counts as fetched


def _make_room(entry: Path, need: int, limit: int, log) -> None:
    """Remove least recently used corpora (never ``entry``) until ``need`` more bytes fit."""
    root = entry.parent
    root.mkdir(parents=True, exist_ok=True)
    others = [d for d in root.iterdir() if d.is_dir() and d != entry]
    sizes = {d: sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) for d in others}
    total = sum(sizes.values())
    for d in sorted(others, key=lambda d: d.stat().st_mtime):
        if total + need <= limit:
            break
        log(f"[data] removing {d} from the remote data cache ({sizes[d] / 1e6:.1f} MB, least recently used)")
        shutil.rmtree(d, ignore_errors=True)
        total -= sizes[d]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
