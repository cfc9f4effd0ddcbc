"""Starting real training jobs and reading what they leave: train, start, kill_tree, wait_for_step,
read_metrics, the worker processes of a run, and the two-node emulation."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

# No test reaches the Hugging Face hub (this machine and CI cannot). huggingface_hub reads this
# once, when first imported: set it before anything imports it in this process (a later
# in-process launch would retry the network for ~40 s instead of failing offline at once), and
# every job a test starts inherits it (job_env).
os.environ["HF_HUB_OFFLINE"] = "1"
from train.launcher.nodes import LAUNCHER_SCRUB_VARS  # noqa: E402

REPO = Path(__file__).resolve().parents[2]  # tests/helpers/jobs.py -> the checkout
LAUNCH_TIMEOUT = 420  # every launch has a bound: 2-process gloo runs can hang (docs/cpu-distributed.md)

# Small and fast: ~0.2M-parameter model, 32-token blocks, 2 ranks x 4 sequences.
TINY = {"MODEL": "llama-debug", "SEQ_LEN": "32", "MICRO_BATCH": "4", "LOG_EVERY": "1",
        "DEVICE": "cpu", "NPROC": "2", "train.eval_every": "0", "train.eval_tokens": "512",
        "TRACKERS": "none", "optim.warmup_steps": "2"}


def shape_of(*overrides: str):
    """(run config, the planner's model shape) for these overrides, as ``python -m train plan`` sees them."""
    from train.config import load_config
    from train.memory import model_shape
    from train.worker.model import load_model_config

    cfg = load_config(list(overrides))
    return cfg, model_shape(load_model_config(cfg), cfg.model.name)


# -- training jobs ------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_env(extra: dict | None = None) -> dict:
    """This environment without a surrounding job's rank variables (the launcher's own list) or
    master address: a test's job is a job of its own on this machine."""
    env = {k: v for k, v in os.environ.items() if k not in (*LAUNCHER_SCRUB_VARS, "MASTER_ADDR")}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions"))
    env["PYTHONUNBUFFERED"] = "1"
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


def command(*args: str, env: dict | None = None, timeout: int = LAUNCH_TIMEOUT) -> subprocess.CompletedProcess:
    """`python -m train ARGS...` as typed (a command other than a run: verify, env, ...), to completion."""
    return subprocess.run([sys.executable, "-m", "train", *args], cwd=REPO, env=job_env(env), capture_output=True,
                          text=True, timeout=timeout)


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


# -- a job's worker processes and the 2-node emulation (test_hang, test_restart, test_faults)
def workers_of(output_dir: Path) -> list[psutil.Process]:
    """Every live worker process of the run writing to ``output_dir`` (wherever it was re-parented)."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        cmd = p.info["cmdline"] or []
        is_worker = any(a == "train" and b == "worker" for a, b in zip(cmd, cmd[1:]))
        if not is_worker or "train.launcher.agent" in cmd or p.info["status"] == psutil.STATUS_ZOMBIE:
            continue  # the agent's command line holds the workers' command too
        try:
            mine = f"OUTPUT_DIR={output_dir}" in cmd or p.environ().get("OUTPUT_DIR") == str(output_dir)
        except psutil.Error:
            continue
        if mine:
            found.append(p)
    return found


def peak_rss(pid: int) -> int:
    """The process's peak resident set size so far (VmHWM), in bytes; 0 once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    found = [ln.split()[1] for ln in status.splitlines() if ln.startswith("VmHWM:")]
    return int(found[0]) * 1024 if found else 0


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
