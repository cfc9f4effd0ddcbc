"""Helpers shared by test files: find a job's worker processes, start a node of the 2-node emulation."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import psutil

from conftest import REPO, TINY, job_env


def workers_of(output_dir: Path) -> list[psutil.Process]:
    """Every live worker process of the run writing to ``output_dir`` (wherever it was re-parented)."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        cmd = p.info["cmdline"] or []
        is_worker = any(a == "train" and b == "worker" for a, b in zip(cmd, cmd[1:]))
        if not is_worker or "accelerate.commands.launch" in cmd or p.info["status"] == psutil.STATUS_ZOMBIE:
            continue  # the agent's command line holds the workers' command too
        try:
            mine = f"OUTPUT_DIR={output_dir}" in cmd or p.environ().get("OUTPUT_DIR") == str(output_dir)
        except psutil.Error:
            continue
        if mine:
            found.append(p)
    return found


def worker_pids(output_dir: Path, count: int, timeout: float = 60) -> dict[int, int]:
    """rank -> pid of the run's workers, once ``count`` of them are up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = {}
        for p in workers_of(output_dir):
            try:
                pids[int(p.environ().get("RANK", "-1"))] = p.pid
            except psutil.Error:
                continue
        if len(pids) >= count:
            return pids
        time.sleep(0.2)
    raise AssertionError(f"{count} workers of {output_dir} not found")


def wait_until_gone(output_dir: Path, timeout: float) -> list[psutil.Process]:
    """Poll until no worker of the run is alive; returns the ones still alive at the deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = workers_of(output_dir)
        if not left:
            return []
        time.sleep(0.2)
    return workers_of(output_dir)


NODE_COMMON = {**TINY, "MAX_STEPS": "4", "CHECKPOINT_EVERY": "0", "checkpoint.export": "false"}


def make_train(out, node_rank: int, port: int, env: dict | None = None, **extra) -> subprocess.Popen:
    """`make train NNODES=2 NODE_RANK=i ...` exactly as a user types it on machine i."""
    settings = {**NODE_COMMON, "NPROC": "1", "NNODES": "2", "NODE_RANK": str(node_rank),
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OUTPUT_DIR": str(out), **extra}
    make_vars = [f"{k}={v}" for k, v in settings.items() if "." not in k]
    args = " ".join(f"{k}={v}" for k, v in settings.items() if "." in k)  # dotted keys go through ARGS
    log = Path(str(out) + f"-node{node_rank}.log")
    with open(log, "w") as f:
        proc = subprocess.Popen(["make", "--no-print-directory", "train", *make_vars, f"ARGS={args}"],
                                cwd=REPO, env=job_env(env), stdout=f, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
    proc.log_path = log
    return proc
