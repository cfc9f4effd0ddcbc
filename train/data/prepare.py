"""``python -m train prepare --out DIR SOURCE...``: tokenize raw sources into token shards once.

Streams the rows (never the whole corpus in memory), tokenizes chunks of them in worker
processes (each running the `tokenizers` library's ``encode_batch`` on one core) and writes
shards in input order, so the bytes depend on the input and the tokenizer alone - not on the
number of workers or on chunk sizes (shards close at the first document end that fills
``data.shard_tokens``). Each shard is written under a temporary name and renamed, then its
``.json`` is written; ``manifest.json`` comes last. A killed prepare so leaves only finished
shards, and running it again skips the input rows they hold and continues.

A raw ``DATASET`` is prepared the same way into a cache (``open_source``), once per node (or
once on shared storage: the cache entry is built under a file lock, the others wait).
"""

from __future__ import annotations

import fcntl
import hashlib
import multiprocessing
import os
import re
import shutil
import signal
import sys
import time
from collections import deque
from contextlib import contextmanager, nullcontext
from itertools import chain, islice
from pathlib import Path

import numpy as np

from train.config import ConfigError, DataConfig
from train.data import chat
from train.data import sources as src
from train.data.shards import (DOCS, FORMAT, MANIFEST, MASK, TOKENS, Corpus, arrays_spec, is_prepared, looks_unfinished, shard_name,
                     token_dtype, tokenizer_fingerprint, write_json)

PROGRESS = "prepare.json"  # what an unfinished prepare is preparing: a rerun continues only the same job
CHUNK_CHARS = 1 << 20  # text per task sent to a worker: large enough that the pipes cost little


# -- worker side (imports numpy and tokenizers only) ---------------------------------------------
_TOK = None


def _init_worker(tokenizer_json: str, eos: int, dtype: str) -> None:
    # One core per worker: the pool is the parallelism, so rayon inside each worker stays off.
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    global _TOK
    _TOK = (Tokenizer.from_str(tokenizer_json), eos, np.dtype(dtype))


def _encode(texts: list) -> tuple[np.ndarray, np.ndarray]:
    """(tokens of the chunk's documents, EOS after each; tokens per input row, 0 for a blank row)."""
    tok, eos, dtype = _TOK
    kept = [i for i, t in enumerate(texts) if t and t.strip()]
    lengths = np.zeros(len(texts), dtype=np.int64)
    if not kept:
        return np.zeros(0, dtype), lengths
    encs = tok.encode_batch([texts[i] for i in kept], add_special_tokens=False)
    ids: list[int] = []
    for i, e in zip(kept, encs):
        ids.extend(e.ids)
        ids.append(eos)
        lengths[i] = len(e.ids) + 1
    return np.array(ids, dtype=dtype), lengths


