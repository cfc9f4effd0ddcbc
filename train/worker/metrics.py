"""Metrics: one JSON object per log step in ``OUTPUT_DIR/metrics.jsonl``, TensorBoard through
accelerate's trackers, and a progress line/bar on the main process only."""

from __future__ import annotations

import json
import math
import resource
import socket
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch

from train.flops import mfu


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # CPU: peak resident set size of this process (Linux reports KiB).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class MetricsLog:
    def __init__(self, accelerator, output_dir: str, max_steps: int, start_step: int, progress: bool):
        self.acc = accelerator
        self.path = Path(output_dir) / "metrics.jsonl"
        self.bar = None
        if accelerator.is_main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._truncate_after(start_step)
            self._file = self.path.open("a")
            if progress and sys.stderr.isatty():
                from tqdm.auto import tqdm

                self.bar = tqdm(total=max_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines for steps after the checkpoint: the file is the run's one curve."""
        if not self.path.exists():
            return
        keep = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
        self.path.write_text("".join(ln + "\n" for ln in keep))

    def log(self, record: dict) -> None:
        if not self.acc.is_main_process:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()  # read while the run goes on (tests, tail -f); a kill loses no finished line
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k not in ("step", "time")
                   and math.isfinite(v)}  # (trackers stamp their own time)
        self.acc.log(scalars, step=record["step"])
        shown = ("step", "loss", "lr", "grad_norm", "loss_scale", "skipped_steps", "tokens_per_second", "mfu",
                 "step_time_s", "peak_memory_mb", "checkpoint_stall_s", "checkpoint_upload_s")
        evals = [k for k in record if k.startswith("eval/") and k.endswith(("/loss", "/ppl"))]  # one pair per eval set
        line = " ".join(_fmt(k, record[k]) for k in (*shown[:2], *evals, *shown[2:]) if k in record)
        if self.bar is not None:
            self.bar.n = record["step"]
            self.bar.set_postfix_str(line, refresh=True)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.acc.is_main_process:
            self._file.close()


def _fmt(k: str, v) -> str:
    if isinstance(v, float):
        return f"{k}={v:.4f}" if k == "loss" or k.endswith("/loss") else f"{k}={v:.4g}"
    return f"{k}={v}"


def loss_scale(accelerator, optimizer) -> float:
    """fp16's current loss scale: accelerate's GradScaler (DDP, FSDP2), else the one DeepSpeed's
    ZeRO optimizer keeps (accelerate makes no GradScaler for DeepSpeed). A host sync: log steps only."""
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None:
        return float(scaler.get_scale())
    return float(optimizer.optimizer.loss_scale)  # AcceleratedOptimizer -> DeepSpeed's ZeRO optimizer


class Lap(NamedTuple):
    wall: float  # seconds since the previous lap
    cpu: float  # process CPU seconds (every thread of this process, none of the neighbours')
    waited: float  # of ``wall``, seconds spent inside ``StepTimer.waiting()``: waiting for other ranks


class StepTimer:
    """Wall and CPU time between laps, and the time spent waiting for other ranks; the host
    sync (CUDA) happens only in ``lap``."""

    def __init__(self, device: torch.device):
        self.device = device
        self._wall, self._cpu, self._waited = time.perf_counter(), time.process_time(), 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    @contextmanager
    def waiting(self):
        """Around a collective: the time inside is not this rank's own work. On gloo the host
        blocks until every rank has arrived, so host time measures the wait. On NCCL the call
        returns once enqueued and the wait happens on the GPU, so CUDA events around it time
        the collective on the stream (read in ``lap``, after its sync)."""
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._events.append((start, end))
            return
        t = time.perf_counter()
        try:
            yield
        finally:
            self._waited += time.perf_counter() - t

    def lap(self) -> Lap:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._waited += sum(a.elapsed_time(b) for a, b in self._events) / 1e3
            self._events.clear()
        wall, cpu = time.perf_counter(), time.process_time()
        lap = Lap(wall - self._wall, cpu - self._cpu, self._waited)
        self._wall, self._cpu, self._waited = wall, cpu, 0.0
        return lap


class Stragglers:
    """Names a rank whose own time per step (wall time less its waits for other ranks) stays
    above the median rank's by more than ``fraction`` of the step time for ``log_steps`` log
    steps in a row. Fed on log steps only, with numbers the log step gathers anyway."""

    def __init__(self, hosts: list[str], fraction: float, log_steps: int):
        self.hosts, self.fraction, self.log_steps = hosts, fraction, log_steps
        self.rank, self.streak = None, 0

    def check(self, own: list[float], step_time: float, step: int) -> str | None:
        """A warning the first time a rank's streak reaches ``log_steps``, else None."""
        slowest = max(range(len(own)), key=own.__getitem__)
        median = statistics.median(own)
        if len(own) > 1 and own[slowest] - median > self.fraction * step_time:
            self.streak = self.streak + 1 if slowest == self.rank else 1
            self.rank = slowest
        else:
            self.rank, self.streak = None, 0
        if not self.log_steps or self.streak != self.log_steps:
            return None
        return (f"[train] straggler: rank {slowest} (host {self.hosts[slowest]}) has been slower than the median rank "
                f"for {self.streak} log steps: {own[slowest]:.4f} s vs {median:.4f} s of its own work per step (waits "
                f"for other ranks not counted), at step {step} where a step takes {step_time:.4f} s")


