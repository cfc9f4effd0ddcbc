"""Bad input: one line naming the value and what is allowed, exit code 2, and no process started.

Every refusal is held to what a user sees: the right exit code, no `Traceback` anywhere in the
output, the last non-empty line names the bad value, nothing in an existing OUTPUT_DIR changed,
and no process group started (the launcher's "[launch]" line comes only after every check).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, args_for, assert_refused, job_env, launch_in_process, snapshot, train

TINY_CHECKED = ["MODEL=llama-debug", "SEQ_LEN=32", "MICRO_BATCH=4", "DEVICE=cpu", "NPROC=2"]


def launch(*args, env=None, cwd=REPO, prefix=()):
    """`python -m train ARGS` in a new process: the end-to-end form of the contract."""
    return subprocess.run([*prefix, sys.executable, "-m", "train", *args], cwd=cwd, env=job_env(env),
                          capture_output=True, text=True, timeout=180)


@pytest.fixture
def launch_here(monkeypatch, capsys):
    """The same `python -m train` entry point called in this process: a refusal costs no new
    interpreter (torch, transformers and datasets are imported once), which keeps these tests fast.
    Should a check wrongly pass, the launcher's exec of `accelerate launch` fails the test instead."""

    def run(*args, env=None, cwd=REPO, prefix=()):
        assert not prefix, "a prefix needs a new process: use launch()"
        return launch_in_process(monkeypatch, capsys, *args, env=env, cwd=cwd)

    return run


