"""Every strategy, for real: 2 processes, a gloo process group, real sharding, real checkpoints.

One uninterrupted 8-step run per strategy is shared by the tests below; the kill/resume test
adds a second run that is SIGKILLed at a step chosen from the strategy name and resumed, for
each checkpoint layout (DDP, ZeRO-1/2 partitions, ZeRO-3 partitions, FSDP's torch distributed
checkpoint); zero1 and zero3-offload write the layouts of zero2 and zero3.
"""

from __future__ import annotations

import math
import random
import zlib

import pytest
import torch
from helpers import kill_tree, losses, read_metrics, shape_of, start, train, wait_for_step

from train.checkpoint.layout import MANIFEST, complete_checkpoints
from train.config.strategies import GRADS, OPTIM, PARAMS, STRATEGIES
from train.memory import held_bytes

pytestmark = pytest.mark.slow

CPU_STRATEGIES = [name for name, s in STRATEGIES.items() if not s.gpu_only]
STEPS = 8
RUN = {"MAX_STEPS": STEPS, "CHECKPOINT_EVERY": 2, "KEEP_CHECKPOINTS": 2}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """strategy -> output dir of its uninterrupted run (started lazily, once)."""
    done = {}

    def get(name: str):
        if name not in done:
            out = tmp_path_factory.mktemp(f"run-{name}")
            proc = train(out, STRATEGY=name, **RUN)
            done[name] = (out, proc)
        return done[name]

    return get


@pytest.mark.parametrize("strategy", CPU_STRATEGIES)
def test_strategy_trains_checkpoints_and_exports(strategy, runs):
    out, proc = runs(strategy)
    assert f"strategy={strategy} engaged as" in proc.stdout
    assert "world_size=2" in proc.stdout
    curve = losses(out)
    assert [r["step"] for r in read_metrics(out)] == list(range(1, STEPS + 1))
    assert all(math.isfinite(x) for x in curve)
    assert curve[-1] < curve[0] - 0.05, f"loss did not decrease: {curve}"
    ckpts = complete_checkpoints(out / "checkpoints")
    assert [c.name for c in ckpts] == ["step_00000006", "step_00000008"]  # keep=2, newest kept
    assert all((c / MANIFEST).is_file() for c in ckpts)


@pytest.mark.parametrize("strategy", CPU_STRATEGIES)
def test_export_loads_with_from_pretrained_and_matches_trained_logits(strategy, runs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = runs(strategy)
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    AutoTokenizer.from_pretrained(out / "final")
    probe = torch.load(out / "final_probe.pt")
    n = sum(p.numel() for p in model.parameters())
    assert n > 100_000  # not the empty tensors of an ungathered ZeRO-3 save
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"]).logits
    torch.testing.assert_close(logits, probe["logits"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("strategy", [s for s in CPU_STRATEGIES if s != "ddp"])
def test_fp32_losses_match_ddp(strategy, runs):
    ddp, ours = losses(runs("ddp")[0]), losses(runs(strategy)[0])
    assert ours == pytest.approx(ddp, abs=1e-5, rel=0)


@pytest.mark.parametrize("strategy", ["ddp", "zero2", "zero3", "fsdp"])
def test_planner_matches_bytes_measured_per_rank_within_10_percent(strategy, runs):
    """One run per sharding family: the loop's held_bytes (rank 0, right before the first
    optimizer step) against the planner's numbers (train/tools/plan.py) for the same model and N=2."""
    measured = _held(runs(strategy)[0])
    cfg, shape = shape_of("MODEL=llama-debug", "SEQ_LEN=32")
    planned = held_bytes(strategy, shape.params, 2, cfg.train.precision)
    for cat in (PARAMS, GRADS, OPTIM):
        assert measured[cat] == pytest.approx(planned[cat], rel=0.10), (cat, measured, planned)


def _held(out):
    return read_metrics(out)[0]["held_bytes"]


@pytest.mark.parametrize("strategy", [s for s in CPU_STRATEGIES if s != "ddp"])
def test_sharded_strategies_hold_half_of_what_ddp_holds(strategy, runs):
    ddp, ours = _held(runs("ddp")[0]), _held(runs(strategy)[0])
    shards = STRATEGIES[strategy].shards
    for cat in (PARAMS, OPTIM):
        ratio = ours[cat] / ddp[cat]
        expected = 0.5 if cat in shards else 1.0
        assert ratio == pytest.approx(expected, abs=0.05), f"{cat}: {ours[cat]} vs ddp {ddp[cat]}"
    if GRADS in shards:
        assert ours[GRADS] / ddp[GRADS] == pytest.approx(0.5, abs=0.05)


@pytest.mark.parametrize("strategy", ["ddp", "zero2", "zero3", "fsdp"])
def test_kill_9_then_resume_continues_the_exact_curve(strategy, runs, tmp_path):
    """SIGKILL the whole job at a step chosen from the strategy name; resuming must give the
    uninterrupted run's losses and consume the same samples at every step (bitwise in fp32)."""
    reference = read_metrics(runs(strategy)[0])
    kill_at = random.Random(zlib.crc32(strategy.encode())).randint(3, STEPS - 2)
    # Slow each step down so the external kill lands mid-run, as a preemption would.
    job = start(tmp_path, STRATEGY=strategy, env={"TRAIN_FAILPOINTS": "step_sleep=0.5"}, **RUN)
    wait_for_step(tmp_path, kill_at, job)
    kill_tree(job)
    job.wait(timeout=60)
    assert job.returncode != 0
    assert (tmp_path / "final").exists() is False, "the job finished before it was killed" 
    saved = complete_checkpoints(tmp_path / "checkpoints")
    assert saved, "no complete checkpoint before the kill"
    proc = train(tmp_path, STRATEGY=strategy, RESUME="auto", **RUN)
    assert f"resumed from {saved[-1]}" in proc.stdout
    resumed = read_metrics(tmp_path)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    assert [r["sample_hash"] for r in resumed] == [r["sample_hash"] for r in reference]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in reference]


def test_a_local_model_directory_trains_through_from_pretrained(runs, tmp_path):
    """The hub-name code path (AutoModelForCausalLM/AutoTokenizer.from_pretrained), offline:
    continue training the DDP run's export from its directory (one process is enough)."""
    exported = runs("ddp")[0] / "final"
    proc = train(tmp_path, MODEL=str(exported), NPROC=1, MAX_STEPS=1, CHECKPOINT_EVERY=0,
                 **{"checkpoint.export": "false"})
    assert "engaged as" in proc.stdout
    first = losses(tmp_path)[0]
    assert first < losses(runs("ddp")[0])[0] - 0.1  # starts from the trained weights, not from scratch
