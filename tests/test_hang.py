"""A hung rank is found, named and dumped long before the collective timeout (issue 12)."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest
from helpers import (
    free_port,
    losses,
    make_train,
    output,
    read_metrics,
    start,
    train,
    wait_for_step,
    wait_until_gone,
    worker_pids,
)

from train.config.exitcodes import HANG

pytestmark = pytest.mark.slow
DIST_TIMEOUT = 120
RUN = {"MAX_STEPS": 400, "CHECKPOINT_EVERY": 3, "HANG_TIMEOUT": 6, "DIST_TIMEOUT": DIST_TIMEOUT,
       "optim.schedule": "constant",  # the curve must not depend on MAX_STEPS (resumed with fewer)
       "checkpoint.export": "false"}
SLOW = {"TRAIN_FAILPOINTS": "step_sleep=0.2"}  # steps slow enough to stop a rank mid-run


def hang_files(out):
    return sorted(f.name for f in (out / "hangs").glob("*/node*-rank*.txt"))


def test_a_stopped_rank_is_named_dumped_and_the_job_exits_with_the_hang_code(tmp_path):
    job = start(tmp_path, env=SLOW, **RUN)
    wait_for_step(tmp_path, 4, job)
    pids = worker_pids(tmp_path, 2)
    os.kill(pids[1], signal.SIGSTOP)
    t0 = time.monotonic()
    job.wait(timeout=DIST_TIMEOUT + 60)
    detected = time.monotonic() - t0
    out = output(job)
    print(f"hang detected and job ended {detected:.1f} s after SIGSTOP (DIST_TIMEOUT={DIST_TIMEOUT} s)\n{out[-3000:]}")
    assert job.returncode == HANG, out[-3000:]
    assert detected < DIST_TIMEOUT, "the hang must be caught before the collective timeout"
    assert hang_files(tmp_path) == ["node0-rank0.txt", "node0-rank1.txt"]
    stopped = next((tmp_path / "hangs").glob("*/node0-rank1.txt")).read_text()
    assert "process_state: T" in stopped and "Thread" in stopped  # py-spy read the stopped rank too
    # the collective rank 0 waits in: the log step's gather, or a gradient all-reduce
    assert "rank 1 (node 0, host" in out and re.search(r"is not in the all_(reduce|gather)[^\n]* that rank 0 waits in", out)
    assert "it is stopped (SIGSTOP)" in out
    assert not wait_until_gone(tmp_path, 10)
    # the last checkpoint is untouched: RESUME=auto continues the same curve as a run that never
    # hung, and that healthy run (as slow, as watched) writes no hang dumps
    last = max(r["step"] for r in read_metrics(tmp_path))
    resumed = train(tmp_path, **{**RUN, "MAX_STEPS": last + 2})
    assert "resumed from" in resumed.stdout
    ref = tmp_path / "ref"
    train(ref, env=SLOW, **{**RUN, "MAX_STEPS": last + 2})
    assert losses(tmp_path) == pytest.approx(losses(ref), abs=1e-6, rel=0)
    assert not (ref / "hangs").exists()


def test_a_rank_stuck_in_data_loading_is_reported_as_in_data_loading(tmp_path):
    p = train(tmp_path, check=False, env={"TRAIN_FAILPOINTS": "data_sleep=1@3:300"}, **{**RUN, "MAX_STEPS": 6})
    out = p.stdout + p.stderr
    assert p.returncode == HANG, out[-3000:]
    assert "rank 1 (node 0, host" in out and "waits in at step 3: it is in data loading" in out
    assert not wait_until_gone(tmp_path, 10)


def test_two_machines_a_stopped_rank_on_node_1_is_named_by_node_0(tmp_path):
    port = free_port()
    extra = {k: str(v) for k, v in RUN.items()}
    nodes = [make_train(tmp_path, r, port, env=SLOW, **extra) for r in (0, 1)]
    wait_for_step(tmp_path, 4, nodes[0])
    pids = worker_pids(tmp_path, 2)
    os.kill(pids[1], signal.SIGSTOP)
    for n in nodes:
        n.wait(timeout=DIST_TIMEOUT + 60)
    outs = [output(n) for n in nodes]
    # make turns any failure into its own exit 2; the launcher's code is in make's "Error N" line
    assert all(n.returncode != 0 and f"Error {HANG}" in o for n, o in zip(nodes, outs)), "\n".join(o[-3000:] for o in outs)
    assert hang_files(tmp_path) == ["node0-rank0.txt", "node1-rank1.txt"]
    assert "rank 1 (node 1, host" in outs[0] and re.search(r"is not in the all_(reduce|gather)[^\n]* that rank 0 waits in", outs[0])
    assert not wait_until_gone(tmp_path, 10)
