"""Configuration: YAML < .env < environment < CLI, typed, unknown keys refused."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from train.config import ENV_VARS, ConfigError, allowed_keys, dump_yaml, load_config, resolve_batch
from train.strategies import STRATEGIES

REPO = Path(__file__).resolve().parent.parent


def load(args=(), env=None, dotenv=None):
    return load_config(list(args), env=env or {}, dotenv_path=dotenv)


def test_defaults_come_from_the_tiny_run_file():
    cfg = load()
    assert cfg.model.name == "llama-tiny" and cfg.launch.strategy == "ddp" and cfg.train.precision == "no"


def test_precedence_yaml_then_dotenv_then_environment_then_cli(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("train:\n  max_steps: 11\n  micro_batch: 3\nseed: 7\n")
    dotenv = tmp_path / ".env"
    dotenv.write_text("MAX_STEPS=22\nSEED=8\nLR=0.5\n")
    cfg = load(["train.micro_batch=5"], env={"CONFIG": str(run), "MAX_STEPS": "33"}, dotenv=str(dotenv))
    assert cfg.train.max_steps == 33  # environment beats .env
    assert cfg.seed == 8  # .env beats YAML
    assert cfg.optim.lr == 0.5
    assert cfg.train.micro_batch == 5  # CLI beats YAML
    cfg = load(["MAX_STEPS=44"], env={"CONFIG": str(run), "MAX_STEPS": "33"})
    assert cfg.train.max_steps == 44  # CLI beats environment


def test_empty_environment_values_are_unset():
    assert load(env={"STRATEGY": "", "MAX_STEPS": ""}).launch.strategy == "ddp"


@pytest.mark.parametrize("args, message", [
    (["train.max_stepz=3"], "unknown config key 'train.max_stepz'"),
    (["bogus=1"], "unknown config key 'bogus'"),
    (["train.max_steps=ten"], "train.max_steps='ten' must be an integer"),
    (["STRATEGY=zero4"], "unknown strategy 'zero4'; allowed: ddp, zero1"),
    (["PRECISION=fp8"], "unknown precision 'fp8'; allowed: no, bf16, fp16"),
    (["train.micro_batch=0"], "train.micro_batch=0 is too small"),
    (["NNODES=2", "NODE_RANK=2"], "node_rank=2 must be in [0, nnodes=2)"),
    (["log.tensorboard=maybe"], "is not a boolean"),
    (["notakeyvalue"], "overrides look like section.key=value"),
])
def test_bad_values_are_one_line_errors_naming_value_and_allowed(args, message):
    with pytest.raises(ConfigError) as e:
        load(args)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    run = tmp_path / "bad.yaml"
    run.write_text("train:\n  learning_rate: 1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'train.learning_rate' \(from .*bad.yaml\)"):
        load(env={"CONFIG": str(run)})


def test_yaml_no_stays_the_string_no(tmp_path):
    run = tmp_path / "r.yaml"
    run.write_text("train:\n  precision: no\n")
    assert load(env={"CONFIG": str(run)}).train.precision == "no"


def test_global_batch_fixes_the_samples_per_step_and_derives_accumulation():
    cfg = load(["GLOBAL_BATCH=16", "MICRO_BATCH=2"])
    assert resolve_batch(cfg, 2) == (4, 16)
    assert resolve_batch(cfg, 4) == (2, 16)
    with pytest.raises(ConfigError, match="GLOBAL_BATCH=16 is not divisible by MICRO_BATCH x world size = 2 x 3 = 6"):
        resolve_batch(cfg, 3)


def test_secrets_are_redacted_in_the_printed_config():
    cfg = load(["MODEL=llama-debug"])
    text = dump_yaml(cfg)
    assert "llama-debug" in text
    assert "***" not in text  # nothing secret in the config today; HF_TOKEN is read from env only


def test_every_short_name_maps_to_a_real_key():
    keys = set(allowed_keys())
    assert set(ENV_VARS.values()) <= keys


def test_makefile_reads_run_settings_from_the_config_table():
    """The Makefile's RUN_VARS (what `make` passes on to compose) are the package's names."""
    import subprocess

    makefile = (REPO / "Makefile").read_text()
    assert "keys --env-names" in makefile and "RUN_VARS" in makefile
    out = subprocess.run(["make", "-s", "-f", str(REPO / "Makefile"), "help", f"VENV={REPO / '.venv'}"],
                         capture_output=True, text=True, timeout=60, cwd="/")
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("Run settings"))
    assert line.split(": ", 1)[1].split() == ["CONFIG", *ENV_VARS]


def test_every_enumerated_setting_is_checked_against_its_literal_type():
    import typing

    from train.config import RunConfig, help_text

    hints = typing.get_type_hints(RunConfig)
    literals = {f"{sec}.{k}": typing.get_args(t) for sec in ("launch", "train", "optim")
                for k, t in typing.get_type_hints(hints[sec]).items() if typing.get_origin(t) is typing.Literal}
    assert literals == {"launch.device": ("auto", "cpu", "cuda"), "train.precision": ("no", "bf16", "fp16"),
                        "optim.schedule": ("cosine", "linear", "constant")}
    for key, allowed in literals.items():
        assert load([f"{key}={allowed[-1]}"]) is not None
        with pytest.raises(ConfigError, match=f"unknown {key.split('.')[1]} 'x'; allowed: {', '.join(allowed)}"):
            load([f"{key}=x"])
        assert " | ".join(allowed) in help_text()


def test_strategy_rows_agree_with_their_config_files():
    """zero_stage and offload are said in the row and in the files: they must agree."""
    import json

    import yaml

    for s in STRATEGIES.values():
        acc = yaml.safe_load(s.accelerate_config.read_text())
        if s.family == "deepspeed":
            zero = json.loads(s.deepspeed_config.read_text())["zero_optimization"]
            assert zero["stage"] == s.zero_stage, s.name
            offloaded = {k for k in ("offload_param", "offload_optimizer") if zero.get(k, {}).get("device") == "cpu"}
            assert offloaded == ({"offload_param", "offload_optimizer"} if s.offload else set()), s.name
        else:
            assert s.zero_stage is None, s.name
        if s.family == "fsdp":
            assert acc["fsdp_config"]["fsdp_offload_params"] is s.offload, s.name
        if s.family == "ddp":
            assert not s.offload and not s.shards


def test_strategy_files_and_table_agree():
    files = {p.stem for p in (REPO / "configs" / "strategies").glob("*.yaml")}
    assert files == set(STRATEGIES)
    engine_files = {p.stem for p in (REPO / "configs" / "deepspeed").glob("*.json")}
    assert engine_files == {n for n, s in STRATEGIES.items() if s.family == "deepspeed"}
    for s in STRATEGIES.values():
        text = s.accelerate_config.read_text()
        assert re.search(rf"distributed_type: {s.distributed_type}\b", text), s.name
        if s.deepspeed_config is not None:
            assert s.deepspeed_config.is_file() and str(s.deepspeed_config.relative_to(REPO)) in text


def test_dotenv_also_exports_non_config_variables_like_hf_token(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("NCCL_DEBUG", "WARN")
    (tmp_path / ".env").write_text("HF_TOKEN=hf_secret\nNCCL_DEBUG=INFO\nMAX_STEPS=7\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config([])
    assert cfg.train.max_steps == 7
    assert os.environ["HF_TOKEN"] == "hf_secret"  # what transformers and the workers read
    assert os.environ["NCCL_DEBUG"] == "WARN"  # the real environment wins
    for k in ("HF_TOKEN", "MAX_STEPS"):  # set by load_config itself, so monkeypatch would not undo them
        os.environ.pop(k, None)


def test_empty_environment_variables_do_not_hide_dotenv(tmp_path):
    (tmp_path / ".env").write_text("MAX_STEPS=9\n")
    assert load(env={"MAX_STEPS": ""}, dotenv=str(tmp_path / ".env")).train.max_steps == 9


def test_make_passes_command_line_settings_and_keeps_dotenv(tmp_path):
    """`make` must not export unset run settings as empty strings: they would hide `.env`."""
    import subprocess
    import time

    (tmp_path / ".env").write_text("MAX_STEPS=9\nSEED=5\n")
    for f in ("constraints.txt", "pyproject.toml"):  # the venv stamp's prerequisites, older than it
        (tmp_path / f).write_text("")
    time.sleep(0.01)
    (tmp_path / "stamp").write_text("")
    out = subprocess.run(["make", "-s", "-f", str(REPO / "Makefile"), "config", "SEED=6",
                          f"VENV={REPO / '.venv'}", f"STAMP={tmp_path / 'stamp'}"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in os.environ.items() if k not in ENV_VARS})
    assert out.returncode == 0, out.stderr
    assert "max_steps: 9" in out.stdout  # from .env
    assert "seed: 6" in out.stdout  # the make command line wins over .env
