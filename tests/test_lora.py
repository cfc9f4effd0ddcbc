"""LoRA fine-tuning (PEFT) of a saved pretrained model under ddp, zero3 and fsdp, 2 processes each.

One uninterrupted run per strategy is shared by the tests; the kill/resume test adds a run that
is SIGKILLed mid-way and resumed. The "pretrained" model is the llama-debug preset written once
with save_pretrained and loaded by path, the way a hub model is.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import (
    REPO,
    args_for,
    assert_refused,
    job_env,
    kill_tree,
    losses,
    read_metrics,
    save_tiny_pretrained,
    start,
    train,
    wait_for_step,
)

from train.checkpoint.layout import complete_checkpoints

pytestmark = pytest.mark.slow

STRATEGIES = ["ddp", "zero3", "fsdp"]
STEPS, R, TARGETS = 6, 8, ("q_proj", "v_proj")  # PEFT's default targets for llama
RUN = {"MAX_STEPS": STEPS, "CHECKPOINT_EVERY": 2, "KEEP_CHECKPOINTS": 2, "LORA_R": R, "LR": 0.02}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    return save_tiny_pretrained(tmp_path_factory.mktemp("pretrained"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, pretrained):
    done = {}

    def get(strategy: str):
        if strategy not in done:
            out = tmp_path_factory.mktemp(f"lora-{strategy}")
            done[strategy] = (out, train(out, STRATEGY=strategy, MODEL=pretrained, **RUN))
        return done[strategy]

    return get


def predicted_trainable(pretrained) -> int:
    """LoRA adds A (r x in) and B (out x r) to each targeted Linear, and nothing else trains."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(pretrained)
    return sum(R * (m.in_features + m.out_features) for n, m in model.named_modules() if n.endswith(TARGETS))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_lora_trains_only_the_adapters(strategy, runs, pretrained):
    out, proc = runs(strategy)
    assert f"strategy={strategy} engaged as" in proc.stdout and "world_size=2" in proc.stdout
    curve = losses(out)
    assert len(curve) == STEPS and all(math.isfinite(x) for x in curve)
    assert curve[-1] < curve[0] - 0.05, f"loss did not decrease: {curve}"
    trainable = predicted_trainable(pretrained)
    assert f"{trainable} trainable" in proc.stdout
    # Adam holds two fp32 moments per trainable parameter: 8 bytes each, split over 2 ranks if sharded.
    held = read_metrics(out)[0]["held_bytes"]
    world_share = 1 if strategy == "ddp" else 2
    assert held["optimizer"] == pytest.approx(8 * trainable / world_share, rel=0.02)
    assert held["gradients"] == pytest.approx(4 * trainable / world_share, rel=0.02)


@pytest.mark.parametrize("strategy", [s for s in STRATEGIES if s != "ddp"])
def test_lora_losses_match_ddp(strategy, runs):
    assert losses(runs(strategy)[0]) == pytest.approx(losses(runs("ddp")[0]), abs=1e-5, rel=0)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_adapter_and_merged_export_give_the_trained_logits(strategy, runs, pretrained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, _ = runs(strategy)
    probe = torch.load(out / "final_probe.pt")
    base = AutoModelForCausalLM.from_pretrained(pretrained)
    n_base = sum(p.numel() for p in base.parameters())
    adapted = PeftModel.from_pretrained(base, out / "final" / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(out / "final")
    assert sum(p.numel() for p in merged.parameters()) == n_base  # adapters folded in, none left over
    with torch.no_grad():
        for model in (adapted, merged):
            logits = model(input_ids=probe["input_ids"]).logits
            torch.testing.assert_close(logits, probe["logits"], rtol=1e-4, atol=1e-4)
        with adapted.disable_adapter():  # the adapters trained: without them the logits differ
            base_logits = adapted(input_ids=probe["input_ids"]).logits
        assert (base_logits - probe["logits"]).abs().max() > 1e-3


@pytest.mark.parametrize("strategy", ["fsdp"])  # resume per layout: test_strategies; frozen base + adapters: here
def test_lora_kill_9_then_resume_continues_the_exact_curve(strategy, runs, pretrained, tmp_path):
    reference = read_metrics(runs(strategy)[0])
    job = start(tmp_path, STRATEGY=strategy, MODEL=pretrained, env={"TRAIN_FAILPOINTS": "step_sleep=0.5"}, **RUN)
    wait_for_step(tmp_path, 3, job)
    kill_tree(job)
    job.wait(timeout=60)
    assert job.returncode != 0 and not (tmp_path / "final").exists()
    saved = complete_checkpoints(tmp_path / "checkpoints")
    assert saved, "no complete checkpoint before the kill"
    proc = train(tmp_path, STRATEGY=strategy, MODEL=pretrained, RESUME="auto", **RUN)
    assert f"resumed from {saved[-1]}" in proc.stdout
    resumed = read_metrics(tmp_path)
    assert [r["sample_hash"] for r in resumed] == [r["sample_hash"] for r in reference]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in reference]


def test_a_lora_target_the_model_lacks_is_refused_in_one_line(pretrained, tmp_path):
    import subprocess
    import sys

    args = args_for(tmp_path, MODEL=pretrained, LORA_R=R, **{"model.lora_target_modules": "q_proj,qkv_proj"})
    p = subprocess.run([sys.executable, "-m", "train", *args], cwd=REPO, env=job_env(), capture_output=True,
                       text=True, timeout=120)
    assert_refused(p, "model.lora_target_modules='q_proj,qkv_proj'", "no module named qkv_proj", "v_proj")


def test_a_lora_checkpoint_is_not_resumed_with_other_lora_settings(tmp_path):
    from train.checkpoint.layout import check_compatible
    from train.config import ConfigError, load_config

    def cfg(*args):
        return load_config(list(args), env={}, dotenv_path=None)

    saved = {"fingerprint": cfg("LORA_R=8").fingerprint()}
    for other in (cfg(), cfg("LORA_R=16"), cfg("LORA_R=8", "model.lora_target_modules=all-linear")):
        with pytest.raises(ConfigError, match="lora: checkpoint has 'r=8 targets='"):
            check_compatible(saved, other, 1, tmp_path)
    # a checkpoint written before LoRA existed still resumes a run without LoRA
    plain = cfg()
    check_compatible({"fingerprint": {k: v for k, v in plain.fingerprint().items() if k != "lora"}}, plain, 1, tmp_path)


def test_the_lora_run_file_loads_and_its_targets_fit_the_model(pretrained):
    from train.config import load_config
    from train.launcher.inputs import check_finetuning_and_tracking

    cfg = load_config(["CONFIG=configs/runs/lora.yaml", f"MODEL={pretrained}"], env={}, dotenv_path=None)
    assert cfg.model.lora_r == 16 and cfg.checkpoint.merge_lora
    check_finetuning_and_tracking(cfg)
