"""Self-healing runs (issue 13): torchrun restarts the gang after a crash and the curve is the
uninterrupted one; what cannot succeed on a retry is not retried."""

from __future__ import annotations

import json
import os
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

from train.checkpoint.layout import MANIFEST, complete_checkpoints
from train.config.exitcodes import CONFIG, DIVERGED, REPEATED_FAILURE

pytestmark = pytest.mark.slow
RUN = {"MAX_STEPS": 10, "CHECKPOINT_EVERY": 2, "KEEP_CHECKPOINTS": 2, "checkpoint.export": "false"}
SLOW = {"TRAIN_FAILPOINTS": "step_sleep=0.3"}  # time to kill a worker at a chosen step from outside


def events(out):
    return [r for r in read_metrics(out, raw=True) if "event" in r]


def kill_worker_and_time_the_restart(out, job, rank: int, at_step: int) -> float:
    """kill -9 one worker at ``at_step``; seconds until the first step after the restart is logged."""
    wait_for_step(out, at_step, job)
    os.kill(worker_pids(out, 1 + rank)[rank], signal.SIGKILL)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 300 and job.poll() is None:
        rows = read_metrics(out, raw=True)
        restarted = [i for i, r in enumerate(rows) if r.get("event") == "restart"]
        if restarted and any("loss" in r for r in rows[restarted[0] + 1:]):
            return time.monotonic() - t0
        time.sleep(0.1)
    raise AssertionError(f"no step after the restart:\n{output(job)[-4000:]}")


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """The uninterrupted run: one machine, two processes."""
    out = tmp_path_factory.mktemp("ref")
    train(out, **RUN)
    return out


def test_a_worker_killed_at_step_7_is_restarted_and_the_curve_equals_an_uninterrupted_run(ref, tmp_path):
    run = tmp_path / "run"
    job = start(run, env=SLOW, **RUN)
    took = kill_worker_and_time_the_restart(run, job, rank=1, at_step=7)
    job.wait(timeout=300)
    print(f"kill -9 of rank 1 -> first step after the restart: {took:.1f} s")
    assert job.returncode == 0, output(job)[-4000:]
    assert losses(run) == losses(ref)  # bitwise: fp32 on CPU, same data cursor
    assert [r["sample_hash"] for r in read_metrics(run)] == [r["sample_hash"] for r in read_metrics(ref)]
    [ev] = events(run)
    assert ev["event"] == "restart" and ev["attempt"] == 1 and "rank 1 died" in ev["reason"]
    assert ev["to_step"] % 2 == 0 and ev["to_step"] <= ev["from_step"] and ev["from_step"] >= 7
    assert '[event] {"event": "restart"' in output(job)
    newest = complete_checkpoints(run / "checkpoints")[-1]
    assert json.loads((newest / MANIFEST).read_text())["events"] == {"restart": 1}


def test_two_machines_a_worker_killed_on_node_1_restarts_both_nodes_and_the_run_finishes(ref, tmp_path):
    """`make train NNODES=2 NODE_RANK=0/1 MASTER_ADDR=127.0.0.1`, one process each: one job,
    restarted on both machines, whose curve is one machine's with two processes."""
    run = tmp_path / "run"
    port = free_port()
    extra = {k: str(v) for k, v in RUN.items()}
    nodes = [make_train(run, r, port, env=SLOW, **extra) for r in (0, 1)]
    took = kill_worker_and_time_the_restart(run, nodes[0], rank=1, at_step=7)
    for n in nodes:
        n.wait(timeout=300)
    outs = [output(n) for n in nodes]
    print(f"2 nodes: kill -9 of rank 1 -> first step after the restart: {took:.1f} s")
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(o[-3000:] for o in outs)
    assert "node 1/2" in outs[1] and "world_size=2" in outs[0]
    assert losses(run) == pytest.approx(losses(ref), abs=1e-5, rel=0)
    assert [e["event"] for e in events(run)] == ["restart"]


def test_the_same_crash_at_the_same_step_stops_after_the_second_attempt(tmp_path):
    p = train(tmp_path, check=False, env={"TRAIN_FAILPOINTS": "rank_dies=1@3"}, MAX_RESTARTS=3, **RUN)
    assert p.returncode == REPEATED_FAILURE, p.stdout[-3000:] + p.stderr[-3000:]
    assert p.stdout.count("[supervisor] workers restarted") == 2  # not the whole budget of 3
    last = p.stderr.strip().splitlines()[-1]
    assert "the same failure at step 3 on two attempts in a row" in last and "rank 1 died" in last
    assert not wait_until_gone(tmp_path, 10)


def test_a_config_error_inside_a_rank_ends_the_job_with_one_line_and_exit_2_without_a_retry(tmp_path):
    p = train(tmp_path, check=False, env={"TRAIN_FAILPOINTS": "config_error=0@2"}, **RUN)
    both = p.stdout + p.stderr
    assert p.returncode == CONFIG, both[-3000:]
    assert "Traceback" not in both and "ChildFailedError" not in both and "restarted" not in both
    assert p.stderr.strip().splitlines()[-1] == "error: failpoint config_error: bad value seen by rank 0 at step 2"
    assert not wait_until_gone(tmp_path, 10)


def test_a_nan_at_step_6_rolls_back_once_skips_its_batches_and_a_rerun_gives_the_same_curve(tmp_path):
    nan = {"TRAIN_FAILPOINTS": "nan_at=6"}  # NaN loss and gradients on the step eating batch 6
    first, rerun = tmp_path / "first", tmp_path / "rerun"
    p = train(first, env=nan, **RUN)
    [ev] = events(first)
    assert ev["event"] == "rollback" and ev["reason"] == "loss is nan"
    assert (ev["from_step"], ev["to_step"], ev["attempt"]) == (6, 4, 1)
    assert '[event] {"event": "rollback"' in p.stdout
    rows = read_metrics(first)
    assert [r["step"] for r in rows] == list(range(1, 11)) and all(r["loss"] == r["loss"] for r in rows)
    manifest = json.loads((complete_checkpoints(first / "checkpoints")[-1] / MANIFEST).read_text())
    [skip] = manifest["train_state"]["skipped"]
    assert (skip["from_step"], skip["to_step"], skip["from_cursor"], skip["to_cursor"]) == (5, 6, [0, 32], [0, 48])
    assert manifest["events"] == {"rollback": 1}
    train(rerun, env=nan, **RUN)
    assert losses(rerun) == losses(first)


def test_a_run_out_of_rollbacks_stops_as_diverged_without_a_restart(tmp_path):
    p = train(tmp_path, check=False, env={"TRAIN_FAILPOINTS": "nan_at=3"}, **{**RUN, "train.max_rollbacks": 0})
    assert p.returncode == DIVERGED, p.stdout[-2000:] + p.stderr[-2000:]
    assert "Traceback" not in p.stdout + p.stderr and "restarted" not in p.stdout
    last = p.stderr.strip().splitlines()[-1]
    assert "loss is nan at step 3, after 0 rollback(s) (train.max_rollbacks=0)" in last