@pytest.fixture
def out_dir(tmp_path):
    """An OUTPUT_DIR that already holds a run's files: a refusal must not touch them."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    (out / "tensorboard").mkdir()
    (out / "tensorboard" / "events").write_text("x")
    return out


def refused(run, out_dir, *args, fragments, env=None, cwd=REPO, prefix=()):
    before = snapshot(out_dir)
    p = run(*args, f"OUTPUT_DIR={out_dir}", env=env, cwd=cwd, prefix=prefix)
    assert_refused(p, *fragments, out=out_dir, before=before)
    return p


@pytest.mark.parametrize("args, fragments", [
    (["STRATEGY=zero4"], ["unknown strategy 'zero4'", "allowed: ddp, zero1, zero2, zero3, zero3-offload, fsdp"]),
    (["PRECISION=fp8"], ["unknown precision 'fp8'", "allowed: no, bf16, fp16"]),
    (["DATASET=/nonexistent/corpus.txt"], ["data file '/nonexistent/corpus.txt' not found"]),
    (["MODEL=no-such-org/no-such-model"], ["model 'no-such-org/no-such-model' cannot be loaded", "preset"]),
    (["GLOBAL_BATCH=10", "MICRO_BATCH=4", "NPROC=2"], ["GLOBAL_BATCH=10 is not divisible", "4 x 2 = 8"]),
    (["PRECISION=fp16", "DEVICE=cpu"], ["PRECISION=fp16 needs a CUDA GPU", "bf16"]),
    (["STRATEGY=fsdp-offload", "DEVICE=cpu"], ["STRATEGY=fsdp-offload", "needs a CUDA GPU"]),
    (["STRATEGY=ddp", "ASYNC_SAVE=true"], ["ASYNC_SAVE=true: asynchronous saving needs STRATEGY fsdp or fsdp-offload",
                                           "this run's is ddp", "save synchronously"]),
    (["CONFIG=configs/runs/nope.yaml"], ["config file 'configs/runs/nope.yaml' not found"]),
    (["RESUME=/no/such/checkpoint"], ["RESUME='/no/such/checkpoint': no such checkpoint"]),
    (["ACCELERATE_CONFIG=/no/such.yaml"], ["ACCELERATE_CONFIG file '/no/such.yaml' not found"]),
    # negative or zero sizes
    (["MICRO_BATCH=0"], ["train.micro_batch=0 is too small; it must be >= 1"]),
    (["SEQ_LEN=-1"], ["data.seq_len=-1 is too small"]),
    (["MAX_STEPS=0"], ["train.max_steps=0 is too small"]),
    (["LR=-0.1"], ["optim.lr=-0.1 must be > 0"]),
    (["NPROC=-2"], ["launch.nproc_per_node=-2 is too small"]),
    (["model.hidden_size=-64"], ["model.hidden_size=-64 is too small"]),
    (["MASTER_PORT=70000"], ["MASTER_PORT=70000 is not a TCP port"]),
    # settings only the model or the data can judge
    (["model.attn_implementation=flash"], ["model.attn_implementation='flash'"]),
    (["model.hidden_size=100", "model.num_heads=3"], ["model.hidden_size=100 is not divisible by model.num_heads=3"]),
    (["MODEL=gpt2", "model.num_layers=2"], ["model.num_layers=2 resizes presets only"]),
    (["data.text_field=body"], ["has no column 'body'; columns: ['text']"]),
    (["TOKENIZER=/no/such/tokenizer"], ["tokenizer directory '/no/such/tokenizer' not found"]),
    (["MODEL=./models/llama-finetuned"], ["model directory './models/llama-finetuned' not found"]),
    (["MODEL=tests/no-such-model"], ["model directory 'tests/no-such-model' not found"]),  # under a directory here
    (["SEQ_LEN=4096", "MICRO_BATCH=64"], ["gives", "training blocks of SEQ_LEN=4096 tokens", "one global batch of 128"]),
])
def test_bad_input_is_refused_before_any_process_starts(args, fragments, out_dir, launch_here):
    refused(launch_here, out_dir, *TINY_CHECKED, *args, fragments=fragments)


def test_unknown_key_suggests_close_matches_in_one_short_line(out_dir, launch_here):
    p = refused(launch_here, out_dir, "optim.lrr=1", fragments=["unknown config key 'optim.lrr'", "did you mean optim.lr?",
                                                  "make keys"])
    assert len(p.stderr.strip().splitlines()[-1]) < 160
    refused(launch_here, out_dir, "train.lr=1", fragments=["did you mean optim.lr?"])  # right key, wrong section


def test_yaml_syntax_error_names_file_line_and_column(out_dir, tmp_path, launch_here):
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  name: llama-debug\ntrain:\n  max_steps: [1, 2\n")
    refused(launch_here, out_dir, f"CONFIG={broken}", fragments=[f"config file '{broken}': YAML syntax error at line 5, column 1",
                                                   "started at line 4, column 14"])


@pytest.mark.parametrize("name, content, fragments", [
    ("c.jsonl", json.dumps({"content": "a story"}) + "\n", ["has no column 'text'; columns: ['content']", "data.text_field"]),
    ("binary.txt", bytes(range(256)) * 8, ["cannot be loaded", "UnicodeDecodeError"]),
    ("short.txt", "Once upon a time.\n", ["gives 0 training blocks of SEQ_LEN=32 tokens", "one global batch of 8"]),
    ("blank.txt", "\n \n\t\n", ["has no text in column 'text'"]),
    ("numbers.jsonl", json.dumps({"text": 5}) + "\n", ["column 'text' holds int values, not text"]),
])
def test_bad_data_is_found_before_any_process_starts(name, content, fragments, out_dir, tmp_path, launch_here):
    data = tmp_path / name
    data.write_bytes(content) if isinstance(content, bytes) else data.write_text(content)
    refused(launch_here, out_dir, *TINY_CHECKED, f"DATASET={data}", fragments=[f"'{data}'", *fragments])


def test_directory_without_data_files_is_refused(out_dir, tmp_path, launch_here):
    empty = tmp_path / "corpus"
    empty.mkdir()
    (empty / "README").write_text("not data")
    refused(launch_here, out_dir, *TINY_CHECKED, f"DATASET={empty}", fragments=[f"data directory '{empty}' holds no non-empty"])


def test_empty_data_file_is_refused(out_dir, tmp_path, launch_here):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    refused(launch_here, out_dir, *TINY_CHECKED, f"DATASET={empty}", fragments=[f"data file '{empty}' is empty"])


@pytest.mark.skipif(os.geteuid() == 0 and not shutil.which("setpriv"), reason="root reads everything without setpriv")
def test_unreadable_data_file_is_refused(out_dir, tmp_path):
    data = tmp_path / "secret.txt"
    data.write_text("Once upon a time.\n" * 100)
    data.chmod(0)
    # root ignores file modes; drop the capabilities that let it (CI runs as root)
    prefix = ("setpriv", "--bounding-set", "-dac_override,-dac_read_search") if os.geteuid() == 0 else ()
    refused(launch, out_dir, *TINY_CHECKED, f"DATASET={data}", prefix=prefix,
            fragments=[f"data file '{data}' cannot be read (Permission denied)"])


def test_hub_dataset_that_cannot_be_reached_is_refused(out_dir, launch_here):
    refused(launch_here, out_dir, *TINY_CHECKED, "DATASET=no-such-org/no-such-dataset",
            fragments=["dataset 'no-such-org/no-such-dataset' cannot be loaded", "HF_TOKEN"])


def test_gated_model_without_hf_token_says_so_offline(out_dir, tmp_path, launch_here):
    """Offline, nothing can ask the hub whether a repo is gated: say that no token is set."""
    env = {"HF_TOKEN": "", "HF_HOME": str(tmp_path / "hf")}
    refused(launch_here, out_dir, *TINY_CHECKED, "MODEL=meta-llama/Llama-3.1-8B", env=env,
            fragments=["model 'meta-llama/Llama-3.1-8B'", "HF_TOKEN is not set", "HF_HUB_OFFLINE"])


def test_tokenizer_larger_than_the_model_vocabulary_is_refused(out_dir, tmp_path, launch_here):
    from transformers import LlamaConfig

    model = tmp_path / "small-vocab-model"
    LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                num_attention_heads=4).save_pretrained(model)
    tokenizer = REPO / "train" / "assets" / "tokenizer"
    refused(launch_here, out_dir, *TINY_CHECKED, f"MODEL={model}", f"TOKENIZER={tokenizer}",
            fragments=[f"TOKENIZER='{tokenizer}' has", "has a vocabulary of 100"])


def test_port_in_use_is_refused(out_dir, launch_here):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        refused(launch_here, out_dir, *TINY_CHECKED, f"MASTER_PORT={port}", fragments=[f"MASTER_PORT={port} is already in use"])


def test_bad_value_in_dotenv_is_named(tmp_path):
    (tmp_path / ".env").write_text("MAX_STEPS=lots\n")
    p = launch(cwd=tmp_path)
    assert_refused(p, "train.max_steps='lots' must be an integer", "(from .env MAX_STEPS)")


def test_unsupported_accelerate_config_is_refused_naming_the_key(out_dir, tmp_path, launch_here):
    f = tmp_path / "acc.yaml"
    f.write_text("distributed_type: DEEPSPEED\ndeepspeed_config:\n  zero_stage: 2\n  offload_optimizer_device: cpu\n")
    refused(launch_here, out_dir, *TINY_CHECKED, f"ACCELERATE_CONFIG={f}", fragments=[f"ACCELERATE_CONFIG '{f}'", "offload", "stage 2"])
    f.write_text("distributed_type: FSDP\nnum_processes: 2\n")
    refused(launch_here, out_dir, *TINY_CHECKED, f"ACCELERATE_CONFIG={f}", "STRATEGY=zero2",
            fragments=["selects strategy 'fsdp' but STRATEGY=zero2"])


@pytest.mark.slow
def test_output_dir_of_a_different_run_is_refused_and_left_intact(tmp_path, launch_here):
    out = tmp_path / "run"
    train(out, MAX_STEPS=2, CHECKPOINT_EVERY=2, **{"checkpoint.export": "false"})
    before = snapshot(out)
    p = launch_here(*args_for(out, SEQ_LEN=64))
    assert_refused(p, "is from a different run", "seq_len: checkpoint has 32, this run has 64", out=out, before=before)
    p = launch_here(*args_for(out, MODEL="llama-tiny"))
    assert_refused(p, "model: checkpoint has 'llama-debug', this run has 'llama-tiny'", out=out, before=before)
    p = launch_here(*args_for(out, RESUME="never"))
    assert_refused(p, "already holds checkpoints", "RESUME=auto", out=out, before=before)
    # ddp resumes on another world size, but not in the middle of a global batch it no longer has
    p = launch_here(*args_for(out, NPROC=3, MAX_STEPS=4))
    assert_refused(p, "global batch of 8 (2 ranks)", "this run's global batch is 12 (3 ranks)", out=out, before=before)
    # the same run again: it is finished, and says how to go on instead of training nothing
    p = launch_here(*args_for(out, MAX_STEPS=2, **{"checkpoint.export": "false"}))
    assert p.returncode == 0 and "Traceback" not in p.stdout + p.stderr
    last = p.stdout.strip().splitlines()[-1]
    assert "nothing to train" in last and "MAX_STEPS" in last and "OUTPUT_DIR" in last
    assert snapshot(out) == before


def test_checkpoint_manifest_is_what_resume_checks(tmp_path, launch_here):
    """A hand-edited/corrupt manifest is reported, not a traceback."""
    ck = tmp_path / "checkpoints" / "step_00000002"
    ck.mkdir(parents=True)
    (ck / "manifest.json").write_text("{not json")
    refused(launch_here, tmp_path, *TINY_CHECKED, fragments=["unreadable manifest"])
    (ck / "manifest.json").write_text(json.dumps({"fingerprint": {}}))
    refused(launch_here, tmp_path, *TINY_CHECKED, fragments=["is from a different run"])


def test_the_issue_examples_end_to_end_in_a_new_process(out_dir, tmp_path):
    """The same contract through a real `python -m train` process, for the two reported cases."""
    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n  max_steps: [1, 2\n")
    refused(launch, out_dir, f"CONFIG={broken}", fragments=[f"config file '{broken}': YAML syntax error at line 3"])
    data = tmp_path / "c.jsonl"
    data.write_text(json.dumps({"content": "a story"}) + "\n")
    refused(launch, out_dir, *TINY_CHECKED, f"DATASET={data}", fragments=["has no column 'text'; columns: ['content']"])


@pytest.mark.slow
def test_the_file_accelerate_config_default_writes_trains(tmp_path):
    """`accelerate config default` on CPU writes distributed_type NO, use_cpu, num_processes 1:
    it runs as the checked ddp recipe with that one process, and says so."""
    acc = tmp_path / "default_config.yaml"
    subprocess.run([sys.executable, "-m", "accelerate.commands.accelerate_cli", "config", "default",
                    "--config_file", str(acc)], check=True, capture_output=True, timeout=120)
    args = [a for a in args_for(tmp_path / "run", MAX_STEPS=2, **{"checkpoint.export": "false"})
            if not a.startswith(("NPROC=", "DEVICE="))]
    p = subprocess.run([sys.executable, "-m", "train", *args, f"ACCELERATE_CONFIG={acc}"], cwd=REPO, env=job_env(),
                       capture_output=True, text=True, timeout=420)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert f"[config] ACCELERATE_CONFIG {acc} runs as the checked recipe: STRATEGY=ddp" in p.stdout
    assert "NPROC=1" in p.stdout and "world size 1" in p.stdout
    assert "engaged as MULTI_CPU world_size=1" in p.stdout


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory):
    """A small corpus prepared with the run's tokenizer, 3+ shards (copied per test before damage)."""
    from helpers import write_docs
    from train.config import DataConfig, ModelConfig
    from train.data.prepare import prepare
    from train.worker.model import load_tokenizer

    d = tmp_path_factory.mktemp("prepared")
    write_docs(d / "d.txt", 3000)
    prepare([str(d / "d.txt")], d / "p", load_tokenizer(ModelConfig(name="llama-debug")), DataConfig(shard_tokens=20_000))
    return d / "p"


