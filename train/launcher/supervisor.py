"""One supervisor per node: the parent of torchrun's elastic agent for the whole run.

It spawns the agent (``python -m train.launcher.agent ...``: accelerate's launcher), forwards SIGTERM/SIGINT to
it, and watches the node's workers through the tiny progress files they keep
(train/progress.py). It ends the job itself when waiting cannot help:
- a rank reports a config error: the job is killed quietly and the one line is printed last
  (exit 2), instead of every rank's traceback and torchrun's report;
- the workers were restarted after the same failure at the same step twice (REPEATED_FAILURE):
  the next restart would fail the same way, so the budget is not spent on it;
- no local rank made progress for the hang timeout: every local rank's stacks are dumped with
  py-spy (train/launcher/hang.py), the job is killed, node 0 prints the report (HANG), long before the
  collective timeout would fire.
Restarts themselves are torchrun's (c10d rendezvous, ``--max_restarts``); the exit code is
mapped onto train/config/exitcodes.py.

Orphans: the agent gets ``PR_SET_PDEATHSIG=SIGKILL`` at spawn and each worker sets it for its
own parent (the agent), so a SIGKILL of the supervisor (``kill -9`` of ``make train``'s process
group, an OOM kill) takes the agent and then every worker with it.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from train.config import RunConfig, exitcodes
from train.config.exitcodes import CONFIG, FAILED, HANG, OK, PREEMPTED, REPEATED_FAILURE, describe
from train.launcher import flight_recorder, hang, hang_verdict
from train.progress import ENV_DIR, ENV_SUPERVISOR, PR_SET_PDEATHSIG, failure_of, read_attempts
from train.storage import work_dir

POLL_S = 0.5
MIN_HANG_TIMEOUT_S = 60.0
STEP_MULTIPLE = 10  # the automatic hang timeout: this many median step times, at least the minimum
LONG_PHASES = ("setup", "checkpoint", "eval", "export")  # may legitimately outlast a step by far
KILL_WAIT_S = 10.0
REPORT_WAIT_S = 20.0  # node 0 waits this long for the other nodes' dumps


def _agent_setup() -> None:  # runs in the child between fork and exec
    os.setpgid(0, 0)  # its own group: a terminal's Ctrl-C reaches it once, through our forwarding
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _gone(pid: int) -> bool:
    return hang.process_state(pid) in "Z?"


class Supervisor:
    def __init__(self, cmd: list[str], env: dict[str, str], cfg: RunConfig, node_rank: int, world: int, device: str):
        self.cmd, self.env, self.cfg = cmd, env, cfg
        self.node_rank, self.world, self.device = node_rank, world, device
        self.agent: subprocess.Popen | None = None
        self.signalled: int | None = None
        self.step_seconds: list[float] = []

    # -- running -------------------------------------------------------------------------
    def run(self) -> tuple[int, str]:
        """Run the job to its end; returns (exit code, the line to print last, or "")."""
        directory = Path(tempfile.mkdtemp(prefix="train-progress-"))  # node-local, like the workers it describes
        env = {**self.env, ENV_DIR: str(directory), ENV_SUPERVISOR: str(os.getpid())}
        hangs = work_dir(self.cfg) / hang.HANGS  # node-local even when OUTPUT_DIR is a bucket
        if self.device == "cuda":
            hangs.mkdir(parents=True, exist_ok=True)
        env.update(flight_recorder.worker_env(self.device, hangs, directory))  # NCCL only
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._forward)
        try:
            self.agent = subprocess.Popen(self.cmd, env=env, preexec_fn=_agent_setup)
            return self._watch(directory)
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def _forward(self, signum, frame) -> None:
        self.signalled = signum
        if self.agent is not None and self.agent.poll() is None:
            self.agent.send_signal(signum)  # torchrun stops the workers, which agree on a step and save

    def _dump_nccl(self, directory: Path, ranks: list[int]) -> None:
        for r in ranks:
            pipe = directory / f"nccl_pipe_{r}.pipe"
            if pipe.exists():
                try:
                    fd = os.open(pipe, os.O_WRONLY | os.O_NONBLOCK)
                    os.write(fd, b"1")
                    os.close(fd)
                except OSError:
                    pass

    # -- watching ------------------------------------------------------------------------
    def _watch(self, directory: Path) -> tuple[int, str]:
        seen_attempt, failures = 0, []
        last_snapshot, last_change = None, time.monotonic()
        last_steps: dict[int, tuple[int, float]] = {}
        while True:
            try:
                return self._exit(self.agent.wait(timeout=POLL_S), directory)
            except subprocess.TimeoutExpired:
                pass
            if self.signalled is not None:
                continue  # stopping: torchrun and the workers' agreed stop take it from here
            attempts = read_attempts(directory)
            if not attempts:
                continue
            cur = attempts[-1]
            for o in cur["outcomes"].values():
                if o.get("status") in FINAL_STATUSES:
                    self._kill(cur)
                    return FINAL_STATUSES[o["status"]], o.get("message", "")
            if cur["attempt"] > seen_attempt:
                seen_attempt = cur["attempt"]
                reason, step = failure_of(attempts[-2]) if len(attempts) > 1 else ("unknown", 0)
                failures.append((reason, step))
                print(f"[supervisor] workers restarted (attempt {seen_attempt + 1}, restart {seen_attempt} of at most "
                      f"{self.cfg.launch.max_restarts}) after: {reason} at step {step}", flush=True)
                if len(failures) >= 2 and failures[-1] == failures[-2]:
                    self._kill(cur)
                    return REPEATED_FAILURE, (f"the same failure at step {step} on two attempts in a row ({reason}); "
                                              "not restarting again: fix the cause, then RESUME=auto continues")
                last_snapshot, last_change, last_steps = None, time.monotonic(), {}
            snapshot = {r: (rec.get("step"), rec.get("phase"), rec.get("t")) for r, rec in cur["ranks"].items()}
            now = time.monotonic()
            if snapshot != last_snapshot:
                last_snapshot, last_change = snapshot, now
                for r, rec in cur["ranks"].items():
                    step = rec.get("step")
                    if step is not None:
                        prev = last_steps.get(r)
                        if prev is not None and step > prev[0]:
                            self.step_seconds.append((now - prev[1]) / (step - prev[0]))
                        if prev is None or step > prev[0]:
                            last_steps[r] = (step, now)
            if cur["outcomes"]:
                continue  # ranks are ending (torchrun restarts or finishes them): not a hang
            timeout = self.hang_timeout(list(cur["ranks"].values()))
            idle = now - last_change
            if idle > timeout:
                return self._hang(directory, cur, idle, timeout)

    def hang_timeout(self, records: list[dict]) -> float:
        base = self.cfg.launch.hang_timeout_s
        if not base:
            median = statistics.median(self.step_seconds[-50:]) if self.step_seconds else 0.0
            base = max(MIN_HANG_TIMEOUT_S, STEP_MULTIPLE * median)
        if any(r.get("step") is None or r.get("phase") in LONG_PHASES for r in records):
            # Start-up and the first step (lazy init, JIT builds), saves and evaluation can take far
            # longer than a step; a real hang there still ends at the collective timeout.
            return max(base, float(self.cfg.launch.timeout_s))
        return base

    def _hang(self, directory: Path, cur: dict, idle: float, timeout: float) -> tuple[int, str]:
        records = sorted(cur["ranks"].values(), key=lambda r: r["rank"])
        print(f"[supervisor] no rank on node {self.node_rank} made progress for {idle:.0f} s (hang timeout "
              f"{timeout:.0f} s): dumping the stacks of {len(records)} rank(s)", flush=True)
        if self.device == "cuda":
            self._dump_nccl(directory, [r["rank"] for r in records])
            time.sleep(2)  # let the flight recorder write
        work = str(work_dir(self.cfg))  # OUTPUT_DIR, or this node's scratch for a bucket: dumps are files
        folder = hang.dump(records, work, self.node_rank, idle)
        flight_recorder.collect(folder.parent, folder, [r["rank"] for r in records])
        # Kill only once every node has dumped (bounded): a node killing its workers early makes
        # the others' ranks fail out of the collective they were caught in before their dump.
        hang.wait_for_dumps(work, self.world, REPORT_WAIT_S)
        self._kill(cur)
        if self.node_rank == 0:
            print(hang_verdict.report(work), flush=True)
        return HANG, (f"no rank made progress for {idle:.0f} s; stacks in {folder} "
                      f"(python -m train hang-report {work}); RESUME=auto continues from the last checkpoint")

    def _kill(self, cur: dict) -> None:
        """End the job now and quietly: SIGKILL the agent (its group) and the workers we know of."""
        try:
            os.killpg(self.agent.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        pids = [rec["pid"] for rec in cur["ranks"].values()]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.agent.wait()
        deadline = time.monotonic() + KILL_WAIT_S
        while time.monotonic() < deadline and not all(_gone(p) for p in pids):
            _reap()
            time.sleep(0.1)

    def _exit(self, rc: int, directory: Path) -> tuple[int, str]:
        """Map the agent's end onto the exit-code table."""
        _reap()
        attempts = read_attempts(directory)
        cur = attempts[-1] if attempts else {"outcomes": {}, "ranks": {}}
        statuses = {o.get("status") for o in cur["outcomes"].values()}
        if rc == 0:
            return OK, ""
        if self.signalled is not None:
            return PREEMPTED, self._stopped_without_checkpoint()
        for status, code in FINAL_STATUSES.items():
            msgs = [o.get("message", "") for o in cur["outcomes"].values() if o.get("status") == status]
            if msgs:
                return code, msgs[0]
        if statuses == {exitcodes.name(PREEMPTED)}:
            return PREEMPTED, self._stopped_without_checkpoint()
        reason, step = failure_of(cur) if attempts else ("the launcher failed before any worker started", 0)
        return FAILED, (f"a worker failed and the restart budget (launch.max_restarts={self.cfg.launch.max_restarts}) "
                        f"is spent: {reason} at step {step}")

    def _stopped_without_checkpoint(self) -> str:
        """A stop (time limit, preemption) that came before the first save: said once, on node 0,
        because the next attempt starts over and a time limit would stop it at the same place."""
        from train.checkpoint.layout import checkpoint_root, complete_checkpoints  # imports torch: only here

        if self.node_rank != 0 or complete_checkpoints(checkpoint_root(self.cfg)):
            return ""
        name = signal.Signals(self.signalled).name if self.signalled else "a stop signal"
        return (f"stopped by {name} before the first checkpoint was saved: the next attempt starts again at step 0; "
                "under a time limit, give the job more time (sbatch --time) or save sooner (CHECKPOINT_EVERY)")


# Outcomes a rank reports through progress.fatal (the table's names of final codes): the whole job
# ends at once with that code.
FINAL_STATUSES = {exitcodes.name(code): code for code in exitcodes.FINAL_CODES}


def _reap() -> None:
    """Collect exited children: under Docker this process may be PID 1, and orphaned workers
    are then re-parented to it."""
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass


def supervise(cmd: list[str], env: dict[str, str], cfg: RunConfig, node_rank: int, world: int, device: str) -> int:
    code, message = Supervisor(cmd, env, cfg, node_rank, world, device).run()
    sys.stdout.flush()
    if message:  # printed last: what the user sees at the bottom of the terminal and in `kubectl logs`
        line = f"error: {message}" if code == CONFIG else f"[supervisor] {describe(code)}: {message}"
        print(line, file=sys.stderr, flush=True)
    return code
