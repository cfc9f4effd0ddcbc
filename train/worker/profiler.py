"""Profiles on demand: a torch.profiler trace of chosen steps on chosen ranks, CUDA memory
snapshots, and the snapshot written when a rank runs out of GPU memory.

- ``log.profile_steps=10-12`` (``PROFILE_STEPS``) on ``log.profile_ranks`` (``PROFILE_RANKS``,
  default rank 0): CPU and CUDA activity of those optimizer steps as Chrome/Perfetto JSON,
  ``OUTPUT_DIR/profiles/trace-steps10-12-rank0.json`` (chrome://tracing, ui.perfetto.dev).
- ``log.profile_memory`` on CUDA: the allocator's history over the same steps,
  ``memory-steps10-12-rank0.pickle`` (pytorch.org/memory_viz).
- On CUDA, an out-of-memory error writes ``oom-rank<R>.pickle`` before the rank exits 10 (the
  allocator's segments always; every allocation's stack with ``log.memory_history``).

Nothing is recorded outside the window: the profiler is started and stopped around it, not
left running with a schedule, so the other steps pay nothing.
"""

from __future__ import annotations

from pathlib import Path

import torch

from train.config import RunConfig
from train.config.schema import profile_ranks, profile_window
from train.storage import work_dir

DIR = "profiles"
_HISTORY_ENTRIES = 100_000  # allocations kept by the memory history (torch's own suggestion)


def profiles_dir(output_dir: str) -> Path:
    return Path(output_dir) / DIR


class StepProfiler:
    """``before(step)`` / ``after(step)`` around each optimizer step (``step`` counts from 1)."""

    def __init__(self, cfg: RunConfig, rank: int, world_size: int, device: str):
        window = profile_window(cfg.log)
        ranks = profile_ranks(cfg.log, world_size)
        self.window = window if window and (ranks is None or rank in ranks) else None
        self.rank, self.cuda = rank, device == "cuda"
        self.memory = cfg.log.profile_memory and self.cuda
        self.dir = profiles_dir(str(work_dir(cfg)))
        self._prof = None

    def before(self, step: int) -> None:
        if self.window is None or self._prof is not None or not self.window[0] <= step <= self.window[1]:
            return
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        self._first = step  # a resume inside the window records the part that is left
        if self.memory:
            torch.cuda.memory._record_memory_history(max_entries=_HISTORY_ENTRIES)
        self._prof = profile(activities=activities, record_shapes=True)
        self._prof.__enter__()

    def after(self, step: int) -> None:
        if self._prof is not None and step >= self.window[1]:
            self.close(step)

    def close(self, step: int | None = None) -> None:
        """Stop and write what was recorded (also when the run stops inside the window)."""
        prof, self._prof = self._prof, None
        if prof is None:
            return
        if self.cuda:
            torch.cuda.synchronize()
        prof.__exit__(None, None, None)
        last = step if step is not None else self.window[1]
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"steps{self._first}-{last}-rank{self.rank}"
        trace = self.dir / f"trace-{name}.json"
        prof.export_chrome_trace(str(trace))
        written = [trace]
        if self.memory:
            written.append(self.dir / f"memory-{name}.pickle")
            torch.cuda.memory._dump_snapshot(str(written[-1]))
            torch.cuda.memory._record_memory_history(enabled=None)
        print(f"[profile] rank {self.rank} steps {self._first}-{last}: {', '.join(map(str, written))}", flush=True)


def start_memory_history(cfg: RunConfig, device: str) -> None:
    """log.memory_history: record allocations from the start, for the out-of-memory snapshot."""
    if cfg.log.memory_history and device == "cuda":
        torch.cuda.memory._record_memory_history(max_entries=_HISTORY_ENTRIES)


def dump_oom_snapshot(output_dir: str, rank: int) -> Path | None:
    """The allocator's state at an out-of-memory error (before the rank exits); None without CUDA."""
    if not torch.cuda.is_available():
        return None
    path = profiles_dir(output_dir) / f"oom-rank{rank}.pickle"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.cuda.memory._dump_snapshot(str(path))
    return path
