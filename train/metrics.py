"""Metrics: one JSON object per log step in ``OUTPUT_DIR/metrics.jsonl``, TensorBoard through
accelerate's trackers, and a progress line/bar on the main process only."""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path

import torch

from .flops import mfu


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
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step" and math.isfinite(v)}
        self.acc.log(scalars, step=record["step"])
        line = " ".join(_fmt(k, record[k]) for k in ("step", "loss", "eval_loss", "lr", "grad_norm",
                                                       "tokens_per_second", "mfu", "step_time_s", "peak_memory_mb") if k in record)
        if self.bar is not None:
            self.bar.n = record["step"]
            self.bar.set_postfix_str(line, refresh=True)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fmt(k: str, v) -> str:
    if isinstance(v, float):
        return f"{k}={v:.4g}" if k not in ("loss", "eval_loss") else f"{k}={v:.4f}"
    return f"{k}={v}"


class StepTimer:
    """Wall time between log steps; the host sync happens only when ``lap`` is called."""

    def __init__(self, device: torch.device):
        self.device = device
        self.t0 = time.perf_counter()

    def lap(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t = time.perf_counter()
        dt, self.t0 = t - self.t0, t
        return dt


class MetricsWindow:
    """What the loop sums between log steps (loss terms, sample fingerprint, steps, time) and
    the one record per log step it turns into (the host syncs happen in ``record`` only)."""

    def __init__(self, acc, grad_accum: int, tokens_per_step: int, flops_per_token: float | None,
                 peak_flops: float | None):
        self.acc, self.grad_accum, self.tokens_per_step = acc, grad_accum, tokens_per_step
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.timer = StepTimer(acc.device)
        self.loss = torch.zeros((), device=acc.device)
        self.hash = torch.zeros((), dtype=torch.long, device=acc.device)
        self.steps = 0

    def add(self, loss: torch.Tensor, sample_hash: torch.Tensor) -> None:
        """One optimizer step: its summed loss terms and the fingerprint of its samples."""
        self.loss += loss
        self.hash += sample_hash
        self.steps += 1

    def record(self, state, lr: float, grad_norm, held) -> dict:
        """The log line of the steps since the last one (means over ranks and steps); resets the window."""
        dt = self.timer.lap()
        world, n = self.acc.num_processes, self.steps
        tps = self.tokens_per_step * n / dt
        record = {"step": state.step,
                  "loss": (self.acc.reduce(self.loss, "sum") / (world * self.grad_accum * n)).item(),
                  "lr": lr, "grad_norm": float(grad_norm) if grad_norm is not None else None,
                  "tokens_per_second": tps, "tokens_per_second_per_device": tps / world,
                  "step_time_s": dt / n, "peak_memory_mb": peak_memory_mb(self.acc.device),
                  "epoch": state.epoch, "tokens_seen": state.tokens_seen,
                  "sample_hash": int(self.acc.reduce(self.hash, "sum").item())}
        if self.peak_flops is not None:
            record["mfu"] = mfu(record["tokens_per_second_per_device"], self.flops_per_token, self.peak_flops)
        if held is not None:
            record["held_bytes"] = held.as_dict()
        self.loss.zero_(), self.hash.zero_()
        self.steps = 0
        return record