# -- writing shards -------------------------------------------------------------------------------
class ShardWriter:
    def __init__(self, out: Path, dtype: str, shard_tokens: int, done: list[dict], mask: bool = False):
        self.out, self.dtype, self.shard_tokens, self.with_mask = out, np.dtype(dtype), shard_tokens, mask
        self.done = done  # finished shards' metadata, in order
        self.rows = done[-1]["rows_end"] if done else 0
        self._open()

    def _open(self) -> None:
        name = shard_name(len(self.done))
        self.name, self.fill, self.docs_written, self.masked = name, 0, 0, 0
        self.files = {key: open(self.out / f".tmp-{name}{spec['suffix']}", "wb")
                      for key, spec in arrays_spec(self.dtype.str, self.with_mask).items()}
        self.hashes = {key: hashlib.sha256() for key in self.files}

    def _write(self, key: str, arr: np.ndarray) -> None:
        b = arr.tobytes()
        self.files[key].write(b)
        self.hashes[key].update(b)

    def add(self, tokens: np.ndarray, lengths: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Append one chunk's rows (and their loss mask, chat data); close a shard at the first row
        whose end fills it."""
        pos, tok_off = 0, 0
        while pos < len(lengths):
            cs = np.cumsum(lengths[pos:])
            room = self.shard_tokens - self.fill
            j = int(np.searchsorted(cs, room, side="left"))  # the row that fills the shard, if any
            take = min(j + 1, len(cs))
            n_tok = int(cs[take - 1])
            self._write(TOKENS, tokens[tok_off:tok_off + n_tok])
            if self.with_mask:
                self._write(MASK, mask[tok_off:tok_off + n_tok].astype("|u1"))
                self.masked += int(mask[tok_off:tok_off + n_tok].sum())
            ends = self.fill + cs[:take][lengths[pos:pos + take] > 0]
            self._write(DOCS, ends.astype("<i8"))
            self.fill += n_tok
            self.docs_written += len(ends)
            self.rows += take
            pos, tok_off = pos + take, tok_off + n_tok
            _failpoint(self)
            if self.fill >= self.shard_tokens:
                self.close_shard()
                self._open()

    def close_shard(self) -> None:
        for key, f in self.files.items():
            f.flush()
            os.fsync(f.fileno())
            f.close()
            suffix = arrays_spec(self.dtype.str, self.with_mask)[key]["suffix"]
            os.replace(self.out / f".tmp-{self.name}{suffix}", self.out / f"{self.name}{suffix}")
        meta = {"name": self.name, "tokens": self.fill, "documents": self.docs_written, "rows_end": self.rows,
                "sha256": {k: h.hexdigest() for k, h in self.hashes.items()},
                **({"masked": self.masked} if self.with_mask else {})}
        write_json(self.out / f"{self.name}.json", meta)  # the shard counts as written from here
        self.done.append(meta)


    def finish(self) -> None:
        if self.fill:
            self.close_shard()
        else:
            for key, f in self.files.items():
                f.close()
                os.unlink(f.name)


def _failpoint(writer: ShardWriter) -> None:
    """TRAIN_FAILPOINTS=prepare_kill_after=N: SIGKILL this process once N shards are written and
    the next one is partly on disk (tests: a prepare killed mid-way, then continued)."""
    spec = dict(p.split("=", 1) for p in os.environ.get("TRAIN_FAILPOINTS", "").split(",") if "=" in p)
    if spec.get("prepare_kill_after") == str(len(writer.done)) and writer.fill:
        for f in writer.files.values():
            f.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def _finished_shards(out: Path) -> list[dict]:
    """The shards a previous run finished (in order), after removing everything else it left."""
    import json

    done = []
    while (out / f"{shard_name(len(done))}.json").is_file():
        done.append(json.loads((out / f"{shard_name(len(done))}.json").read_text()))
    keep = {f"{d['name']}{s}" for d in done for s in (".json", ".tokens", ".docs", ".mask")} | {PROGRESS}
    for f in out.iterdir():
        if f.name not in keep and (f.name.startswith((".tmp-", "shard-"))):
            f.unlink()  # a half-written shard, or arrays renamed before their .json was written
    return done


def _chunks(texts, max_chars: int = CHUNK_CHARS):
    buf, size = [], 0
    for t in texts:
        buf.append(t)
        size += len(t) if t else 1
        if size >= max_chars:
            yield buf
            buf, size = [], 0
    if buf:
        yield buf


def default_workers() -> int:
    # The CPUs this process may run on (its affinity); the launcher passes its cgroup-aware count.
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def prepare(sources: list[str], out: str | Path, tokenizer, cfg: DataConfig, workers: int = 0,
            log=print) -> Corpus:
    """Tokenize ``sources`` (in order, as one corpus) into ``out``; continue an unfinished run."""
    import json

    out = Path(out)
    fps = [src.fingerprint(s, cfg.dataset_config, cfg.split) for s in sources]
    tok_fp = tokenizer_fingerprint(tokenizer)
    dtype = token_dtype(tok_fp["vocab_size"])
    template = chat_template_for(sources, cfg, tokenizer)
    job = {"format": FORMAT, "sources": fps, "tokenizer": tok_fp, "text_field": cfg.text_field,
           "shard_tokens": cfg.shard_tokens, "dtype": dtype,
           **({"chat_template": template.sha256} if template else {})}
    if is_prepared(out):
        manifest = json.loads((out / MANIFEST).read_text())
        if {k: manifest.get(k) for k in job} == job:
            return Corpus(out)
        raise ConfigError(f"--out {str(out)!r} already holds a prepared corpus of other sources or another tokenizer; "
                          "use another directory, or delete it")
    out.mkdir(parents=True, exist_ok=True)
    if (out / PROGRESS).is_file():
        if json.loads((out / PROGRESS).read_text()) != job:
            raise ConfigError(f"--out {str(out)!r} holds an unfinished prepare of other sources or another tokenizer; "
                              "use another directory, or delete it")
    elif any(out.iterdir()):
        raise ConfigError(f"--out {str(out)!r} is not empty and holds no prepared corpus; use a new directory")
    write_json(out / PROGRESS, job)
    done = _finished_shards(out)
    writer = ShardWriter(out, dtype, cfg.shard_tokens, done, mask=template is not None)
    skip = writer.rows
    if template is not None:
        texts = chain.from_iterable(chat.iter_conversations(s, cfg) for s in sources)
    else:
        texts = chain.from_iterable(src.iter_texts(s, cfg.text_field, cfg.dataset_config, cfg.split, cfg.cache_dir)
                                    for s in sources)
    if skip:
        log(f"[prepare] continuing {out}: {len(done)} shard(s) done, skipping their {skip} input rows")
        # A skipped row is read, not tokenized; islice consumes without holding them.
        next(islice(texts, skip - 1, skip), None)
    workers = max(1, workers or default_workers())
    t0, last = time.monotonic(), time.monotonic()
    tokens0 = sum(d["tokens"] for d in done)
    args = (tokenizer.backend_tokenizer.to_str(), tok_fp["eos"], dtype)
    with (nullcontext(None) if template is not None else _encoder(workers, args)) as encode:
        # Conversations render through transformers' Jinja in this process (fine-tuning sets are small).
        chunks = (_chat_chunks(texts, tokenizer, template, tok_fp["eos"], dtype) if template is not None
                  else encode(_chunks(texts)))
        for toks, lengths, *mask in chunks:
            writer.add(toks, lengths, *mask)
            if time.monotonic() - last > 10:
                n = sum(d["tokens"] for d in writer.done) + writer.fill - tokens0
                log(f"[prepare] {n:,} tokens ({n / (time.monotonic() - t0):,.0f}/s), {writer.rows:,} rows")
                last = time.monotonic()
    writer.finish()
    shards = writer.done
    total = sum(d["tokens"] for d in shards)
    if template is not None and not any(d.get("masked", 0) for d in shards):
        raise ConfigError(f"chat data {', '.join(repr(s) for s in sources)}: {template.name} leaves no assistant "
                          "tokens to learn in any conversation (is there an assistant message?)")
    if total == 0:
        names = ", ".join(repr(s) for s in sources)
        raise ConfigError(f"dataset {names} has no text in column {cfg.text_field!r} (every row is empty)")
    manifest = {**job, "arrays": arrays_spec(dtype, template is not None), "tokens": total, "documents": sum(d["documents"] for d in shards),
                "rows": writer.rows, "shards": shards}
    write_json(out / MANIFEST, manifest)  # last: from here the directory is a prepared corpus
    for d in shards:
        (out / f"{d['name']}.json").unlink()
    (out / PROGRESS).unlink()
    return Corpus(out)


def _chat_chunks(rows, tokenizer, template, eos: int, dtype: str, size: int = 256):
    for chunk in iter(lambda: list(islice(rows, size)), []):
        toks, lengths, mask = chat.encode_rows(chunk, tokenizer, template, eos)
        yield toks.astype(dtype), lengths, mask


@contextmanager
def _encoder(workers: int, init_args: tuple):
    """A function mapping chunks to encoded chunks in order, with at most 2 tasks per worker in
    flight (Pool.imap would read the whole input ahead). A worker that dies (OOM kill) fails the
    prepare with BrokenProcessPool instead of hanging it; a rerun continues."""
    if workers == 1:
        _init_worker(*init_args)
        yield lambda chunks: map(_encode, chunks)
        return
    from concurrent.futures import ProcessPoolExecutor

    # spawn: no fork of a process that holds threads (torch, rayon)
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                               initargs=init_args)

    def run(chunks):
        pending: deque = deque()
        for c in chunks:
            pending.append(pool.submit(_encode, c))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    try:
        yield run
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# -- the cache for raw DATASETs --------------------------------------------------------------------
def cache_root(cfg: DataConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir) / "prepared"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "train" / "prepared"


def chat_template_for(sources: list[str], cfg: DataConfig, tokenizer):
    """The chat template when the sources are chat data (data.format), else None: all or none."""
    kinds = [chat.is_chat_source(s, cfg) for s in sources]
    if any(kinds) and not all(kinds):
        raise ConfigError(f"sources {', '.join(repr(s) for s in sources)} mix chat and text data; prepare them apart")
    return chat.resolve_template(cfg, tokenizer) if all(kinds) and kinds else None


def cache_entry(name: str, cfg: DataConfig, tokenizer) -> Path:
    import json

    template = chat_template_for([name], cfg, tokenizer)
    key = json.dumps([FORMAT, src.fingerprint(name, cfg.dataset_config, cfg.split), cfg.text_field,
                      cfg.shard_tokens, tokenizer_fingerprint(tokenizer),
                      *([template.sha256] if template else [])], sort_keys=True)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(name.rstrip("/")).name or name)[:40]
    return cache_root(cfg) / f"{slug}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


@contextmanager
def _locked(path: Path, log):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"[data] waiting for another process preparing {path.with_suffix('')}")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def open_source(name: str, cfg: DataConfig, tokenizer, what: str = "DATASET", workers: int = 0,
                log=print) -> Corpus:
    """A prepared corpus for ``name``: a prepared directory as it is, checked against the run's
    tokenizer, or a raw source prepared into the cache on first use (under a lock). A prepared
    directory at an object store URL is fetched into the node's cache first (train/data/remote.py)."""
    from train.storage import is_remote

    if is_remote(name):
        from train.data.remote import fetch_corpus

        corpus = Corpus(fetch_corpus(name, cfg, what, log), what)
        corpus.check_tokenizer(tokenizer_fingerprint(tokenizer), f"tokenizer {tokenizer.name_or_path!r}")
        return corpus
    p = Path(name)
    if is_prepared(p):
        corpus = Corpus(p, what)
        corpus.check_tokenizer(tokenizer_fingerprint(tokenizer), f"tokenizer {tokenizer.name_or_path!r}")
        return corpus
    if looks_unfinished(p):
        raise ConfigError(f"{what}={name!r} is an unfinished prepare (no {MANIFEST}); run `python -m train prepare "
                          f"--out {name} SOURCE...` again to finish it")
    entry = cache_entry(name, cfg, tokenizer)
    if not is_prepared(entry):
        with _locked(entry.with_name(entry.name + ".lock"), log):
            if not is_prepared(entry):
                t0 = time.monotonic()
                log(f"[data] preparing {what}={name!r} into {entry} (once; later runs read the shards)")
                try:
                    c = prepare([name], entry, tokenizer, cfg, workers, log)
                except ConfigError:
                    shutil.rmtree(entry, ignore_errors=True)  # bad input: nothing to continue later
                    raise
                log(f"[data] prepared {c.num_tokens:,} tokens, {c.num_documents:,} documents in "
                    f"{time.monotonic() - t0:.1f} s")
    return Corpus(entry, what)


def main(argv: list[str]) -> None:
    """``prepare --out DIR SOURCE... [key=value ...]``: settings as for training (MODEL/TOKENIZER,
    data.text_field, data.shard_tokens, data.prepare_workers, ...)."""
    from train.config import load_config
    from train.worker.model import load_tokenizer

    usage = ("usage: python -m train prepare --out DIR SOURCE... [key=value ...]; SOURCE is anything DATASET accepts "
             "(file, directory, hub id, builtin:tiny-stories); MODEL/TOKENIZER choose the tokenizer (docs/data.md)")
    if any(a in ("-h", "--help") for a in argv):
        print(usage)
        return
    out, sources, overrides = None, [], []
    it = iter(argv)
    for a in it:
        if a in ("--out", "-o"):
            out = next(it, None)
        elif a.startswith("--out="):
            out = a.split("=", 1)[1]
        elif "=" in a and not Path(a).exists():
            overrides.append(a)
        else:
            sources.append(a)
    if not out or not sources:
        raise ConfigError(usage)
    cfg = load_config(overrides)
    tokenizer = load_tokenizer(cfg.model)
    t0 = time.monotonic()
    c = prepare(sources, out, tokenizer, cfg.data, cfg.data.prepare_workers)
    took = time.monotonic() - t0
    size = sum(f.stat().st_size for f in Path(out).iterdir())
    learned = sum(d.get("masked", 0) for d in c.shards)
    chat = f" (conversations: {learned:,} assistant tokens to learn)" if c.has_mask else ""
    print(f"[prepare] {out}: {c.num_tokens:,} tokens, {c.num_documents:,} documents{chat}, {len(c.shards)} shard(s), "
          f"{c.dtype[1:]}, {size / 1e6:,.1f} MB on disk ({size / max(c.num_tokens, 1):.2f} MB per million "
          f"tokens), {took:.1f} s ({c.num_tokens / max(took, 1e-9):,.0f} tokens/s)", flush=True)
    sys.stdout.flush()
