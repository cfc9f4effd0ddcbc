"""Graceful stop on SIGTERM/SIGINT: all ranks agree to stop at the same step boundary.

`docker stop` and Kubernetes eviction send SIGTERM (torchrun forwards it to every worker and
kills them ~30 s later), but ranks see it at different moments. Each rank only sets a flag
in the handler; at every step boundary the flags are max-reduced on a CPU (gloo) group, so
the check never waits on the GPU stream, and every rank stops after the same step.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

from .exitcodes import PREEMPTED as EXIT_PREEMPTED  # a stop that saved and can be resumed, not a success


class StopSignal:
    def __init__(self):
        self.received: int | None = None
        self._group = None
        if dist.is_initialized() and dist.get_world_size() > 1:
            self._group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        self.received = signum

    def agreed(self) -> bool:
        """True on every rank if any rank got a stop signal. A collective: call on all ranks."""
        flag = torch.tensor([1 if self.received is not None else 0], dtype=torch.int32)
        if self._group is not None:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return bool(flag.item())
