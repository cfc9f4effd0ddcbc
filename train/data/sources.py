"""Raw sources: what ``DATASET`` (and ``prepare SOURCE``) accepts, checked, fingerprinted and
streamed as text rows through `datasets` (files, directories, a hub id, the built-in corpus)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterator

from train.config import ConfigError
from train.corpus import BUILTIN_DATASETS

_FILE_BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json", ".json": "json",
                  ".parquet": "parquet", ".csv": "csv"}


def resolve_source(name: str, dataset_config: str = "") -> tuple[str, dict]:
    """(builder or hub id, load_dataset kwargs) for a source, checked for existence."""
    if name.startswith("builtin:"):
        key = name.split(":", 1)[1]
        if key not in BUILTIN_DATASETS:
            raise ConfigError(f"unknown built-in dataset {name!r}; allowed: {', '.join('builtin:' + k for k in BUILTIN_DATASETS)}")
        path = BUILTIN_DATASETS[key]
        return _FILE_BUILDERS[path.suffix.lower()], {"data_files": {"train": str(path)}}
    p = Path(name)
    if p.is_dir():
        files = data_files(p)
        if not files:
            raise ConfigError(f"data directory {name!r} holds no non-empty {'/'.join(sorted(_FILE_BUILDERS))} files")
        for f in files:
            _check_readable(f, f"data file {str(f)!r} (in DATASET={name!r})")
        exts = {_FILE_BUILDERS[f.suffix.lower()] for f in files}
        if len(exts) > 1:
            raise ConfigError(f"data directory {name!r} mixes formats {sorted(exts)}; keep one format per directory")
        return exts.pop(), {"data_files": {"train": [str(f) for f in files]}}
    if p.is_file():
        if p.stat().st_size == 0:
            raise ConfigError(f"data file {name!r} is empty")
        builder = _FILE_BUILDERS.get(p.suffix.lower())
        if builder is None:
            raise ConfigError(f"data file {name!r}: unknown extension; allowed: {', '.join(sorted(_FILE_BUILDERS))}")
        _check_readable(p, f"data file {name!r}")
        return builder, {"data_files": {"train": str(p)}}
    if p.exists():
        raise ConfigError(f"DATASET={name!r} is neither a regular file nor a directory")
    if p.suffix.lower() in _FILE_BUILDERS or name.startswith((".", "/", "~")):
        raise ConfigError(f"data file {name!r} not found")
    return name, {"name": dataset_config or None}  # a hub dataset id


def data_files(p: Path) -> list[Path]:
    return sorted(f for f in p.rglob("*") if f.suffix.lower() in _FILE_BUILDERS and f.is_file() and f.stat().st_size > 0)


def _check_readable(path: Path, what: str) -> None:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise ConfigError(f"{what} cannot be read ({e.strerror or e}); check its permissions") from None


def cannot_load(name: str, local: bool, e: BaseException) -> ConfigError:
    first = (str(e).strip().splitlines() or [""])[0][:200]
    hub = "" if local else "; a hub dataset needs network or a filled cache (HF_HOME), and HF_TOKEN if it is gated"
    return ConfigError(f"dataset {name!r} cannot be loaded ({type(e).__name__}: {first}){hub}")


def fingerprint(name: str, dataset_config: str = "", split: str = "train") -> dict:
    """What identifies a source's content without reading it: each local file's path, size and
    modification time (as make and `datasets` decide staleness), or the hub id, config and split.
    Read on every launch that names a raw source, so it must not cost a pass over the data."""
    builder, kwargs = resolve_source(name, dataset_config)
    if "data_files" not in kwargs:
        return {"source": name, "hub": {"id": name, "config": dataset_config, "split": split}}
    files = kwargs["data_files"]["train"]
    h = hashlib.sha256()
    for f in [files] if isinstance(files, str) else files:
        st = Path(f).stat()
        h.update(json.dumps([str(Path(f).resolve()), st.st_size, st.st_mtime_ns]).encode())
    return {"source": name, "files": len([files] if isinstance(files, str) else files), "sha256": h.hexdigest()[:16]}


def iter_texts(name: str, text_field: str, dataset_config: str = "", split: str = "train",
               cache_dir: str = "") -> Iterator[str | None]:
    """Every row's text, streamed (a hub dataset need not fit in RAM or on disk twice). Rows
    without text (None, blank) are yielded too, so a position in the stream is a row count."""
    import datasets

    datasets.disable_progress_bars()  # the launcher prints one line per problem, not progress noise
    builder, kwargs = resolve_source(name, dataset_config)
    local = "data_files" in kwargs
    try:
        rows = iter(datasets.load_dataset(builder, split="train" if local else split, streaming=True,
                                          cache_dir=cache_dir or None, **kwargs))
        first = next(rows, None)
    except Exception as e:  # noqa: BLE001 - any loader failure is a user-facing config problem
        raise cannot_load(name, local, e) from None
    if first is None:
        raise ConfigError(f"dataset {name!r} is empty")
    if text_field not in first:
        raise ConfigError(f"dataset {name!r} has no column {text_field!r}; columns: {list(first)}; set data.text_field")
    row = first
    n = 0
    while row is not None:
        t = row.get(text_field)
        if t is not None and not isinstance(t, str):
            raise ConfigError(f"dataset {name!r}: column {text_field!r} holds {type(t).__name__} values, not text; "
                              "set data.text_field to a text column")
        yield t
        n += 1
        try:
            row = next(rows, None)
        except Exception as e:  # noqa: BLE001 - e.g. a binary file read as text
            raise cannot_load(name, local, e) from None
