"""One storage layer for OUTPUT_DIR and prepared data: a local directory or an object store URL.

Local paths stay ``pathlib.Path``. A URL (``s3://bucket/prefix``, ``gs://...``, any fsspec protocol
whose package is installed) becomes a ``RemotePath``: the few ``Path`` methods the checkpoint code
calls (``/``, ``name``, ``parent``, ``is_file``, ``is_dir``, ``iterdir``, ``read_text``,
``write_text``, ``exists``), over fsspec. So ``train/checkpoint/`` has one code path with one commit
rule - a checkpoint counts only once its manifest exists, and the manifest is written last:

- local: files go to a temporary directory, the manifest is fsynced, the directory is renamed;
- object store (no rename): files are written to node-local scratch (libraries need a real
  directory), uploaded to the final keys of the checkpoint's directory, every object's size is
  confirmed by one listing, and only then is the manifest written. A kill at any point before
  that leaves a directory without a manifest, which resume ignores and the next save removes.

Credentials come only from where the client library looks (AWS_* variables, AWS_ENDPOINT_URL for
a custom endpoint, ~/.aws, instance or workload identity, a mounted secret file); no setting holds
one, and nothing here prints a request's headers or the client's configuration.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

from train.config import ConfigError

# Protocol -> the package that provides it (named in the refusal when it is missing).
PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}
_URL = re.compile(r"^([a-z][a-z0-9+.-]*)://")


def is_remote(location: str | os.PathLike | RemotePath) -> bool:
    if isinstance(location, RemotePath):
        return True
    m = _URL.match(str(location))
    return bool(m) and m.group(1) != "file"


def filesystem(url: str):
    """(fsspec filesystem, path without the protocol) for ``url``; one refusal line when the
    protocol's package is missing. Listings are never cached: another gang's or node's writes
    must show at the next look (S3 is strongly consistent; a cached listing is not)."""
    import fsspec

    protocol = _URL.match(url).group(1)
    try:
        cls = fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError) as e:
        package = PACKAGES.get(protocol)
        hint = f"install {package} (pip install {package})" if package else "no fsspec filesystem handles it"
        raise ConfigError(f"{url!r}: the {protocol}:// protocol is not available here; {hint} ({e})") from None
    options = {"use_listings_cache": False} if protocol in ("s3", "s3a") else {}
    fs = cls(skip_instance_cache=True, **options)  # credentials as the environment has them now
    return fs, cls._strip_protocol(url)


class RemotePath:
    """An object-store location with the slice of the ``pathlib.Path`` interface the checkpoint
    code uses. Directories are key prefixes: one "exists" as soon as any key lies under it."""

    def __init__(self, url: str):
        m = _URL.match(url)
        self.protocol = m.group(1)
        self.key = url[m.end():].strip("/")  # bucket/prefix/...
        self._fs = None

    @property
    def fs(self):
        if self._fs is None:
            self._fs, _ = filesystem(str(self))
        return self._fs

    def __str__(self) -> str:
        return f"{self.protocol}://{self.key}"

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, RemotePath) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __truediv__(self, part: str) -> RemotePath:
        child = RemotePath(f"{self}/{str(part).strip('/')}")
        child._fs = self._fs
        return child

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def parent(self) -> RemotePath:
        p = RemotePath(f"{self.protocol}://{self.key.rsplit('/', 1)[0]}")
        p._fs = self._fs
        return p

    @property
    def bucket(self) -> str:
        return self.key.split("/", 1)[0]

    def is_file(self) -> bool:
        return self.fs.isfile(self.key)

    def is_dir(self) -> bool:
        return self.fs.isdir(self.key)

    def exists(self) -> bool:
        return self.fs.exists(self.key)

    def iterdir(self) -> Iterator[RemotePath]:
        try:
            names = self.fs.ls(self.key, detail=False)
        except FileNotFoundError:
            return iter(())
        return iter([self / n.rstrip("/").rsplit("/", 1)[-1] for n in names if n.rstrip("/") != self.key])

    def read_bytes(self) -> bytes:
        return self.fs.cat_file(self.key)

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> None:
        self.fs.pipe_file(self.key, data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.rm_file(self.key)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def sizes(self) -> dict[str, int]:
        """Every object under this prefix, relative name -> size, in one listing."""
        try:
            found = self.fs.find(self.key, detail=True)
        except FileNotFoundError:
            return {}
        return {k[len(self.key) + 1:]: int(v["size"]) for k, v in found.items() if v.get("type") != "directory"}

    def rmtree(self) -> None:
        try:
            self.fs.rm(self.key, recursive=True)
        except FileNotFoundError:
            pass


def location(text: str | os.PathLike) -> Path | RemotePath:
    """A setting's value as a location: a RemotePath for a URL, else a Path."""
    return RemotePath(str(text)) if is_remote(text) else Path(text)


# -- node-local scratch for a remote OUTPUT_DIR -------------------------------------------------
def scratch_root(setting: str = "") -> Path:
    return Path(setting) if setting else Path(tempfile.gettempdir()) / "train-scratch"


def local_dir(output_dir: str, scratch: str = "") -> Path:
    """Where this node keeps what needs a real directory: OUTPUT_DIR itself when it is local; for a
    URL, a directory of the node's scratch named after it (checkpoints before upload, downloads
    for a resume, hang dumps, profiles, tracker files, the metrics file before its upload)."""
    if not is_remote(output_dir):
        return Path(output_dir)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", output_dir.split("://", 1)[1])[-60:]
    return scratch_root(scratch) / f"{slug}-{hashlib.sha256(output_dir.encode()).hexdigest()[:8]}"


