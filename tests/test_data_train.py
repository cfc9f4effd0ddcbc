"""Training from prepared shards, for real: `python -m train prepare`, then 2-rank jobs that read
the shards through memory maps, evaluate on held-out documents, and resume bitwise after kill -9."""

from __future__ import annotations

import math

import pytest

from helpers import kill_tree, prepare_cli, read_metrics, start, train, wait_for_step
from train.checkpoint.layout import complete_checkpoints

pytestmark = pytest.mark.slow
STEPS = 8
# A checkpoint at step 4 only: killed after step 6, the resumed job recomputes steps 5 and 6.
RUN = {"MAX_STEPS": STEPS, "CHECKPOINT_EVERY": 4, "KEEP_CHECKPOINTS": 2, "checkpoint.export": "false"}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The built-in corpus in shards of ~20k tokens: training blocks cross shard boundaries."""
    out = tmp_path_factory.mktemp("prepared") / "tiny-stories"
    p = prepare_cli(out, "builtin:tiny-stories", **{"data.shard_tokens": 20_000, "data.prepare_workers": 2})
    assert "shard(s)" in p.stdout
    return out


@pytest.fixture(scope="module")
def ddp_run(prepared, tmp_path_factory):
    """The uninterrupted run, evaluating every 4 steps."""
    out = tmp_path_factory.mktemp("ddp")
    proc = train(out, DATASET=prepared, **{**RUN, "train.eval_every": 4})
    return out, proc


def test_training_reads_the_prepared_directory_and_logs_eval_rows_on_held_out_documents(ddp_run):
    out, proc = ddp_run
    assert "[data] preparing" not in proc.stdout  # a prepared directory is only opened
    assert "eval blocks from the last 0.05 of the documents" in proc.stdout
    evals = [r for r in read_metrics(out, raw=True) if "eval/heldout/loss" in r]
    assert [r["step"] for r in evals] == [4, 8]
    assert all(math.isfinite(r["eval/heldout/loss"]) and r["eval/heldout/ppl"] > 1 for r in evals)
    assert evals[1]["eval/heldout/loss"] < evals[0]["eval/heldout/loss"]  # it learns something that transfers


# ddp only: every strategy's kill -9 resume reads shards too (the built-in corpus is prepared into
# the cache), in tests/test_strategies.py; what this adds is blocks that cross shard boundaries.
@pytest.mark.parametrize("strategy", ["ddp"])
def test_kill_9_then_resume_from_shards_is_bitwise(strategy, prepared, ddp_run, tmp_path):
    """The whole job SIGKILLed after step 6: the resumed job recomputes steps 5-6 bit for bit,
    finishes with the uninterrupted run's samples at every step (and, under ddp, its losses)."""
    job = start(tmp_path, STRATEGY=strategy, DATASET=prepared, env={"TRAIN_FAILPOINTS": "step_sleep=0.5"}, **RUN)
    wait_for_step(tmp_path, 6, job)
    kill_tree(job)
    job.wait(timeout=60)
    before = {r["step"]: r for r in read_metrics(tmp_path)}
    assert [c.name for c in complete_checkpoints(tmp_path / "checkpoints")] == ["step_00000004"]
    proc = train(tmp_path, STRATEGY=strategy, DATASET=prepared, RESUME="auto", **RUN)
    assert "resumed from" in proc.stdout and "at step 4" in proc.stdout
    after = read_metrics(tmp_path)
    assert [r["step"] for r in after] == list(range(1, STEPS + 1))
    for r in after:
        if r["step"] in before:
            assert r["loss"] == before[r["step"]]["loss"], r["step"]  # recomputed after the resume: identical
    reference = read_metrics(ddp_run[0])
    assert [r["sample_hash"] for r in after] == [r["sample_hash"] for r in reference]
    if strategy == "ddp":
        assert [r["loss"] for r in after] == [r["loss"] for r in reference]
    else:  # strategies agree in fp32 (tests/test_strategies.py holds the same bound)
        assert [r["loss"] for r in after] == pytest.approx([r["loss"] for r in reference], abs=1e-5, rel=0)
