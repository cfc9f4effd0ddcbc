"""The worker's side of the per-node supervisor (train/launcher/supervisor.py).

Each rank keeps one tiny JSON file in a node-local directory the supervisor passes in
``TRAIN_PROGRESS_DIR``: its pid, last finished step, current phase (setup, data, forward,
collective, checkpoint, eval) and the time. That is the watchdog's whole input, so no
collective is added per step. When a rank ends it also writes how (finished, preempted, a
config error, a crash), which lets the supervisor stop retrying what cannot succeed.

``attach()`` also makes the worker safe to supervise:
- ``PR_SET_PDEATHSIG``: the worker is SIGKILLed when its parent (torchrun's agent) dies, even
  by SIGKILL. torchrun puts workers in sessions of their own, so without this they outlive a
  killed launcher and keep training (and holding GPUs). Checkpoints are tmp-dir + rename, so
  a kill mid-save leaves the previous one as the newest complete checkpoint.
- ``PR_SET_PTRACER``: under Yama ``ptrace_scope=1`` only ancestors may trace a process; the
  supervisor's py-spy is not the worker's ancestor, so the worker names the supervisor (and
  thereby its children) as allowed tracer. No capability is needed for same-uid processes.
Written with ctypes because no maintained library exposes these two prctl calls.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

from train.config import exitcodes
from train.config.exitcodes import FAILED

ENV_DIR = "TRAIN_PROGRESS_DIR"
ENV_SUPERVISOR = "TRAIN_SUPERVISOR_PID"
PR_SET_PDEATHSIG = 1
PR_SET_PTRACER = 0x59616D61  # "Yama"; EINVAL where Yama is not built in, which is fine
FATAL_WAIT_S = 60  # a rank with a config error waits this long for the supervisor to end the job


def attempt(directory: Path | None = None) -> int:
    """Which start of this rank this is: one more than the starts already on file.
    TORCHELASTIC_RESTART_COUNT is not enough: it counts only this node's failures, and the
    agents of the other nodes restart their healthy workers without counting."""
    if directory is not None:
        seen = [int(f.name[1:4]) for f in directory.glob(f"a*-rank{rank():05d}.json")]
        if seen:
            return max(seen) + 1
        return 0
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def record_path(directory: Path, attempt_no: int, rank_no: int) -> Path:
    return directory / f"a{attempt_no:03d}-rank{rank_no:05d}.json"


def outcome_path(directory: Path, attempt_no: int, rank_no: int) -> Path:
    return directory / f"a{attempt_no:03d}-rank{rank_no:05d}.outcome.json"


def _write(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        tmp.write_text(json.dumps(obj))
        os.replace(tmp, path)  # readers never see half a file
    except FileNotFoundError:
        pass  # the supervisor has ended the job and removed the directory; its kill is on the way


class Progress:
    def __init__(self, directory: str | None):
        self.dir = Path(directory) if directory else None
        self.rank, self.attempt = rank(), attempt(self.dir)
        self.state = {"pid": os.getpid(), "rank": self.rank, "local_rank": int(os.environ.get("LOCAL_RANK", "0") or 0),
                      "node": int(os.environ.get("GROUP_RANK", "0") or 0), "host": socket.gethostname(),
                      "attempt": self.attempt, "step": None, "phase": "setup", "t": time.time()}
        self.path = record_path(self.dir, self.attempt, self.rank) if self.dir else None

    def phase(self, name: str, step: int | None = None) -> None:
        if self.path is None:
            return
        if step is not None:
            self.state["step"] = step
        self.state["phase"], self.state["t"] = name, time.time()
        _write(self.path, self.state)

    def outcome(self, status: str, message: str = "") -> None:
        if self.dir is None:
            return
        _write(outcome_path(self.dir, self.attempt, self.rank),
               {"status": status, "message": message, "step": self.state["step"], "t": time.time()})

    def previous_attempts(self) -> list[dict]:
        """What earlier starts of this node's workers reached and how they ended."""
        return [a for a in read_attempts(self.dir) if a["attempt"] < self.attempt] if self.dir else []


_current: Progress | None = None


def current() -> Progress:
    global _current
    if _current is None:
        _current = Progress(os.environ.get(ENV_DIR))
    return _current


def phase(name: str, step: int | None = None) -> None:
    current().phase(name, step)


