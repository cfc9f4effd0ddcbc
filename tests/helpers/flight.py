"""Real flight-recorder dumps, made on CPU: torch's recorder also runs under gloo
(``TORCH_FR_BUFFER_SIZE``), and ``_dump_fr_trace()`` returns the same pickled format NCCL's
timeout dump writes (torch/distributed/flight_recorder reads both)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from helpers.jobs import REPO, free_port, job_env

# Every rank runs three all_reduces; then every rank but ``stuck`` enqueues a fourth (async, as
# NCCL does with every collective) and each dumps its recorder where the supervisor's hang dump
# would put it. Only then does the stuck rank join the fourth, so every process exits cleanly.
_RANK = r'''
import os, sys
import torch, torch.distributed as dist
from torch._C._distributed_c10d import _dump_fr_trace
rank, world, stuck, folder, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
for _ in range(3):
    dist.all_reduce(torch.ones(4))
work = None if rank == stuck else dist.all_reduce(torch.ones(1024), async_op=True)
with open(os.path.join(folder, f"nccl_trace_rank_{rank}"), "wb") as f:
    f.write(_dump_fr_trace())
store = dist.distributed_c10d._get_default_store()
store.set(f"dumped/{rank}", "1")
store.wait([f"dumped/{r}" for r in range(world)])
if work is None:
    dist.all_reduce(torch.ones(1024))
else:
    work.wait()
dist.destroy_process_group()
'''


def record_flight_dumps(folder: Path, world: int, stuck: int) -> None:
    """``world`` gloo ranks leave their flight-recorder dumps in ``folder``; rank ``stuck`` never
    entered the group's fourth collective when they were taken."""
    folder.mkdir(parents=True, exist_ok=True)
    port = str(free_port())
    env = job_env({"TORCH_FR_BUFFER_SIZE": "100"})
    procs = [subprocess.Popen([sys.executable, "-c", _RANK, str(r), str(world), str(stuck), str(folder), port],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(outs)
