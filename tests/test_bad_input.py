"""Bad input: a one-line error naming the value and what is allowed, exit code 2, and no
process started (the launcher's "[launch]" line is printed only after every check passed)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, args_for, job_env, train


def launch(*args, env=None, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "train", *args], cwd=cwd, env=job_env(env),
                          capture_output=True, text=True, timeout=120)


def assert_refused(p, *fragments):
    assert p.returncode == 2, p.stdout + p.stderr
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, p.stderr
    for f in fragments:
        assert f in errors[0], errors[0]
    assert "[launch]" not in p.stdout and "Traceback" not in p.stderr


@pytest.mark.parametrize("args, fragments", [
    (["STRATEGY=zero4"], ["unknown strategy 'zero4'", "allowed: ddp, zero1, zero2, zero3, zero3-offload, fsdp"]),
    (["PRECISION=fp8"], ["unknown precision 'fp8'", "allowed: no, bf16, fp16"]),
    (["train.learning_rate=1"], ["unknown config key 'train.learning_rate'", "allowed: output_dir"]),
    (["DATASET=/nonexistent/corpus.txt"], ["data file '/nonexistent/corpus.txt' not found"]),
    (["MODEL=no-such-org/no-such-model"], ["model 'no-such-org/no-such-model' cannot be loaded", "preset"]),
    (["GLOBAL_BATCH=10", "MICRO_BATCH=4", "NPROC=2"], ["GLOBAL_BATCH=10 is not divisible", "4 x 2 = 8"]),
    (["PRECISION=fp16", "DEVICE=cpu"], ["PRECISION=fp16 needs a CUDA GPU", "bf16"]),
    (["STRATEGY=fsdp-offload", "DEVICE=cpu"], ["STRATEGY=fsdp-offload", "needs a CUDA GPU"]),
    (["CONFIG=configs/runs/nope.yaml"], ["config file 'configs/runs/nope.yaml' not found"]),
    (["RESUME=/no/such/checkpoint"], ["RESUME='/no/such/checkpoint': no such checkpoint"]),
    (["ACCELERATE_CONFIG=/no/such.yaml"], ["ACCELERATE_CONFIG file '/no/such.yaml' not found"]),
])
def test_bad_input_is_refused_before_any_process_starts(args, fragments, tmp_path):
    assert_refused(launch(*args, f"OUTPUT_DIR={tmp_path}"), *fragments)


def test_empty_data_file_is_refused(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert_refused(launch(f"DATASET={empty}", f"OUTPUT_DIR={tmp_path}"), f"data file '{empty}' is empty")


def test_bad_value_in_dotenv_is_named(tmp_path):
    (tmp_path / ".env").write_text("MAX_STEPS=lots\n")
    p = subprocess.run([sys.executable, "-m", "train", "config"], cwd=tmp_path, env=job_env(),
                       capture_output=True, text=True, timeout=60)
    assert_refused(p, "train.max_steps='lots' must be an integer", "(from .env MAX_STEPS)")


@pytest.mark.slow
def test_output_dir_of_a_different_run_is_refused_and_left_intact(tmp_path):
    train(tmp_path, MAX_STEPS=2, CHECKPOINT_EVERY=2, **{"checkpoint.export": "false"})
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    p = launch(*args_for(tmp_path, SEQ_LEN=64))
    assert_refused(p, "is from a different run", "seq_len: checkpoint has 32, this run has 64")
    p = launch(*args_for(tmp_path, MODEL="llama-tiny"))
    assert_refused(p, "model: checkpoint has 'llama-debug', this run has 'llama-tiny'")
    p = launch(*args_for(tmp_path, RESUME="never"))
    assert_refused(p, "already holds checkpoints", "RESUME=auto")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before


def test_checkpoint_manifest_is_what_resume_checks(tmp_path):
    """A hand-edited/corrupt manifest is reported, not a traceback."""
    ck = tmp_path / "checkpoints" / "step_00000002"
    ck.mkdir(parents=True)
    (ck / "manifest.json").write_text("{not json")
    assert_refused(launch(f"OUTPUT_DIR={tmp_path}", "MODEL=llama-debug"), "unreadable manifest")
    (ck / "manifest.json").write_text(json.dumps({"fingerprint": {}}))
    assert_refused(launch(f"OUTPUT_DIR={tmp_path}", "MODEL=llama-debug"), "is from a different run")