def attach() -> None:
    """First thing a worker does: die with its parent, let the supervisor trace it, say hello."""
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)
    supervisor = os.environ.get(ENV_SUPERVISOR)
    if supervisor:
        # Started just as the supervisor killed the agent: our parent was gone before prctl.
        if _parent_of(os.getppid()) != int(supervisor):
            os._exit(1)
        libc.prctl(PR_SET_PTRACER, int(supervisor), 0, 0, 0)
    current().phase("setup")


def fatal(code: int, message: str) -> None:
    """An end a restart cannot fix (a config error in a rank, a diverged loss): tell the
    supervisor, which ends the whole job quietly and prints the line last. The rank waits to be
    killed rather than exiting, so torchrun does not restart it meanwhile. Without a supervisor
    (or if it does not act) print the line and exit with ``code``."""
    p = current()
    if p.dir is not None and os.environ.get(ENV_SUPERVISOR):
        p.outcome(exitcodes.name(code), message)
        deadline = time.monotonic() + FATAL_WAIT_S
        while time.monotonic() < deadline:
            time.sleep(0.5)
    print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(code)


def _parent_of(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def crashed(exc: BaseException) -> None:
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    current().outcome(exitcodes.name(FAILED), f"{type(exc).__name__}: {first}")


def finished(code: int) -> None:
    current().outcome(exitcodes.name(code))


# -- the reading side (the supervisor, and rank 0 when it logs a restart) --------------------
def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # vanished or being replaced: read it next time
        return None


def read_attempts(directory: Path) -> list[dict]:
    """Every start of this node's workers, oldest first: {attempt, ranks: {rank: record},
    outcomes: {rank: outcome}}."""
    attempts: dict[int, dict] = {}
    for f in sorted(Path(directory).glob("a*-rank*.json")):
        a, r = f.name.split("-rank")
        n, rk = int(a[1:]), int(r.split(".")[0])
        entry = attempts.setdefault(n, {"attempt": n, "ranks": {}, "outcomes": {}})
        data = _load(f)
        if data is not None:
            entry["outcomes" if f.name.endswith(".outcome.json") else "ranks"][rk] = data
    return [attempts[k] for k in sorted(attempts)]


def failure_of(att: dict) -> tuple[str, int]:
    """(what went wrong, the furthest step reached) for an attempt that ended in a restart.
    A rank that left no outcome was killed from outside (SIGKILL, OOM): it is the cause, the
    others' errors ("connection closed by peer") are its consequence."""
    step = max((r.get("step") or 0 for r in att["ranks"].values()), default=0)
    silent = sorted(set(att["ranks"]) - set(att["outcomes"]))
    if silent:
        return f"rank {silent[0]} died without an error (killed by a signal?)", step
    crashed = [(r, o) for r, o in sorted(att["outcomes"].items()) if o.get("status") == exitcodes.name(FAILED)]
    if crashed:
        return f"rank {crashed[0][0]}: {crashed[0][1].get('message', '')}", step
    return "the workers exited", step


# -- events (rank 0 of a restarted attempt) ---------------------------------------------------
def log_restart(log, to_step: int) -> None:
    """If this start is a restart, one event line in metrics.jsonl (after ``log`` cut it back to
    the checkpoint) and on stdout. ``step`` is the step resumed from, so later cuts keep it."""
    p = current()
    prev = p.previous_attempts()
    if p.attempt == 0 or not prev:
        return
    reason, from_step = failure_of(prev[-1])
    event = {"event": "restart", "reason": reason, "from_step": from_step, "to_step": to_step,
             "attempt": p.attempt, "step": to_step}
    with log.path.open("a") as f:
        f.write(json.dumps(event) + "\n")
    print(f"[event] {json.dumps(event)}", flush=True)


def event_counts(metrics_path: Path) -> dict[str, int]:
    """How many restarts/rollbacks this run's curve went through (for the checkpoint manifest)."""
    counts: dict[str, int] = {}
    if Path(metrics_path).is_file():
        for line in Path(metrics_path).read_text().splitlines():
            try:
                kind = json.loads(line).get("event")
            except ValueError:
                continue
            if kind:
                counts[kind] = counts.get(kind, 0) + 1
    return counts


# Set by the launcher for the workers: what the run asked for, checked against what engaged.
ENV_EXPECTED_WORLD = "TRAIN_EXPECTED_WORLD_SIZE"
ENV_DEVICE = "TRAIN_DEVICE"
