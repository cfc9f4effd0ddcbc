"""Two machines emulated on one: `make train NNODES=2 NODE_RANK=0/1 MASTER_ADDR=127.0.0.1`,
one process each, must be the same job as one machine with two processes."""

from __future__ import annotations

import time

import pytest

from conftest import TINY, free_port, kill_tree, losses, output, train, wait_for_step
from helpers import NODE_COMMON as COMMON
from helpers import make_train

pytestmark = pytest.mark.slow


def test_two_machines_with_one_process_each_equal_one_machine_with_two(tmp_path):
    single = tmp_path / "single"
    train(single, **{k: v for k, v in COMMON.items() if k not in TINY})
    multi = tmp_path / "multi"
    port = free_port()
    nodes = [make_train(multi, r, port) for r in (0, 1)]
    for n in nodes:
        n.wait(timeout=400)
    outs = [output(n) for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(o[-3000:] for o in outs)
    assert "node 1/2" in outs[1] and "world_size=2" in outs[0]
    assert losses(multi) == pytest.approx(losses(single), abs=1e-5, rel=0)
    assert len(losses(multi)) == 4


def test_when_one_machine_dies_the_other_exits_non_zero_within_the_timeout(tmp_path):
    port = free_port()
    extra = {"MAX_STEPS": "200", "DIST_TIMEOUT": "30"}
    slow = {"TRAIN_FAILPOINTS": "step_sleep=0.2"}
    nodes = [make_train(tmp_path, r, port, env=slow, **extra) for r in (0, 1)]
    wait_for_step(tmp_path, 3, nodes[0])
    kill_tree(nodes[1])  # machine 1 loses power: launcher and worker gone at once
    t0 = time.monotonic()
    nodes[0].wait(timeout=30 + 90)
    out = output(nodes[0])
    elapsed = time.monotonic() - t0
    assert nodes[0].returncode != 0
    assert elapsed < 30 + 60, f"survivor took {elapsed:.0f}s to fail"
    assert "Traceback" in out or "error" in out.lower()
