"""Fault injection for the fault-tolerance tests, off unless ``TRAIN_FAILPOINTS`` is set.

Some faults cannot be timed from outside a fast job (a kill in the middle of a checkpoint
save, one rank dying at a given step), so the job can be told to inflict them on itself:

  TRAIN_FAILPOINTS="step_sleep=0.3"        every step takes at least 0.3 s longer
  TRAIN_FAILPOINTS="kill_in_save=4"        SIGKILL the whole job after the step-4 checkpoint's
                                           files are written, before it is marked complete
  TRAIN_FAILPOINTS="rank_dies=1@3"         rank 1 alone is SIGKILLed after step 3
  TRAIN_FAILPOINTS="slow_rank=1:0.3"       rank 1 alone takes 0.3 s longer every step (a straggler)
"""

from __future__ import annotations

import os
import signal
import time

ENV = "TRAIN_FAILPOINTS"


def _points() -> dict[str, str]:
    spec = os.environ.get(ENV, "")
    return dict(p.split("=", 1) for p in spec.split(",") if "=" in p)


def after_step(step: int, rank: int) -> None:
    points = _points()
    if not points:
        return
    if "step_sleep" in points:
        time.sleep(float(points["step_sleep"]))
    if "slow_rank" in points:
        who, seconds = points["slow_rank"].split(":")
        if rank == int(who):
            time.sleep(float(seconds))
    if "rank_dies" in points:
        who, at = points["rank_dies"].split("@")
        if rank == int(who) and step == int(at):
            os.kill(os.getpid(), signal.SIGKILL)


def in_save(step: int) -> None:
    if _points().get("kill_in_save") == str(step):
        kill_job()


def kill_job() -> None:
    """SIGKILL the launcher (torchrun) and every worker, as a node losing power would.
    torchrun starts each worker in its own session, so a process-group kill is not enough."""
    import psutil

    launcher = psutil.Process(os.getppid())
    for p in [launcher, *launcher.children(recursive=True)]:
        if p.pid != os.getpid():
            p.kill()
    os.kill(os.getpid(), signal.SIGKILL)