def _damage(case: str, good: Path, tmp: Path) -> tuple[list[str], list[str]]:
    """(arguments, fragments of the one line) for each way a prepared corpus or mixture is wrong."""
    bad = tmp / "bad"
    shutil.copytree(good, bad)
    if case == "another tokenizer":
        m = json.loads((bad / "manifest.json").read_text())
        m["tokenizer"]["sha256"] = "0" * 16  # as a directory prepared with another tokenizer reads
        (bad / "manifest.json").write_text(json.dumps(m))
        return [f"DATASET={bad}"], ["was prepared with another tokenizer", "prepare it again with this run's MODEL/TOKENIZER"]
    if case == "truncated shard":
        f = bad / "shard-00001.tokens"
        f.write_bytes(f.read_bytes()[:100])
        return [f"DATASET={bad}"], ["shard file shard-00001.tokens is 100 bytes", "(truncated)"]
    if case == "unfinished prepare":
        (bad / "manifest.json").rename(bad / "shard-00009.json")
        return [f"DATASET={bad}"], ["is an unfinished prepare", "run `python -m train prepare --out"]
    if case == "missing mixture source":
        return [f"data.mixture={good}=0.7,{tmp}/nope=0.3"], [f"data file '{tmp}/nope' not found"]
    if case == "weight not positive":
        return [f"data.mixture={good}=0.7,{bad}=0"], [f"data.mixture weight 0 of '{bad}' must be a positive number"]
    if case == "SEQ_LEN longer than the corpus allows":
        return [f"DATASET={good}", "SEQ_LEN=8192"], ["training blocks of SEQ_LEN=8192 tokens", "and 0 held-out blocks", "smaller SEQ_LEN"]
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["another tokenizer", "truncated shard", "unfinished prepare", "missing mixture source",
                                  "weight not positive", "SEQ_LEN longer than the corpus allows"])
def test_a_bad_prepared_corpus_or_mixture_is_refused_before_any_process_starts(case, prepared_dir, out_dir, tmp_path,
                                                                              launch_here):
    args, fragments = _damage(case, prepared_dir, tmp_path)
    refused(launch_here, out_dir, *TINY_CHECKED, *args, fragments=fragments)
