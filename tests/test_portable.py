"""Portable checkpoints: resume across strategy families and world sizes; export/convert any checkpoint.

One uninterrupted ddp run is the reference. Each resumed run continues from another run's
checkpoint under another strategy (or world size) and trains to the same last step, so the
runs chain: every resumed run is also the source of the next transition. All strategies agree
in fp32, so every step's loss and samples, and every checkpoint's tensors (weights, Adam
moments, step), must match the reference's.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from helpers import REPO, job_env, read_metrics, train

from train.checkpoint.layout import MANIFEST
from train.checkpoint.portable import native_loads

pytestmark = pytest.mark.slow

STEPS = 6
RUN = {"MAX_STEPS": STEPS, "CHECKPOINT_EVERY": 1, "KEEP_CHECKPOINTS": STEPS, "GLOBAL_BATCH": 8}
# name -> (strategy, ranks, source run, step it resumes from); the reference has no source.
RUNS = {
    "ddp": ("ddp", 2, None, None),
    "zero3<ddp": ("zero3", 2, "ddp", 1),
    "ddp<zero3": ("ddp", 2, "zero3<ddp", 2),
    "zero2<ddp": ("zero2", 2, "ddp", 1),
    "fsdp<zero2": ("fsdp", 2, "zero2<ddp", 2),
    "zero2<fsdp": ("zero2", 2, "fsdp<zero2", 3),
    "zero1<zero2": ("zero1", 2, "zero2<ddp", 3),
    "zero1x1<zero1": ("zero1", 1, "zero1<zero2", 4),
    "fsdpx1<fsdp": ("fsdp", 1, "fsdp<zero2", 4),  # native: torch distributed checkpoints reshard on load
}
MATRIX = ["zero3<ddp", "ddp<zero3", "fsdp<zero2", "zero2<fsdp", "zero1x1<zero1", "fsdpx1<fsdp"]


def ckpt(out, step):
    return out / "checkpoints" / f"step_{step:08d}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """run name -> output dir, trained once (with its source chain) on first use."""
    done = {}

    def get(name):
        if name not in done:
            strategy, ranks, source, step = RUNS[name]
            out = tmp_path_factory.mktemp(name.replace("<", "-from-"))
            resume = {} if source is None else {"RESUME": str(ckpt(get(source), step))}
            proc = train(out, STRATEGY=strategy, NPROC=ranks, **resume, **RUN)
            if source is not None:
                assert f"resumed from {resume['RESUME']} at step {step}" in proc.stdout
                native = native_loads(RUNS[source][0], RUNS[source][1], strategy, ranks)
                assert ("converting through the portable form" in proc.stdout) is not native
            done[name] = out
        return done[name]

    return get


def tensors(path):
    from train.checkpoint.portable import KINDS, open_source

    src = open_source(path)
    return src.step, {(k, n): src.get(k, n) for n in src.names for k in KINDS}


def assert_same_state(a, b, atol=1e-5):
    step_a, ta = tensors(a)
    step_b, tb = tensors(b)
    assert step_a == step_b
    assert ta.keys() == tb.keys()
    for key in ta:
        torch.testing.assert_close(ta[key], tb[key], rtol=0, atol=atol, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("name", MATRIX)
def test_resume_under_another_strategy_or_world_size_continues_the_run(name, runs):
    _, _, _, step = RUNS[name]
    ref, got = read_metrics(runs("ddp")), read_metrics(runs(name))
    assert [r["step"] for r in got] == list(range(step + 1, STEPS + 1))
    assert [r["sample_hash"] for r in got] == [r["sample_hash"] for r in ref[step:]]
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in ref[step:]], abs=1e-5, rel=0)
    # The moved state: the first checkpoint after the resume, and the last, hold the reference's tensors.
    for s in (step + 1, STEPS):
        assert_same_state(ckpt(runs(name), s), ckpt(runs("ddp"), s))


def test_the_native_layouts_read_into_the_same_portable_form(runs):
    """ZeRO-2 and ZeRO-1 on 2 ranks, read offline, equal the ddp reference at the same step."""
    assert_same_state(ckpt(runs("zero2<ddp"), 2), ckpt(runs("ddp"), 2))
    assert_same_state(ckpt(runs("zero1<zero2"), 4), ckpt(runs("ddp"), 4))


def test_async_save_writes_the_checkpoints_a_sync_save_writes_and_resumes(runs, tmp_path):
    """ASYNC_SAVE=true under fsdp, each background write starting late while training goes on:
    every checkpoint still holds its own step's state (the CPU copy), counts only once written,
    has the files of a synchronous save, and load_state resumes from it. Every save's stall is logged."""
    out, resumed = tmp_path / "async", tmp_path / "resumed"
    no_export = {**RUN, "checkpoint.export": "false"}
    train(out, env={"TRAIN_FAILPOINTS": "slow_async_write=0.5"}, STRATEGY="fsdp", NPROC=2, ASYNC_SAVE="true",
          **no_export)
    stalls = [r for r in read_metrics(out, raw=True) if "checkpoint_stall_s" in r]
    assert [r["step"] for r in stalls] == list(range(1, STEPS + 1))
    assert all(r["checkpoint_stall_s"] > 0 for r in stalls), stalls
    for s in range(1, STEPS + 1):
        assert_same_state(ckpt(out, s), ckpt(runs("ddp"), s))

    proc = train(resumed, STRATEGY="fsdp", NPROC=2, RESUME=str(ckpt(out, 3)), **no_export)  # synchronous saves
    assert f"resumed from {ckpt(out, 3)} at step 3" in proc.stdout and "converting" not in proc.stdout
    ref = read_metrics(runs("ddp"))
    assert [r["loss"] for r in read_metrics(resumed)] == pytest.approx([r["loss"] for r in ref[3:]], abs=1e-5, rel=0)
    files = [{str(f.relative_to(d)) for f in d.rglob("*") if f.is_file()} for d in (ckpt(out, 6), ckpt(resumed, 6))]
    assert files[0] == files[1] and "pytorch_model_fsdp_0/.metadata" in files[0], files


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "train", *map(str, args)], cwd=REPO, env=job_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("name", ["ddp", "zero3<ddp"])
def test_export_of_the_final_checkpoint_equals_final(name, runs, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = runs(name)
    p = cli("export", ckpt(out, STEPS), tmp_path / "hf")
    assert p.returncode == 0, p.stderr[-3000:]
    ours, final = load_file(tmp_path / "hf" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert ours.keys() == final.keys()
    for k in final:
        assert torch.equal(ours[k], final[k]), k
    probe = torch.load(out / "final_probe.pt")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=probe["input_ids"]).logits, probe["logits"], rtol=1e-4, atol=1e-4)


