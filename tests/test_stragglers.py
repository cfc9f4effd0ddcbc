"""Stragglers and the cost of logging: every log row says which rank was slowest, a rank that
stays slow is named with its host, a healthy run warns about nothing, and the per-step extras
(held bytes, the stop check) stay off the steps that do not need them."""

from __future__ import annotations

import socket

import pytest
from helpers import read_metrics, train

from train.worker.metrics import Stragglers

RUN = {"CHECKPOINT_EVERY": 0, "checkpoint.export": "false"}


def test_a_rank_is_named_only_after_it_stays_slow_for_the_set_number_of_log_steps():
    watch = Stragglers(["h0", "h1", "h2"], fraction=0.2, log_steps=3)
    slow, healthy = [0.10, 0.10, 0.40], [0.10, 0.11, 0.12]
    assert [watch.check(slow, 0.4, s) for s in (1, 2)] == [None, None]
    assert watch.check(healthy, 0.12, 3) is None  # the streak is broken
    warnings = [watch.check(slow, 0.4, s) for s in (4, 5, 6, 7)]
    assert warnings[:2] == [None, None] and warnings[3] is None  # once per streak
    assert warnings[2].startswith("[train] straggler: rank 2 (host h2)") and "for 3 log steps" in warnings[2]
    assert Stragglers(["h0", "h1"], 0.2, log_steps=0).check([0.1, 1.0], 1.0, 1) is None  # 0 = never


@pytest.mark.slow
def test_a_slow_rank_is_named_slowest_and_warned_with_its_host(tmp_path):
    """Rank 1 sleeps 0.3 s after every step (a failpoint: a CPU quota on a 2-core machine shared
    with other jobs slows both ranks by chance as much as the one it is set on)."""
    p = train(tmp_path, MAX_STEPS=10, env={"TRAIN_FAILPOINTS": "slow_rank=1:0.3"}, **RUN)
    rows = read_metrics(tmp_path)[1:]  # from step 2: step 1's window starts at different times per rank
    slow = [r for r in rows if r["slowest_rank"] == 1 and r["step_time_max_s"] - r["step_time_min_s"] > 0.2]
    assert len(slow) >= len(rows) - 1, rows  # a busy machine may blur one step, not more
    assert f"[train] straggler: rank 1 (host {socket.gethostname()}) has been slower than the median rank " \
           "for 5 log steps" in p.stdout
    assert p.stdout.count("[train] straggler:") == 1
    # the extras: held bytes on the first log step and every 10th after it, CPU time on every row
    assert [r["step"] for r in read_metrics(tmp_path) if "held_bytes" in r] == [1]
    assert all(r["cpu_time_per_step_s"] > 0 for r in rows)


@pytest.mark.slow
def test_a_healthy_run_warns_about_no_straggler(tmp_path):
    p = train(tmp_path, MAX_STEPS=16, LOG_EVERY=2, **RUN)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(2, 17, 2))
    assert all(r["slowest_rank"] in (0, 1) and 0 < r["step_time_min_s"] <= r["step_time_max_s"] for r in rows)
    assert "[train] straggler:" not in p.stdout + p.stderr
