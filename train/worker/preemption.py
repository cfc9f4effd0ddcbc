"""Graceful stop on SIGTERM/SIGINT: all ranks agree to stop at the same step boundary.

`docker stop` and Kubernetes eviction send SIGTERM (torchrun forwards it to every worker and
kills them ~30 s later), but ranks see it at different moments. Each rank only sets a flag
in the handler. At every step boundary the flags are max-reduced on a CPU (gloo) group of
their own, without blocking: the reduce started after step N is read after step N+1, by
when it has long finished, so the check never waits on the GPU stream or on a slower rank,
and every rank stops after the same step (one step after the signal's step).
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist


class StopSignal:
    def __init__(self):
        self.received: int | None = None
        self._group = None
        self._pending = None  # (work, flag) of the reduce started at the previous step boundary
        if dist.is_initialized() and dist.get_world_size() > 1:
            # Its own group: the reduce runs beside the training collectives, never between them.
            self._group = dist.new_group(backend="gloo")
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        self.received = signum

    def agreed(self) -> bool:
        """True on every rank, at the same call, once any rank got a stop signal before the
        previous call. A collective: call it on every rank at every step boundary."""
        if self._group is None:
            return self.received is not None
        agreed = self._finish()
        flag = torch.tensor([1 if self.received is not None else 0], dtype=torch.int32)
        self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True), flag)
        return agreed

    def _finish(self) -> bool:
        if self._pending is None:
            return False
        work, flag = self._pending
        work.wait()
        self._pending = None
        return bool(flag.item())

    def close(self) -> None:
        """Wait for the last reduce (every rank started it) before the process group goes."""
        self._finish()
