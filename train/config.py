"""Run configuration: typed dataclasses, filled from YAML, `.env`, environment and CLI.

Precedence, lowest first: dataclass defaults < YAML run file < `.env` < environment < CLI.
CLI overrides are ``section.key=value`` (``--section.key=value`` works too); the short
environment names in ``ENV_VARS`` are the same names the Makefile, compose and k8s use.
Unknown keys and values of the wrong type are errors that name the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from .strategies import CUSTOM, REPO_ROOT, STRATEGIES

DEFAULT_CONFIG = REPO_ROOT / "configs" / "runs" / "tiny.yaml"
PRECISIONS = ("no", "bf16", "fp16")
SCHEDULES = ("cosine", "linear", "constant")


class ConfigError(ValueError):
    """Bad user input: printed as one line, exit code 2."""


@dataclass
class LaunchConfig:
    strategy: str = field(default="ddp", metadata={"help": f"one of {', '.join(STRATEGIES)}"})
    accelerate_config: str = field(default="", metadata={"help": "your own `accelerate config` file (overrides strategy)"})
    nproc_per_node: int = field(default=0, metadata={"help": "processes per node; 0 = GPUs on this node, or 2 on CPU"})
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    timeout_s: int = field(default=300, metadata={"help": "collective/rendezvous timeout: a dead peer fails the job after this"})
    master_wait_s: int = field(default=120, metadata={"help": "how long a non-master node waits for the master to resolve and listen"})


@dataclass
class ModelConfig:
    name: str = field(default="llama-tiny", metadata={"help": "preset name, hub id or local directory"})
    tokenizer: str = field(default="", metadata={"help": "hub id or directory; empty = the model's own (or the built-in one for presets)"})
    trust_remote_code: bool = False
    attn_implementation: str = "sdpa"
    activation_checkpointing: bool = False
    compile: bool = False
    # LoRA (PEFT): r > 0 freezes the model and trains low-rank adapters on the target modules.
    lora_r: int = field(default=0, metadata={"help": "LoRA rank; 0 = full fine-tuning (no adapters)"})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scaling numerator (scale = alpha / r)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA input, in [0, 1)"})
    lora_target_modules: str = field(default="", metadata={"help": "comma-separated module names, or all-linear; empty = PEFT's default for the architecture (llama: q_proj,v_proj)"})


@dataclass
class DataConfig:
    dataset: str = field(default="builtin:tiny-stories", metadata={"help": "builtin:NAME, hub id, or local text/jsonl/parquet file or directory"})
    dataset_config: str = ""
    split: str = "train"
    text_field: str = "text"
    seq_len: int = 128
    eval_fraction: float = 0.05
    num_workers: int = 0
    cache_dir: str = field(default="", metadata={"help": "where tokenized data is cached; empty = OUTPUT_DIR/../.cache/data"})


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    warmup_steps: int = 10
    schedule: str = field(default="cosine", metadata={"help": " | ".join(SCHEDULES)})


@dataclass
class TrainConfig:
    precision: str = field(default="no", metadata={"help": " | ".join(PRECISIONS)})
    micro_batch: int = field(default=8, metadata={"help": "sequences per rank per forward pass"})
    grad_accum: int = 1
    global_batch: int = field(default=0, metadata={"help": "sequences per optimizer step; 0 = micro_batch x grad_accum x world size. If set, grad_accum is derived from it"})
    max_steps: int = 200
    eval_every: int = 100
    eval_batches: int = 4


@dataclass
class CheckpointConfig:
    every: int = field(default=100, metadata={"help": "save every N optimizer steps (0 = only at the end)"})
    keep: int = field(default=2, metadata={"help": "complete checkpoints to keep"})
    resume: str = field(default="auto", metadata={"help": "auto (newest complete checkpoint, if any) | never (refuse if any exist) | PATH"})
    export: bool = field(default=True, metadata={"help": "write OUTPUT_DIR/final (safetensors + config + tokenizer) at the end"})
    merge_lora: bool = field(default=True, metadata={"help": "with LoRA, also write the adapters merged into the model in final/ (the adapter alone goes to final/adapter)"})


@dataclass
class LogConfig:
    every: int = 10
    tensorboard: bool = field(default=True, metadata={"help": "false drops tensorboard from log.trackers (older run files)"})
    progress: bool = True
    trackers: str = field(default="tensorboard", metadata={"help": "comma-separated: tensorboard, mlflow, wandb (or none); same metrics as metrics.jsonl"})
    project: str = field(default="train", metadata={"help": "MLflow experiment / W&B project name"})


@dataclass
class RunConfig:
    output_dir: str = "outputs/run"
    seed: int = 1234
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    # -- derived -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint must agree with to be resumed: changing any of it changes the run."""
        return {
            "model": self.model.name,
            "seq_len": self.data.seq_len,
            "dataset": self.data.dataset,
            "strategy_family": strategy_family(self.launch),
            "seed": self.seed,
            # None without LoRA: checkpoints written before this key existed still match
            "lora": f"r={self.model.lora_r} targets={self.model.lora_target_modules}" if self.model.lora_r else None,
        }

    def fingerprint_hash(self) -> str:
        blob = json.dumps(self.fingerprint(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def redacted(self) -> dict[str, Any]:
        return _redact(self.to_dict())


def selected_strategy(launch: LaunchConfig):
    """The strategy row this run uses, or None for a user's own ACCELERATE_CONFIG file."""
    return None if launch.accelerate_config else STRATEGIES[launch.strategy]


def strategy_name(launch: LaunchConfig) -> str:
    s = selected_strategy(launch)
    return s.name if s else CUSTOM


def strategy_family(launch: LaunchConfig) -> str:
    s = selected_strategy(launch)
    return s.family if s else CUSTOM


# Short names shared by the Makefile, `.env`, compose and Kubernetes. One table, read everywhere.
ENV_VARS: dict[str, str] = {
    "STRATEGY": "launch.strategy",
    "ACCELERATE_CONFIG": "launch.accelerate_config",
    "NPROC": "launch.nproc_per_node",
    "NNODES": "launch.nnodes",
    "NODE_RANK": "launch.node_rank",
    "MASTER_ADDR": "launch.master_addr",
    "MASTER_PORT": "launch.master_port",
    "DEVICE": "launch.device",
    "DIST_TIMEOUT": "launch.timeout_s",
    "MODEL": "model.name",
    "TOKENIZER": "model.tokenizer",
    "DATASET": "data.dataset",
    "SEQ_LEN": "data.seq_len",
    "PRECISION": "train.precision",
    "MICRO_BATCH": "train.micro_batch",
    "GRAD_ACCUM": "train.grad_accum",
    "GLOBAL_BATCH": "train.global_batch",
    "MAX_STEPS": "train.max_steps",
    "LR": "optim.lr",
    "LOG_EVERY": "log.every",
    "TRACKERS": "log.trackers",
    "LORA_R": "model.lora_r",
    "CHECKPOINT_EVERY": "checkpoint.every",
    "KEEP_CHECKPOINTS": "checkpoint.keep",
    "RESUME": "checkpoint.resume",
    "OUTPUT_DIR": "output_dir",
    "SEED": "seed",
}
CONFIG_ENV = "CONFIG"  # path of the YAML run file
SECRET_WORDS = ("token", "secret", "password", "key")


def _redact(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: ("***" if any(w in k.lower() for w in SECRET_WORDS) and v else _redact(v)) for k, v in obj.items()}
    return obj


# -- loading -------------------------------------------------------------------------------
def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(RunConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(RunConfig) if dataclasses.is_dataclass(hints[f.name])}


def allowed_keys() -> list[str]:
    keys = []
    for f in dataclasses.fields(RunConfig):
        sec = _sections().get(f.name)
        keys += [f"{f.name}.{g.name}" for g in dataclasses.fields(sec)] if sec else [f.name]
    return keys


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Turn a YAML/CLI/env value into the field's type, or say what was expected."""
    if typ is bool:
        if isinstance(value, bool):
            return value
        s = str(value).strip().lower()
        if s in ("1", "true", "yes", "on"):
            return True
        if s in ("0", "false", "no", "off", ""):
            return False
        raise ConfigError(f"{key}={value!r} is not a boolean; use true or false")
    if typ in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be {typ.__name__}")
        try:
            if typ is int and isinstance(value, str) and not value.strip().lstrip("-").isdigit():
                raise ValueError
            return typ(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={value!r} must be {'an integer' if typ is int else 'a number'}") from None
    if typ is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key} must be a string, got {type(value).__name__}")
        # YAML reads `no` as False: precision "no" must survive that.
        return "no" if value is False else str(value)
    raise TypeError(typ)


def _set(cfg: RunConfig, dotted: str, value: Any, source: str) -> None:
    parts = dotted.split(".")
    sections = _sections()
    if len(parts) == 1 and parts[0] not in sections:
        target, name = cfg, parts[0]
    elif len(parts) == 2 and parts[0] in sections:
        target, name = getattr(cfg, parts[0]), parts[1]
    else:
        target, name = None, dotted
    hints = typing.get_type_hints(type(target)) if target is not None else {}
    if target is None or name not in hints or name in sections:
        raise ConfigError(f"unknown config key {dotted!r} (from {source}); allowed: {', '.join(allowed_keys())}")
    try:
        setattr(target, name, _coerce(dotted, value, hints[name]))
    except ConfigError as e:
        raise ConfigError(f"{e} (from {source})") from None


def _apply_tree(cfg: RunConfig, tree: Mapping[str, Any], source: str) -> None:
    sections = _sections()
    for k, v in tree.items():
        if k in sections:
            if not isinstance(v, Mapping):
                raise ConfigError(f"config section {k!r} in {source} must be a mapping")
            for k2, v2 in v.items():
                _set(cfg, f"{k}.{k2}", v2, source)
        else:
            _set(cfg, k, v, source)


def parse_overrides(args: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for a in args:
        key, sep, val = a.lstrip("-").partition("=")
        if not sep or not key:
            raise ConfigError(f"bad argument {a!r}: overrides look like section.key=value (e.g. train.max_steps=50)")
        key = key.replace("-", "_") if key not in ENV_VARS else key
        out[key] = val
    return out


def load_config(args: list[str] | None = None, env: Mapping[str, str] | None = None, dotenv_path: str | None = ".env") -> RunConfig:
    """Resolve the run configuration. Pure apart from reading the YAML and `.env` files."""
    from_dotenv: set[str] = set()
    if dotenv_path and Path(dotenv_path).is_file():
        from dotenv import dotenv_values

        values = {k: v for k, v in dotenv_values(dotenv_path).items() if v is not None}
        # An empty variable counts as unset (make and compose pass unset ones as ""), so it
        # does not hide the .env value; a non-empty real environment variable wins over .env.
        target = os.environ if env is None else env
        from_dotenv = {k for k in values if not target.get(k)}
        if env is None:
            # The real run: .env also carries variables that are not config keys (HF_TOKEN,
            # NCCL_*), which the libraries and the workers read from the process environment.
            os.environ.update({k: values[k] for k in from_dotenv})
        else:
            env = {**env, **{k: values[k] for k in from_dotenv}}
    env = dict(os.environ if env is None else env)
    overrides = parse_overrides(args or [])
    # Short names (STRATEGY=zero2) on the command line act like the environment.
    for k in [k for k in overrides if k in ENV_VARS or k == CONFIG_ENV]:
        env[k] = overrides.pop(k)

    cfg = RunConfig()
    path = overrides.pop("config", None) or env.get(CONFIG_ENV) or str(DEFAULT_CONFIG)
    p = Path(path)
    if not p.is_file() and not p.is_absolute() and (REPO_ROOT / p).is_file():
        p = REPO_ROOT / p
    if not p.is_file():
        raise ConfigError(f"config file {path!r} not found; pass a YAML run file such as configs/runs/tiny.yaml")
    tree = yaml.safe_load(p.read_text()) or {}
    if not isinstance(tree, Mapping):
        raise ConfigError(f"config file {path!r} must hold a mapping of sections")
    _apply_tree(cfg, tree, str(p))
    for name, dotted in ENV_VARS.items():
        if env.get(name, "") != "":  # Make exports unset variables as empty strings
            _set(cfg, dotted, env[name], f"{'.env' if name in from_dotenv else 'environment'} {name}")
    for k, v in overrides.items():
        _set(cfg, k, v, "command line")
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Checks that need no process group: everything a user can get wrong in the config."""
    L, T, O = cfg.launch, cfg.train, cfg.optim
    if not L.accelerate_config and L.strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy {L.strategy!r}; allowed: {', '.join(STRATEGIES)}")
    if L.accelerate_config and not Path(L.accelerate_config).is_file():
        raise ConfigError(f"ACCELERATE_CONFIG file {L.accelerate_config!r} not found")
    if T.precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {T.precision!r}; allowed: {', '.join(PRECISIONS)}")
    if O.schedule not in SCHEDULES:
        raise ConfigError(f"unknown schedule {O.schedule!r}; allowed: {', '.join(SCHEDULES)}")
    if L.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"unknown device {L.device!r}; allowed: auto, cpu, cuda")
    for key, v, lo in (
        ("train.micro_batch", T.micro_batch, 1), ("train.grad_accum", T.grad_accum, 1),
        ("train.max_steps", T.max_steps, 1), ("data.seq_len", cfg.data.seq_len, 8),
        ("launch.nnodes", L.nnodes, 1), ("launch.nproc_per_node", L.nproc_per_node, 0),
        ("log.every", cfg.log.every, 1), ("checkpoint.every", cfg.checkpoint.every, 0),
        ("checkpoint.keep", cfg.checkpoint.keep, 1), ("train.global_batch", T.global_batch, 0),
        ("launch.timeout_s", L.timeout_s, 1),
    ):
        if v < lo:
            raise ConfigError(f"{key}={v} is too small; it must be >= {lo}")
    if not 0 <= L.node_rank < L.nnodes:
        raise ConfigError(f"launch.node_rank={L.node_rank} must be in [0, nnodes={L.nnodes})")
    if not 0 < cfg.data.eval_fraction < 0.5:
        raise ConfigError(f"data.eval_fraction={cfg.data.eval_fraction} must be in (0, 0.5)")
    if cfg.checkpoint.resume not in ("auto", "never") and not Path(cfg.checkpoint.resume).exists():
        raise ConfigError(f"RESUME={cfg.checkpoint.resume!r}: no such checkpoint; use auto, never, or a checkpoint directory")


def resolve_batch(cfg: RunConfig, world_size: int) -> tuple[int, int]:
    """(grad_accum, global_batch) for this world size, or a ConfigError saying what fits.

    If global_batch is set it is held fixed and accumulation is derived from it, so the same
    samples make up each optimizer step whatever the world size.
    """
    T = cfg.train
    if T.global_batch:
        per_step = T.micro_batch * world_size
        if T.global_batch % per_step:
            raise ConfigError(
                f"GLOBAL_BATCH={T.global_batch} is not divisible by MICRO_BATCH x world size = "
                f"{T.micro_batch} x {world_size} = {per_step}; choose a multiple of {per_step}"
            )
        return T.global_batch // per_step, T.global_batch
    return T.grad_accum, T.micro_batch * T.grad_accum * world_size


def dump_yaml(cfg: RunConfig, redact: bool = True) -> str:
    return yaml.safe_dump(cfg.redacted() if redact else cfg.to_dict(), sort_keys=False)


def help_text() -> str:
    lines = []
    for f in dataclasses.fields(RunConfig):
        sec = _sections().get(f.name)
        for g in dataclasses.fields(sec) if sec else [f]:
            key = f"{f.name}.{g.name}" if sec else f.name
            default = g.default if g.default is not dataclasses.MISSING else "-"
            env = next((e for e, d in ENV_VARS.items() if d == key), "")
            lines.append(f"  {key:32} {str(default)!r:28} {env:18} {g.metadata.get('help', '')}")
    return "\n".join(lines)
