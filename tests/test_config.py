"""Configuration: YAML < .env < environment < CLI, typed, unknown keys refused."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from train.config import ENV_VARS, ConfigError, allowed_keys, dump_yaml, load_config, resolve_batch
from train.config.strategies import STRATEGIES

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
    (["log.progress=maybe"], "is not a boolean"),
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
    cfg = load(["MODEL=llama-debug", "TOKENIZER=org/tok", "DATASET=https://user:pa55@host/x.jsonl",
                "data.cache_dir=/c/hf_abcdefghijklmnopqrstuvwxyz0123"])
    text = dump_yaml(cfg)
    assert "llama-debug" in text and "tokenizer: org/tok" in text  # settings are kept, even named like secrets
    assert "pa55" not in text and "https://***@host/x.jsonl" in text
    assert "hf_abcdefghijklmnopqrstuvwxyz0123" not in text and "/c/***" in text


def test_unknown_keys_get_close_matches_and_a_pointer_to_make_keys_not_the_whole_list():
    with pytest.raises(ConfigError) as e:
        load(["optim.lrr=1"])
    assert str(e.value) == "unknown config key 'optim.lrr' (from command line); did you mean optim.lr? `make keys` lists every key"
    with pytest.raises(ConfigError, match="did you mean optim.weight_decay"):
        load(["train.weight_decay=0"])
    with pytest.raises(ConfigError, match="did you mean MAX_STEPS"):
        load(["MAX_STEP=3"])


def test_yaml_syntax_error_names_line_and_column(tmp_path):
    run = tmp_path / "r.yaml"
    run.write_text("train:\n  max_steps: 5\n  micro_batch 4\n  x: 1\n")
    with pytest.raises(ConfigError, match=r"config file '.*r.yaml': YAML syntax error at line 4, column 3: could not find expected ':' \(while scanning a simple key started at line 3, column 3\)"):
        load(env={"CONFIG": str(run)})


def test_resume_accepts_the_short_checkpoint_name(tmp_path):
    ck = tmp_path / "checkpoints" / "step_00000050"
    ck.mkdir(parents=True)
    assert load([f"RESUME={tmp_path}/checkpoints/step_50"]).checkpoint.resume == str(ck)
    assert load([f"RESUME={ck}"]).checkpoint.resume == str(ck)
    with pytest.raises(ConfigError, match="no such checkpoint"):
        load([f"RESUME={tmp_path}/checkpoints/step_60"])
    # A checkpoint in a bucket is looked up there by the launcher (find_resume), not on this disk.
    url = "s3://bucket/run/checkpoints/step_00000004"
    assert load([f"RESUME={url}"]).checkpoint.resume == url


def test_preset_size_overrides_build_another_size_and_change_the_fingerprint():
    from train.worker.model import model_config

    cfg = load(["MODEL=llama-tiny", "model.hidden_size=128", "model.num_layers=3", "model.num_heads=2"])
    conf = model_config(cfg.model, 640)
    assert (conf.hidden_size, conf.num_hidden_layers, conf.num_attention_heads, conf.num_key_value_heads) == (128, 3, 2, 2)
    assert conf.intermediate_size == 688  # not overridden: the preset's
    assert cfg.fingerprint()["model"] == "llama-tiny(hidden_size=128, num_layers=3, num_heads=2)"
    assert load(["MODEL=llama-tiny"]).fingerprint()["model"] == "llama-tiny"  # old checkpoints still match


# -- a user's own `accelerate config` file -------------------------------------------------------
ACCELERATE_FILES = {
    "multi_gpu.yaml": "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_machines: 1\n"
                      "num_processes: 4\nmixed_precision: bf16\ngpu_ids: all\nuse_cpu: false\n",
    "deepspeed.yaml": "distributed_type: DEEPSPEED\ndeepspeed_config:\n  deepspeed_config_file: ds.json\n"
                      "  zero3_init_flag: true\nnum_machines: 2\nnum_processes: 16\nmain_process_ip: 10.0.0.1\n"
                      "main_process_port: 29555\nmixed_precision: bf16\n",
    "fsdp.yaml": "distributed_type: FSDP\nfsdp_config:\n  fsdp_version: 1\n  fsdp_offload_params: false\n"
                 "num_processes: 2\nmixed_precision: 'no'\n",
}


@pytest.fixture(scope="module")
def accelerate_files(tmp_path_factory):
    import json
    import subprocess
    import sys

    tmp_path = tmp_path_factory.mktemp("accelerate")
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_batch_size": "auto"}))
    for name, text in ACCELERATE_FILES.items():
        (tmp_path / name).write_text(text)
    subprocess.run([sys.executable, "-m", "accelerate.commands.accelerate_cli", "config", "default",
                    "--config_file", str(tmp_path / "default.yaml")], check=True, capture_output=True, timeout=120)
    return tmp_path


@pytest.mark.parametrize("name, expected", [
    ("default.yaml", dict(strategy="ddp", nproc_per_node=1, device="cpu", precision="no")),
    ("multi_gpu.yaml", dict(strategy="ddp", nproc_per_node=4, device="auto", precision="bf16")),
    ("deepspeed.yaml", dict(strategy="zero2", nproc_per_node=8, nnodes=2, master_addr="10.0.0.1", master_port=29555)),
    ("fsdp.yaml", dict(strategy="fsdp", nproc_per_node=2)),
])
def test_an_accelerate_config_file_runs_as_the_matching_checked_recipe(accelerate_files, name, expected):

    cfg = load([f"ACCELERATE_CONFIG={accelerate_files / name}"])
    got = {k: getattr(cfg.train if k == "precision" else cfg.launch, k) for k in expected}
    assert got == expected
    assert cfg.launch.accelerate_config == ""  # consumed: launcher and workers run the strategy row
    assert cfg.notes[0].startswith(f"ACCELERATE_CONFIG {accelerate_files / name} runs as the checked recipe: "
                                    f"STRATEGY={expected['strategy']}")


def test_settings_given_for_this_run_win_over_the_accelerate_file_with_a_notice(accelerate_files):

    cfg = load([f"ACCELERATE_CONFIG={accelerate_files / 'multi_gpu.yaml'}", "NPROC=2"], env={"PRECISION": "no"})
    assert (cfg.launch.nproc_per_node, cfg.train.precision) == (2, "no")
    assert "NPROC=2 (command line NPROC) wins over launch.nproc_per_node = 4 from ACCELERATE_CONFIG" in "\n".join(cfg.notes)
    assert "PRECISION=no (environment PRECISION) wins over train.precision = 'bf16'" in "\n".join(cfg.notes)


@pytest.mark.parametrize("text, message", [
    ("distributed_type: MEGATRON_LM\n", "distributed_type='MEGATRON_LM' is not supported; allowed: NO, MULTI_CPU"),
    ("distributed_type: DEEPSPEED\ndeepspeed_config:\n  zero_stage: 0\n", "zero_stage/stage=0 is not runnable here"),
    ("distributed_type: DEEPSPEED\ndeepspeed_config:\n  zero_stage: 3\n  offload_param_device: nvme\n",
     "offload_param_device='nvme' is not supported"),
    ("distributed_type: FSDP\nfsdp_config:\n  fsdp_sharding_strategy: NO_SHARD\n", "fsdp_sharding_strategy='NO_SHARD'"),
    ("distributed_type: MULTI_GPU\nmixed_precision: fp8\n", "mixed_precision='fp8' is not supported"),
    ("distributed_type: MULTI_GPU\nnum_machines: 2\nnum_processes: 3\n", "num_processes=3 is not a multiple of num_machines=2"),
])
def test_an_accelerate_config_no_recipe_runs_is_refused_naming_the_key(tmp_path, text, message):
    f = tmp_path / "acc.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load([f"ACCELERATE_CONFIG={f}"])
    assert message in str(e.value) and str(e.value).startswith(f"ACCELERATE_CONFIG '{f}': ")


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
                        "optim.schedule": ("cosine", "linear", "constant"),
                        "launch.preflight": ("auto", "off", "only")}
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


def test_a_misspelt_make_variable_is_refused_as_on_the_command_line(tmp_path):
    """`make train MAX_STEP=5` would pass MAX_STEP on and run the full default: refused in one line."""
    import subprocess

    for f in ("constraints.txt", "pyproject.toml"):
        (tmp_path / f).write_text("")
    (tmp_path / "stamp").write_text("")
    out = subprocess.run(["make", "-s", "-f", str(REPO / "Makefile"), "config", "MAX_STEP=5",
                          f"VENV={REPO / '.venv'}", f"STAMP={tmp_path / 'stamp'}"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in os.environ.items() if k not in ENV_VARS})
    assert out.returncode != 0
    assert "error: make variable MAX_STEP='5' is no setting; did you mean MAX_STEPS?" in out.stderr, out.stderr
    assert "max_steps" not in out.stdout


def test_makefile_picks_the_cpu_torch_build_unless_an_nvidia_gpu_answers(tmp_path):
    import subprocess

    def torch_install_line(path_prefix: str = "", *extra: str) -> str:
        env = {**os.environ, "PATH": f"{path_prefix}{os.environ['PATH']}"}
        out = subprocess.run(["make", "-n", "-f", str(REPO / "Makefile"), "venv", f"VENV={tmp_path / 'venv'}", *extra],
                             cwd=REPO, capture_output=True, text=True, timeout=60, env=env).stdout
        return next(ln for ln in out.splitlines() if "pip install" in ln and " torch" in ln)

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "nvidia-smi"  # a host whose driver answers `nvidia-smi -L`
    fake.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100'\n")
    fake.chmod(0o755)
    no_gpu = tmp_path / "nogpu"
    no_gpu.mkdir()
    (no_gpu / "nvidia-smi").write_text("#!/bin/sh\nexit 9\n")
    (no_gpu / "nvidia-smi").chmod(0o755)
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in torch_install_line(f"{no_gpu}:")
    # A driver that prints no version gets the image's CUDA build (the version's own choice: test_gpu_host.py).
    assert "--extra-index-url https://download.pytorch.org/whl/cu128" in torch_install_line(f"{bin_dir}:")
    assert "whl/cu128" in torch_install_line(f"{no_gpu}:", "TORCH_INDEX=https://download.pytorch.org/whl/cu128")


def test_a_dotenv_name_close_to_a_setting_gets_a_notice(tmp_path):

    (tmp_path / ".env").write_text("STRATEGYY=zero2\nHF_TOKEN=x\nNCCL_DEBUG=INFO\n")
    cfg = load(dotenv=str(tmp_path / ".env"))
    assert cfg.notes == [".env sets STRATEGYY, which is no setting (did you mean STRATEGY?); it is ignored"]


# -- each setting is said once ------------------------------------------------------------------
def test_every_key_has_help_text_in_make_keys():
    from train.config.schema import _key_fields

    silent = [key for key, f in _key_fields() if not f.metadata.get("help")]
    assert silent == [], f"give these keys a help line in train/config/schema.py: {silent}"


def test_the_default_run_file_repeats_no_default():
    """A default is said once, in the schema: the embedded default run file sets nothing it already says."""
    import yaml

    from train.config.schema import _key_fields

    tree = yaml.safe_load((REPO / "configs" / "runs" / "tiny.yaml").read_text()) or {}
    defaults = {key: f.default for key, f in _key_fields()}
    flat = {f"{s}.{k}" if isinstance(v, dict) else s: v for s, sec in tree.items()
            for k, v in (sec.items() if isinstance(sec, dict) else [(s, sec)])}
    assert {k: v for k, v in flat.items() if defaults.get(k) == v} == {}


@pytest.mark.parametrize("setting, message", [
    ("data.eval_fraction=0.5", "data.eval_fraction=0.5 must be in (0, 0.5)"),
    ("optim.beta2=1", "optim.beta2=1.0 must be in [0, 1)"),
    ("preflight.link_min_fraction=2", "preflight.link_min_fraction=2.0 must be in [0, 1]"),
    ("log.straggler_fraction=0", "log.straggler_fraction=0.0 must be > 0"),
    ("optim.weight_decay=-1", "optim.weight_decay=-1.0 is too small; it must be >= 0"),
])
def test_a_value_outside_its_fields_bounds_is_refused_naming_them(setting, message):
    with pytest.raises(ConfigError) as e:
        load_config([setting], env={}, dotenv_path=None)
    assert str(e.value) == message


def test_the_default_output_dir_follows_from_the_run_file_strategy_and_run():
    """The README's examples, one after another, each get their own directory."""
    def out(*args):
        return load_config(list(args), env={}, dotenv_path=None).output_dir

    assert out() == "outputs/tiny-ddp" == out("MAX_STEPS=300", "optim.lr=1e-3")  # same run, trained further
    assert out("STRATEGY=zero2") == "outputs/tiny-zero2"
    assert out("SEQ_LEN=256").startswith("outputs/tiny-ddp-") and out("SEQ_LEN=256") != out("SEED=7")
    assert out("OUTPUT_DIR=/tmp/mine") == "/tmp/mine"