def test_export_of_a_mid_run_zero3_checkpoint_loads_with_the_runs_weights(runs, tmp_path):
    """Sharded ZeRO-3 step 3, exported in small shards, loads with from_pretrained and holds the
    weights the ddp reference had at step 3."""
    from transformers import AutoModelForCausalLM

    p = subprocess.run([sys.executable, "-m", "train", "export", str(ckpt(runs("zero3<ddp"), 3)), str(tmp_path / "hf")],
                       cwd=REPO, env=job_env({"TRAIN_PORTABLE_SHARD_BYTES": "100000"}), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    _, ref = tensors(ckpt(runs("ddp"), 3))
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), ref[("param", n)], rtol=0, atol=1e-5)


def test_convert_ahead_of_time_then_resume_on_one_rank(runs, tmp_path):
    """A zero3 checkpoint converted for fsdp resumes on one rank without reading ZeRO shards again."""
    out = tmp_path / "converted"
    p = cli("convert", ckpt(runs("zero3<ddp"), 4), out, "--to", "fsdp", "--world-size", 1)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (out / MANIFEST).is_file() and (out / "portable" / "index.json").is_file()
    assert_same_state(out, ckpt(runs("zero3<ddp"), 4), atol=0)  # only converted, not trained: bitwise
    assert not list(out.glob("pytorch_model*"))
    run = tmp_path / "run"
    proc = train(run, STRATEGY="fsdp", NPROC=1, RESUME=str(out), **{**RUN, "MAX_STEPS": 5, "checkpoint.export": "false"})
    assert "was converted from zero3" in proc.stdout
    ref = read_metrics(runs("ddp"))
    assert [r["loss"] for r in read_metrics(run)] == pytest.approx([ref[4]["loss"]], abs=1e-5, rel=0)


def test_bad_inputs_give_one_line_errors(runs, tmp_path):
    import shutil

    src = ckpt(runs("ddp"), 2)
    p = cli("convert", src, tmp_path / "x", "--to", "zero9")
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0
    assert "--to 'zero9' is not a strategy; choose one of ddp, zero1" in p.stderr

    damaged = tmp_path / "damaged"
    shutil.copytree(src, damaged)
    victim = damaged / "optimizer.bin"
    victim.write_bytes(victim.read_bytes()[:1000])
    p = cli("export", damaged, tmp_path / "hf")
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0
    assert "is damaged: optimizer.bin is 1000 bytes" in p.stderr

    # Another model's checkpoint is refused before any process starts, also across strategies.
    p = train(tmp_path / "other", check=False, STRATEGY="zero3", MODEL="llama-tiny", RESUME=str(src), **RUN)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0, p.stderr[-2000:]
    assert "model: checkpoint has 'llama-debug', this run has 'llama-tiny'" in p.stderr
    assert "[launch]" not in p.stdout