# -- moving files ------------------------------------------------------------------------------
def local_files(root: Path) -> dict[str, int]:
    return {str(f.relative_to(root)): f.stat().st_size for f in sorted(root.rglob("*")) if f.is_file()}


def upload(src: Path, dest: RemotePath, on_file: Callable[[int], None] | None = None) -> dict[str, int]:
    """Every file under ``src`` to the same relative key under ``dest``; returns name -> size.
    ``on_file(n)`` is called after the n-th upload (the tests' kill-mid-upload failpoint)."""
    files = local_files(src)
    for n, rel in enumerate(files, 1):
        dest.fs.put_file(str(src / rel), f"{dest.key}/{rel}")
        if on_file is not None:
            on_file(n)
    return files


def verify(dest: RemotePath, expected: dict[str, int]) -> None:
    """Every expected object is there with its size (one listing), or RuntimeError naming the first
    that is not: the manifest is written only after this passes."""
    found = dest.sizes()
    for rel, size in expected.items():
        if found.get(rel) != size:
            state = "missing" if rel not in found else f"{found[rel]} bytes"
            raise RuntimeError(f"upload to {dest} is incomplete: {rel} is {state}, expected {size} bytes")


def download(src: RemotePath, dest: Path, expected: dict[str, int]) -> None:
    """``expected`` (name -> size) from ``src`` into ``dest``, each file checked for its size;
    files already there with the right size are kept (a restart does not fetch them again)."""
    dest.mkdir(parents=True, exist_ok=True)
    for rel, size in expected.items():
        target = dest / rel
        if target.is_file() and target.stat().st_size == size:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(f".part-{target.name}")
        src.fs.get_file(f"{src.key}/{rel}", str(part))
        if part.stat().st_size != size:
            raise RuntimeError(f"download of {src}/{rel} gave {part.stat().st_size} bytes, expected {size}")
        os.replace(part, target)


def mirror(local: Path, dest: Path | RemotePath, names: Iterable[str]) -> None:
    """Copy the named files of a local directory up to a remote one (no-op for a local OUTPUT_DIR,
    where they already are). Whole-object PUTs: a reader sees the old or the new file."""
    if not isinstance(dest, RemotePath):
        return
    for name in names:
        if (local / name).is_file():
            dest.fs.put_file(str(local / name), f"{dest.key}/{name}")


# -- conditional writes (the run lock on object storage, train/checkpoint/lock.py) --------------
class PreconditionFailed(Exception):
    """A conditional write lost: the object changed (If-Match) or already exists (If-None-Match)."""


def read_with_tag(path: RemotePath) -> tuple[bytes | None, str | None]:
    """(content, ETag) of an object, or (None, None) when it does not exist."""
    try:
        info = path.fs.info(path.key)
        return path.fs.cat_file(path.key), info.get("ETag")
    except FileNotFoundError:
        return None, None


def write_if(path: RemotePath, data: bytes, etag: str | None) -> None:
    """PUT that succeeds only if the object still has ``etag`` (If-Match), or, with None, does not
    exist yet (If-None-Match: *). S3 has honoured both since 2024; moto's server implements them."""
    try:
        if etag is None:
            path.fs.pipe_file(path.key, data, mode="create")
        else:
            path.fs.pipe_file(path.key, data, IfMatch=etag)
    except Exception as e:  # s3fs maps the 412 to OSError(EINVAL) or FileExistsError, the cause holds the code
        said = f"{e!r} {e.__cause__!r}"
        if isinstance(e, FileExistsError) or "PreconditionFailed" in said or "pre-conditions" in said:
            raise PreconditionFailed(str(path)) from None
        raise


# -- can this node use a location? -----------------------------------------------------------
def probe(url: str, what: str = "OUTPUT_DIR") -> str | None:
    """Write, read back and delete a small object under ``url``; None if all three work, else one
    line naming the step that failed and why (no credentials, no request dump). For the launcher's
    check before any process starts and for preflight on every node."""
    import socket
    import uuid

    if not is_remote(url):
        raise ValueError("probe is for object-store URLs")
    root = RemotePath(url)
    try:
        fs = root.fs
    except ConfigError as e:
        return str(e)
    key = f"{root.key}/.probe-{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
    step = "write"
    try:
        if not fs.exists(root.bucket):
            return f"{what}={url!r}: bucket {root.bucket!r} does not exist (or these credentials cannot see it)"
        fs.pipe_file(key, b"probe")
        step = "read"
        if fs.cat_file(key) != b"probe":
            return f"{what}={url!r}: an object written here read back different"
        step = "delete"
        fs.rm_file(key)
    except Exception as e:  # noqa: BLE001 - the one line is the point; the client's type is noise
        return f"{what}={url!r}: cannot {step} objects there ({reason(e)})"
    return None


def reason(e: BaseException) -> str:
    """One line of why a request failed (access denied named as such), without the request dump."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        return f"access denied: {text}"
    return text[:300]


def work_dir(cfg) -> Path:
    """The run's local directory on this node (``local_dir`` of OUTPUT_DIR with checkpoint.scratch_dir)."""
    return local_dir(cfg.output_dir, cfg.checkpoint.scratch_dir)
