"""Data: small generated corpora, `python -m train prepare` as a user runs it, a directory's bytes."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

from helpers.jobs import LAUNCH_TIMEOUT, REPO, TINY, job_env

__all__ = ["write_docs", "prepare_cli", "dir_bytes", "write_prepared"]


def write_docs(path: Path, n: int, seed: int = 0, tag: str = "") -> list[str]:
    """``n`` one-line documents of varied length (a text file: one document per line)."""
    rng = random.Random(seed)
    words = ["cat", "dog", "sat", "on", "the", "mat", "and", "looked", "at", "a", "bird", "red", "ball", "ran"]
    docs = [f"{tag}doc {i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(3, 40))) + "." for i in range(n)]
    path.write_text("\n".join(docs) + "\n")
    return docs


def prepare_cli(out: Path, *sources, env: dict | None = None, check: bool = True,
                **settings) -> subprocess.CompletedProcess:
    """`python -m train prepare --out OUT SOURCE... key=value` (what `make prepare` runs)."""
    cmd = [sys.executable, "-m", "train", "prepare", "--out", str(out), *map(str, sources),
           *(f"{k}={v}" for k, v in {"MODEL": TINY["MODEL"], **settings}.items())]
    p = subprocess.run(cmd, cwd=REPO, env=job_env(env), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def dir_bytes(path: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(Path(path).iterdir())}


def write_prepared(out: Path, docs: list[list[int]], tokenizer) -> Path:
    """A prepared directory holding exactly these documents (token ids, EOS included), written by
    the prepare's own shard writer: tests that need documents of chosen lengths."""
    import numpy as np

    from train.data.prepare import ShardWriter
    from train.data.shards import FORMAT, MANIFEST, arrays_spec, token_dtype, tokenizer_fingerprint, write_json

    fp = tokenizer_fingerprint(tokenizer)
    dtype = token_dtype(fp["vocab_size"])
    out.mkdir(parents=True)
    writer = ShardWriter(out, dtype, 1 << 30, [])
    writer.add(np.concatenate([np.asarray(d) for d in docs]).astype(dtype), np.array([len(d) for d in docs]))
    writer.finish()
    total = sum(len(d) for d in docs)
    write_json(out / MANIFEST, {"format": FORMAT, "sources": [], "tokenizer": fp, "text_field": "text",
                                "shard_tokens": 1 << 30, "dtype": dtype, "arrays": arrays_spec(dtype), "tokens": total,
                                "documents": len(docs), "rows": len(docs), "shards": writer.done})
    for d in writer.done:
        (out / f"{d['name']}.json").unlink()  # as prepare leaves it: the manifest holds the shards' records
    return out