class MetricsWindow:
    """What the loop sums between log steps (loss terms, sample fingerprint, steps, time) and
    the one record per log step it turns into. A log step does one collective, in ``record``: a
    gather of every rank's loss, sample hash, grad norm and own step time, read back at once."""

    def __init__(self, acc, log_cfg, max_steps: int, grad_accum: int, tokens_per_step: int,
                 flops_per_token: float | None, peak_flops: float | None, scale=None):
        """``scale``: under fp16, a callable returning the current loss scale; each record then
        carries it and how many of its steps the overflow check skipped (a run stuck at the minimum
        scale shows only grad_norm=inf otherwise)."""
        from accelerate.utils import gather_object

        self.acc, self.every, self.max_steps, self.held_every = acc, log_cfg.every, max_steps, log_cfg.held_bytes_every
        self.grad_accum, self.tokens_per_step = grad_accum, tokens_per_step
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        hosts = gather_object([socket.gethostname()]) if acc.num_processes > 1 else [socket.gethostname()]
        self.stragglers = Stragglers(hosts, log_cfg.straggler_fraction, log_cfg.straggler_log_steps)
        self.timer = StepTimer(acc.device)
        self.loss = torch.zeros((), device=acc.device)
        self.hash = torch.zeros((), dtype=torch.long, device=acc.device)
        self.steps = self.skipped = 0
        self.scale = scale

    def is_log_step(self, step: int) -> bool:
        return step % self.every == 0 or step == self.max_steps

    def measures_held_bytes(self, step: int) -> bool:
        """Step 1 (checked at start), the first log step and every ``log.held_bytes_every``-th after it
        (a walk over all parameters and optimizer state: not free)."""
        return step == 1 or (self.is_log_step(step) and (step // self.every - 1) % self.held_every == 0)

    def add(self, loss: torch.Tensor, sample_hash: torch.Tensor) -> None:
        """One optimizer step: its summed loss terms and the fingerprint of its samples."""
        self.loss += loss
        self.hash += sample_hash
        self.steps += 1

    def step_skipped(self) -> None:
        """The optimizer step just taken skipped its update (an fp16 overflow; every rank agrees)."""
        self.skipped += 1

    def record(self, state, lr: float, grad_norm, held) -> dict:
        """The log line of the steps since the last one (means over ranks and steps); resets the window."""
        lap = self.timer.lap()
        world, n = self.acc.num_processes, self.steps
        dev = self.acc.device
        own = torch.tensor((lap.wall - lap.waited) / n, dtype=torch.float64, device=dev)
        mine = torch.stack([self.loss.double(), self.hash.double(), _scalar(grad_norm, dev), own])
        with self.timer.waiting():  # the slowest rank arrives last: the others' wait is not their own time
            ranks = (self.acc.gather(mine) if world > 1 else mine).view(world, 4).tolist()
        own_times = [r[3] for r in ranks]
        tps = self.tokens_per_step * n / lap.wall
        record = {"step": state.step, "loss": sum(r[0] for r in ranks) / (world * self.grad_accum * n),
                  "lr": lr, "grad_norm": None if grad_norm is None else ranks[0][2],
                  "tokens_per_second": tps, "tokens_per_second_per_device": tps / world,
                  "step_time_s": lap.wall / n, "cpu_time_per_step_s": lap.cpu / n,
                  "step_time_max_s": max(own_times), "step_time_min_s": min(own_times),
                  "slowest_rank": max(range(world), key=own_times.__getitem__),
                  "peak_memory_mb": peak_memory_mb(self.acc.device),
                  "epoch": state.epoch, "tokens_seen": state.tokens_seen,
                  "sample_hash": int(sum(r[1] for r in ranks)), "time": time.time()}  # rank 0's clock, unix s
        if self.peak_flops is not None:
            record["mfu"] = mfu(record["tokens_per_second_per_device"], self.flops_per_token, self.peak_flops)
        if held is not None:
            record["held_bytes"] = held.as_dict()
        if self.scale is not None:
            record["loss_scale"], record["skipped_steps"] = self.scale(), self.skipped
        warning = self.stragglers.check(own_times, lap.wall / n, state.step)
        if warning and self.acc.is_main_process:
            print(warning, flush=True)
        self.loss.zero_(), self.hash.zero_()
        self.steps = self.skipped = 0
        return record


def _scalar(x, device) -> torch.Tensor:
    """A grad norm as a float64 0-d tensor on ``device`` without a host sync (NaN for None)."""
    if x is None:
        return torch.tensor(float("nan"), dtype=torch.float64, device=device)
    if hasattr(x, "full_tensor"):  # FSDP2: a replicated DTensor
        x = x.full_tensor()
    return torch.as_tensor(x, device=device).to(torch.float64).reshape(())

