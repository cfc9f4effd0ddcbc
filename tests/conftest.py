"""Shared helpers: start real training jobs (real processes, real gloo process groups)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAUNCH_TIMEOUT = 420  # every launch has a bound: 2-process gloo runs can hang (MACHINE-NOTES)

# Small and fast: ~0.2M-parameter model, 32-token blocks, 2 ranks x 4 sequences.
TINY = {"MODEL": "llama-debug", "SEQ_LEN": "32", "MICRO_BATCH": "4", "LOG_EVERY": "1",
        "DEVICE": "cpu", "NPROC": "2", "train.eval_every": "0", "train.eval_batches": "2",
        "log.tensorboard": "false", "optim.warmup_steps": "2"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions"))
    env["PYTHONUNBUFFERED"] = "1"
    env["HF_HUB_OFFLINE"] = "1"
    env.update(extra or {})
    return env


def args_for(output_dir: Path, **overrides) -> list[str]:
    settings = {**TINY, "OUTPUT_DIR": str(output_dir), "MASTER_PORT": str(free_port())}
    settings.update({k: str(v) for k, v in overrides.items()})
    return [f"{k}={v}" for k, v in settings.items()]


def train(output_dir: Path, *, env: dict | None = None, check: bool = True, timeout: int = LAUNCH_TIMEOUT,
          **overrides) -> subprocess.CompletedProcess:
    """Run `python -m train` to completion (the same command `make train` runs)."""
    cmd = [sys.executable, "-m", "train", *args_for(output_dir, **overrides)]
    p = subprocess.run(cmd, cwd=REPO, env=job_env(env), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}\n--- stdout\n{p.stdout[-4000:]}\n"
                             f"--- stderr\n{p.stderr[-8000:]}")
    return p


def start(output_dir: Path, *, env: dict | None = None, **overrides) -> subprocess.Popen:
    """Start a job in its own session (so a test can kill the whole tree, like a node dying).
    Output goes to a file, not a pipe: an unread pipe fills up and blocks the job."""
    cmd = [sys.executable, "-m", "train", *args_for(output_dir, **overrides)]
    log = Path(output_dir).parent / f"{Path(output_dir).name}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=job_env(env), stdout=f, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
    proc.log_path = log
    return proc


def output(proc: subprocess.Popen) -> str:
    return proc.log_path.read_text()


def kill_tree(p: subprocess.Popen, sig=signal.SIGKILL) -> None:
    """Signal the job and all its processes (torchrun starts each worker in its own session)."""
    import psutil

    try:
        procs = [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        try:
            proc.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def wait_for_step(output_dir: Path, step: int, proc: subprocess.Popen, timeout: float = LAUNCH_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(r["step"] >= step and "loss" in r for r in read_metrics(output_dir, raw=True)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"job exited {proc.returncode} before step {step}:\n{_tail(proc)}")
        time.sleep(0.05)
    kill_tree(proc)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def _tail(proc) -> str:
    if getattr(proc, "log_path", None):
        return output(proc)[-6000:]
    return proc.stdout.read()[-6000:] if proc.stdout else ""


def read_metrics(output_dir: Path, raw: bool = False) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line being written while we read
            continue
    return rows if raw else [r for r in rows if "loss" in r]


def losses(output_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(output_dir)]


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO
