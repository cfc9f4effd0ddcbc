"""Data: small generated corpora, `python -m train prepare` as a user runs it, a directory's bytes."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

from helpers.jobs import LAUNCH_TIMEOUT, REPO, TINY, job_env

__all__ = ["write_docs", "prepare_cli", "dir_bytes"]


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
