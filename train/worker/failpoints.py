"""Fault injection for the fault-tolerance tests, off unless ``TRAIN_FAILPOINTS`` is set.

Some faults cannot be timed from outside a fast job (a kill in the middle of a checkpoint
save, one rank dying at a given step), so the job can be told to inflict them on itself:

  TRAIN_FAILPOINTS="step_sleep=0.3"        every step takes at least 0.3 s longer
  TRAIN_FAILPOINTS="kill_in_save=4"        SIGKILL the whole job after the step-4 checkpoint's
                                           files are written, before it is marked complete
  TRAIN_FAILPOINTS="kill_in_upload=4:2"    OUTPUT_DIR on object storage: SIGKILL the whole job once a node
                                           uploaded 2 files of the step-4 checkpoint (no manifest yet)
  TRAIN_FAILPOINTS="slow_async_write=0.5"  every background checkpoint write (checkpoint.async_save)
                                           starts 0.5 s late, while training goes on
  TRAIN_FAILPOINTS="rank_dies=1@3"         rank 1 alone is SIGKILLed after step 3 (on every attempt)
  TRAIN_FAILPOINTS="rank_dies_first=1@7"   the same, only in the first attempt (torchrun restarts count)
  TRAIN_FAILPOINTS="slow_rank=1:0.3"       rank 1 alone takes 0.3 s longer every step (a straggler)
  TRAIN_FAILPOINTS="data_sleep=1@5:30"     rank 1 sleeps 30 s while loading step 5's data
  TRAIN_FAILPOINTS="nan_at=6"              the step consuming epoch 0's 6th global batch gets a NaN loss
                                           and NaN gradients (so NaN weights); a rollback skips that batch
  TRAIN_FAILPOINTS="oom=0@2"               rank 0 asks the device for far more memory than it has after
                                           step 2 (a real out-of-memory error on CUDA)
  TRAIN_FAILPOINTS="config_error=0@2"      rank 0 raises a ConfigError after step 2 (a user error only a
                                           rank can see, e.g. in data it reads late)
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
    for key in ("rank_dies", "rank_dies_first"):
        if key in points:
            who, at = points[key].split("@")
            first = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") in ("", "0")
            if rank == int(who) and step == int(at) and (key == "rank_dies" or first):
                os.kill(os.getpid(), signal.SIGKILL)
    if "oom" in points:
        who, at = points["oom"].split("@")
        if rank == int(who) and step == int(at):
            import torch

            torch.empty(1 << 50, dtype=torch.uint8, device="cuda" if torch.cuda.is_available() else "cpu")
    if "config_error" in points:
        who, at = points["config_error"].split("@")
        if rank == int(who) and step == int(at):
            from train.config import ConfigError

            raise ConfigError(f"failpoint config_error: bad value seen by rank {rank} at step {step}")


def poison(loss, model, epoch: int, batches_done: int):
    """NaN loss and gradients for the step that consumes global batch ``nan_at`` of epoch 0: tied
    to the data, not the step number, so it does not recur once a rollback skipped that batch."""
    at = _points().get("nan_at")
    if at is None or epoch != 0 or batches_done != int(at):
        return loss
    for p in model.parameters():
        if p.grad is not None:
            p.grad.fill_(float("nan"))
    return loss * float("nan")


def before_data(step: int, rank: int) -> None:
    spec = _points().get("data_sleep")
    if spec:
        who, rest = spec.split("@")
        at, seconds = rest.split(":")
        if rank == int(who) and step == int(at):
            time.sleep(float(seconds))


def in_save(step: int) -> None:
    if _points().get("kill_in_save") == str(step):
        kill_job()


def in_upload(step: int, uploaded: int) -> None:
    if _points().get("kill_in_upload") == f"{step}:{uploaded}":
        kill_job()


def async_write_delay() -> float:
    return float(_points().get("slow_async_write", 0))


def kill_job() -> None:
    """SIGKILL the launcher (torchrun) and every worker, as a node losing power would.
    torchrun starts each worker in its own session, so a process-group kill is not enough."""
    import psutil

    launcher = psutil.Process(os.getppid())
    for p in [launcher, *launcher.children(recursive=True)]:
        if p.pid != os.getpid():
            p.kill()
    os.kill(os.getpid(), signal.SIGKILL)
