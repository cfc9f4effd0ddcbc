"""The final export has its own time bound, not DIST_TIMEOUT.

The other ranks wait while rank 0 alone writes the export; a large model on network storage
takes longer than the collective timeout meant to catch a dead peer. Two real gloo processes:
rank 0 "writes" for longer than the process group's timeout, and the wait must hold, while a
plain barrier on the main group (what the export used) times out under the same delay.
"""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port

DIST_TIMEOUT_S, WRITE_S, EXPORT_TIMEOUT_S = 2, 5, 60


def _rank(rank: int, port: int, out: str) -> None:
    from train.worker.accelerator import make_export_group, wait_for_export

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=DIST_TIMEOUT_S))
    make_export_group(EXPORT_TIMEOUT_S)
    result = {}
    if rank == 0:
        time.sleep(WRITE_S)  # writing the export
    try:
        wait_for_export(None)
        result["export_wait"] = "ok"
    except Exception as e:  # noqa: BLE001 - the test reports what happened
        result["export_wait"] = f"{type(e).__name__}: {e}"[:200]
    # The same delay on the main group: how the export waited before it had its own bound.
    if rank == 0:
        time.sleep(WRITE_S)
    t0 = time.monotonic()
    try:
        dist.barrier()
        result["main_group_wait"] = "ok"
    except Exception:  # noqa: BLE001
        result["main_group_wait"] = f"timed out after {time.monotonic() - t0:.0f} s" if rank else "error"
    Path(out, f"{rank}.json").write_text(json.dumps(result))
    os._exit(0)  # the main group is broken after the timeout: no orderly teardown


@pytest.mark.slow  # two ranks in a gloo process group
def test_ranks_wait_for_the_export_longer_than_dist_timeout(tmp_path):
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, str(tmp_path))) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        if p.is_alive():
            p.kill()
    results = {r: json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)}
    assert results[0]["export_wait"] == results[1]["export_wait"] == "ok", results
    assert results[1]["main_group_wait"] != "ok", (
        f"control: a {WRITE_S} s delay should exceed the {DIST_TIMEOUT_S} s main-group timeout: {results}")
