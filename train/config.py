"""Run configuration: typed dataclasses, filled from YAML, `.env`, environment and CLI.

Precedence, lowest first: dataclass defaults < YAML run file < `.env` < environment < CLI.
CLI overrides are ``section.key=value`` (``--section.key=value`` works too); the short
environment names in ``ENV_VARS`` are the same names the Makefile, compose and k8s use.
Unknown keys and values of the wrong type are errors that name the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import difflib
import json
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

from .strategies import CUSTOM, REPO_ROOT, STRATEGIES

DEFAULT_CONFIG = REPO_ROOT / "configs" / "runs" / "tiny.yaml"


class ConfigError(ValueError):
    """Bad user input: printed as one line, exit code 2."""


def setting(default: Any, help: str = "", env: str | None = None) -> Any:
    """A config field: its default, its help line for `make keys`, and its short environment
    name (the one name the Makefile, `.env`, compose and Kubernetes use; see ``ENV_VARS``)."""
    return field(default=default, metadata={"help": help, **({"env": env} if env else {})})


# Enumerated settings are Literal types: `make keys` lists and the loader checks the values
# through typing.get_args, so each list of allowed values is written once, here.
@dataclass
class LaunchConfig:
    strategy: str = setting("ddp", f"one of {', '.join(STRATEGIES)}", env="STRATEGY")
    accelerate_config: str = setting("", "your own `accelerate config` file (overrides strategy)", env="ACCELERATE_CONFIG")
    nproc_per_node: int = setting(0, "processes per node; 0 = GPUs on this node, or 2 on CPU", env="NPROC")
    nnodes: int = setting(1, env="NNODES")
    node_rank: int = setting(0, env="NODE_RANK")
    master_addr: str = setting("127.0.0.1", env="MASTER_ADDR")
    master_port: int = setting(29500, env="MASTER_PORT")
    device: Literal["auto", "cpu", "cuda"] = setting("auto", env="DEVICE")
    timeout_s: int = setting(300, "collective/rendezvous timeout: a dead peer fails the job after this", env="DIST_TIMEOUT")
    master_wait_s: int = setting(120, "how long a non-master node waits for the master to resolve and listen")
    max_restarts: int = setting(3, "times torchrun restarts the workers after a crash (multi-process runs); they resume from the newest checkpoint", env="MAX_RESTARTS")
    hang_timeout_s: float = setting(0.0, "no rank finished a step for this long: dump stacks, exit 4; 0 = max(60 s, 10 median steps)", env="HANG_TIMEOUT")
    preflight: Literal["auto", "off", "only"] = setting(
        "auto", "auto | off | only: check every node, link and volume before training (train/preflight.py), "
        "skip that, or check and exit", env="PREFLIGHT")


@dataclass
class PreflightConfig:
    """Thresholds of the preflight checks (train/preflight.py); launch.preflight turns them on."""

    port: int = setting(0, "TCP port on node 0 for the preflight's short process group; 0 = MASTER_PORT + 1")
    shm_mb_per_gpu: int = setting(512, "free /dev/shm needed per GPU process (NCCL, DataLoader workers)")
    shm_mb_per_cpu_process: int = setting(32, "free /dev/shm needed per process on CPU (32 MiB: one process fits Docker's default 64 MB; DeepSpeed's shm all-reduce, DataLoader workers)")
    min_stack_mb: int = setting(8, "warn below this stack size limit (ulimit -s)")
    disk_checkpoints: int = setting(2, "free space at OUTPUT_DIR must hold this many checkpoints (the planner's byte counts)")
    gpu_min_peak_fraction: float = setting(0.4, "a GPU whose bf16 matmul runs below this fraction of its datasheet peak fails")
    link_min_fraction: float = setting(0.5, "a node or link whose pairwise bandwidth is below this fraction of the median fails")
    min_link_gb_s: float = setting(0.0, "a link slower than this many GB/s fails (0 = no absolute floor)")
    bandwidth_budget_s: float = setting(1.0, "seconds each bandwidth test (all-reduce, pairwise) may take; larger messages are skipped")
    shared_wait_s: float = setting(5.0, "how long a node waits for the others' files to appear in OUTPUT_DIR (NFS caches)")


@dataclass
class ModelConfig:
    name: str = setting("llama-tiny", "preset name, hub id or local directory", env="MODEL")
    tokenizer: str = setting("", "hub id or directory; empty = the model's own (or the built-in one for presets)", env="TOKENIZER")
    trust_remote_code: bool = False
    attn_implementation: str = "sdpa"
    # Size overrides for a preset (0 = the preset's value): from-scratch models of any size.
    hidden_size: int = setting(0, "presets only: hidden size (0 = the preset's)")
    num_layers: int = setting(0, "presets only: transformer layers (0 = the preset's)")
    num_heads: int = setting(0, "presets only: attention heads, must divide hidden_size (0 = the preset's)")
    intermediate_size: int = setting(0, "presets only: MLP width (0 = the preset's)")
    activation_checkpointing: bool = False
    compile: bool = False
    # LoRA (PEFT): r > 0 freezes the model and trains low-rank adapters on the target modules.
    lora_r: int = setting(0, "LoRA rank; 0 = full fine-tuning (no adapters)", env="LORA_R")
    lora_alpha: float = setting(16.0, "LoRA scaling numerator (scale = alpha / r)")
    lora_dropout: float = setting(0.05, "dropout on the LoRA input, in [0, 1)")
    lora_target_modules: str = setting("", "comma-separated module names, or all-linear; empty = PEFT's default for the architecture (llama: q_proj,v_proj)")


@dataclass
class DataConfig:
    dataset: str = setting("builtin:tiny-stories", "a directory made by `python -m train prepare`, or a raw source "
                           "(builtin:NAME, hub id, local text/jsonl/parquet/csv file or directory), prepared into "
                           "data.cache_dir on first use", env="DATASET")
    dataset_config: str = ""
    split: str = "train"
    text_field: str = "text"
    seq_len: int = setting(128, env="SEQ_LEN")
    eval_fraction: float = setting(0.05, "held out from DATASET (each mixture source): its last documents, this "
                                   "fraction of its tokens rounded to whole documents; unused with data.eval_dataset")
    eval_dataset: str = setting("", "a separate held-out dataset (same forms as DATASET); empty = hold out "
                                "data.eval_fraction of DATASET's documents", env="EVAL_DATASET")
    mixture: str = setting("", "weighted mixture instead of DATASET: SOURCE=WEIGHT,SOURCE=WEIGHT (in YAML also a list "
                           "of {dataset, weight}); sources as DATASET, weights > 0", env="DATA_MIXTURE")
    num_workers: int = 0
    cache_dir: str = setting("", "where raw DATASETs are prepared on first use (CACHE/prepared/) and `datasets` keeps "
                             "downloads; empty = ~/.cache/train (XDG_CACHE_HOME) and its own default", env="DATA_CACHE")
    shard_tokens: int = setting(1 << 27, "prepare: tokens per shard file (a shard ends at the first document end "
                                "past this)")
    prepare_workers: int = setting(0, "prepare: tokenizing processes; 0 = the CPUs this process may use")


@dataclass
class OptimConfig:
    lr: float = setting(3e-3, env="LR")
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    warmup_steps: int = 10
    schedule: Literal["cosine", "linear", "constant"] = "cosine"


@dataclass
class TrainConfig:
    precision: Literal["no", "bf16", "fp16"] = setting("no", env="PRECISION")
    tf32: bool = setting(True, "CUDA: TF32 tensor cores for fp32 matmuls/convolutions (PRECISION=no runs ~8x faster; MFU uses the TF32 peak). false = true IEEE fp32")
    micro_batch: int = setting(8, "sequences per rank per forward pass", env="MICRO_BATCH")
    grad_accum: int = setting(1, env="GRAD_ACCUM")
    global_batch: int = setting(0, "sequences per optimizer step; 0 = micro_batch x grad_accum x world size. If set, grad_accum is derived from it", env="GLOBAL_BATCH")
    max_steps: int = setting(200, env="MAX_STEPS")
    eval_every: int = 100
    eval_batches: int = 4
    spike_factor: float = setting(3.0, "a logged loss above this x the median of the last spike_window rolls back to the newest checkpoint and skips the batches since; 0 = only non-finite losses")
    spike_window: int = setting(20, "logged losses the spike median is taken over")
    max_rollbacks: int = setting(3, "rollbacks a run may take; then it stops with exit 7 (diverged)")


@dataclass
class CheckpointConfig:
    every: int = setting(100, "save every N optimizer steps (0 = only at the end)", env="CHECKPOINT_EVERY")
    keep: int = setting(2, "complete checkpoints to keep", env="KEEP_CHECKPOINTS")
    resume: str = setting("auto", "auto (newest complete checkpoint, if any) | never (refuse if any exist) | PATH", env="RESUME")
    export: bool = setting(True, "write OUTPUT_DIR/final (safetensors + config + tokenizer) at the end")
    export_timeout_s: int = setting(3600, "how long the other ranks wait while rank 0 writes the final export (its own bound: DIST_TIMEOUT is for collectives)")
    merge_lora: bool = setting(True, "with LoRA, also write the adapters merged into the model in final/ (the adapter alone goes to final/adapter)")
    async_save: bool = setting(False, "fsdp, fsdp-offload: write model and optimizer state in the background "
                               "(torch.distributed.checkpoint.async_save) after a copy to CPU memory; a checkpoint "
                               "counts once the next save starts or the run ends", env="ASYNC_SAVE")


@dataclass
class LogConfig:
    every: int = setting(10, env="LOG_EVERY")
    tensorboard: bool = setting(True, "false drops tensorboard from log.trackers (older run files)")
    progress: bool = True
    trackers: str = setting("tensorboard", "comma-separated: tensorboard, mlflow, wandb (or none); same metrics as metrics.jsonl", env="TRACKERS")
    project: str = setting("train", "MLflow experiment / W&B project name")
    held_bytes_every: int = setting(10, "measure held_bytes (a walk over all state) on the first log step and every N-th after it")
    straggler_fraction: float = setting(0.2, "warn when a rank's own time per step exceeds the median rank's by this fraction of the step time ...")
    straggler_log_steps: int = setting(5, "... for this many log steps in a row (0 = never warn)")


@dataclass
class RunConfig:
    output_dir: str = setting("outputs/run", env="OUTPUT_DIR")
    seed: int = setting(1234, env="SEED")
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    preflight: PreflightConfig = field(default_factory=PreflightConfig)

    # -- derived -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint must agree with to be resumed: changing any of it changes the run."""
        return {
            "model": model_id(self.model),
            "seq_len": self.data.seq_len,
            "dataset": self.data.dataset,
            "seed": self.seed,
            # None without LoRA: checkpoints written before this key existed still match
            "lora": f"r={self.model.lora_r} targets={self.model.lora_target_modules}" if self.model.lora_r else None,
            # only when set: checkpoints of single-dataset runs keep their fingerprint
            **({"mixture": self.data.mixture} if self.data.mixture else {}),
        }

    def fingerprint_hash(self) -> str:
        blob = json.dumps(self.fingerprint(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def redacted(self) -> dict[str, Any]:
        return _redact(self.to_dict())


SIZE_KEYS = ("hidden_size", "num_layers", "num_heads", "intermediate_size")


def model_id(model: ModelConfig) -> str:
    """The model's name plus any preset size overrides: what a checkpoint must match."""
    sizes = [f"{k}={getattr(model, k)}" for k in SIZE_KEYS if getattr(model, k)]
    return model.name + (f"({', '.join(sizes)})" if sizes else "")


def selected_strategy(launch: LaunchConfig):
    """The strategy row this run uses, or None for a user's own ACCELERATE_CONFIG file."""
    return None if launch.accelerate_config else STRATEGIES[launch.strategy]


def strategy_name(launch: LaunchConfig) -> str:
    s = selected_strategy(launch)
    return s.name if s else CUSTOM


def strategy_family(launch: LaunchConfig) -> str:
    s = selected_strategy(launch)
    return s.family if s else CUSTOM


def _key_fields() -> list[tuple[str, dataclasses.Field]]:
    """Every config key (``section.key`` or a top-level key) with its dataclass field, in order."""
    out = []
    for f in dataclasses.fields(RunConfig):
        if isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory):
            out += [(f"{f.name}.{g.name}", g) for g in dataclasses.fields(f.default_factory)]
        else:
            out.append((f.name, f))
    return out


# Short names shared by the Makefile, `.env`, compose and Kubernetes, from the fields' metadata.
ENV_VARS: dict[str, str] = {f.metadata["env"]: key for key, f in _key_fields() if "env" in f.metadata}
CONFIG_ENV = "CONFIG"  # path of the YAML run file
# Credentials are never config keys (HF_TOKEN is read from the environment), but a value can
# still carry one: a hub token pasted into a path or URL, or user:password@ in a URL.
_SECRET_VALUE = re.compile(r"hf_[A-Za-z0-9]{20,}|(?<=://)[^/@\s:]+:[^/@\s]+(?=@)")


def _redact(obj: Any) -> Any:
    """The config with credential-looking substrings masked; every setting itself is kept, so the
    saved run_config.yaml still reproduces the run (a key named like `model.tokenizer` is no secret)."""
    if isinstance(obj, dict):
        return {k: _redact(v) for k, v in obj.items()}
    if isinstance(obj, str):
        return _SECRET_VALUE.sub("***", obj)
    return obj


# -- loading -------------------------------------------------------------------------------
def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(RunConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(RunConfig) if dataclasses.is_dataclass(hints[f.name])}


def allowed_keys() -> list[str]:
    return [key for key, _ in _key_fields()]


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
    if typing.get_origin(typ) is Literal:
        s = _coerce(key, value, str)
        allowed = typing.get_args(typ)
        if s not in allowed:
            raise ConfigError(f"unknown {key.rsplit('.', 1)[-1]} {s!r}; allowed: {', '.join(allowed)}")
        return s
    if typ is str:
        if key == "data.mixture" and isinstance(value, list):
            value = _mixture_from_list(value)
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key} must be a string, got {type(value).__name__}")
        # YAML reads `no` as False: precision "no" must survive that.
        return "no" if value is False else str(value)
    raise TypeError(typ)


def _mixture_from_list(items: list) -> str:
    """YAML's ``mixture: [{dataset: DIR, weight: 0.7}, ...]`` as the one-line form ``DIR=0.7,...``."""
    out = []
    for it in items:
        if isinstance(it, Mapping) and set(it) == {"dataset", "weight"}:
            out.append(f"{it['dataset']}={it['weight']}")
        elif isinstance(it, str):
            out.append(it)
        else:
            raise ConfigError(f"data.mixture entry {it!r} must be a mapping with exactly the keys dataset and weight")
    return ",".join(out)


def _unknown_key(dotted: str, source: str) -> ConfigError:
    """Close matches only: the full list is ~60 keys, one `make keys` away."""
    leaf = dotted.rsplit(".", 1)[-1]
    same_leaf = [k for k in allowed_keys() if k.rsplit(".", 1)[-1] == leaf]  # right key, wrong section
    close = difflib.get_close_matches(dotted, allowed_keys() + list(ENV_VARS), n=3, cutoff=0.75)
    close = list(dict.fromkeys(same_leaf + close))[:3]
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    return ConfigError(f"unknown config key {dotted!r} (from {source}); {hint}`make keys` lists every key")


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
    if target is None or name not in hints or (target is cfg and name in sections):
        raise _unknown_key(dotted, source)
    try:
        setattr(target, name, _coerce(dotted, value, hints[name]))
    except ConfigError as e:
        raise ConfigError(f"{e} (from {source})") from None
    sources(cfg)[dotted] = source


def sources(cfg: RunConfig) -> dict[str, str]:
    """Where each setting that is not a dataclass default came from ("command line",
    "environment NAME", ".env NAME", a run-file path, "ACCELERATE_CONFIG <file>")."""
    return cfg.__dict__.setdefault("_sources", {})


def notes(cfg: RunConfig) -> list[str]:
    """One-line notices from resolving the config (e.g. which of two settings won), for the launcher to print."""
    return cfg.__dict__.setdefault("_notes", [])


def _explicit(source: str | None) -> bool:
    """Set by the person starting this run (not a default, not the run file)."""
    return bool(source) and source.startswith(("command line", "environment", ".env"))


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


def _read_yaml(path: Path, shown: str) -> Any:
    import yaml  # here, not at the top: `keys --env-names` (the Makefile's) runs without PyYAML

    try:
        return yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"config file {shown!r} cannot be read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {shown!r} is not text; pass a YAML run file such as configs/runs/tiny.yaml") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        ctx = getattr(e, "context", None)
        cmark = getattr(e, "context_mark", None)
        also = f" ({ctx} started at line {cmark.line + 1}, column {cmark.column + 1})" if ctx and cmark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config file {shown!r}: YAML syntax error{where}: {problem}{also}") from None


def load_config(args: list[str] | None = None, env: Mapping[str, str] | None = None, dotenv_path: str | None = ".env") -> RunConfig:
    """Resolve the run configuration. Pure apart from reading the YAML and `.env` files."""
    from_dotenv: set[str] = set()
    if dotenv_path and Path(dotenv_path).is_file():
        from dotenv import dotenv_values

        try:
            values = {k: v for k, v in dotenv_values(dotenv_path).items() if v is not None}
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{dotenv_path} cannot be read ({type(e).__name__}); fix or remove it") from None
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
    from_cli = {k for k in overrides if k in ENV_VARS or k == CONFIG_ENV}
    for k in from_cli:
        env[k] = overrides.pop(k)

    cfg = RunConfig()
    path = overrides.pop("config", None) or env.get(CONFIG_ENV) or str(DEFAULT_CONFIG)
    p = Path(path)
    if not p.is_file() and not p.is_absolute() and (REPO_ROOT / p).is_file():
        p = REPO_ROOT / p
    if p.is_dir():
        raise ConfigError(f"config file {path!r} is a directory; pass a YAML run file such as configs/runs/tiny.yaml")
    if not p.is_file():
        raise ConfigError(f"config file {path!r} not found; pass a YAML run file such as configs/runs/tiny.yaml")
    tree = _read_yaml(p, path) or {}
    if not isinstance(tree, Mapping):
        raise ConfigError(f"config file {path!r} must hold a mapping of sections")
    _apply_tree(cfg, tree, str(p))
    for name, dotted in ENV_VARS.items():
        if env.get(name, "") != "":  # Make exports unset variables as empty strings
            where = "command line" if name in from_cli else ".env" if name in from_dotenv else "environment"
            _set(cfg, dotted, env[name], f"{where} {name}")
    for k, v in overrides.items():
        _set(cfg, k, v, "command line")
    for k in sorted(from_dotenv - set(ENV_VARS) - {CONFIG_ENV}):
        # .env also carries other variables (HF_TOKEN, NCCL_*), so an unknown name is no error;
        # one close to a setting's name is most likely a typo that would silently do nothing.
        close = difflib.get_close_matches(k, [*ENV_VARS, CONFIG_ENV], n=1, cutoff=0.85)
        if close:
            notes(cfg).append(f".env sets {k}, which is no setting (did you mean {close[0]}?); it is ignored")
    _resolve_resume_name(cfg)
    validate(cfg)
    _apply_accelerate_config(cfg)
    return cfg


def _short(dotted: str) -> str:
    return next((n for n, d in ENV_VARS.items() if d == dotted), dotted)


def _apply_accelerate_config(cfg: RunConfig) -> None:
    """Map a user's `accelerate config` file onto the checked strategy rows (train/user_accelerate.py).

    Its settings beat the run file; a setting given on the command line, in the environment or
    in `.env` beats the file, with a notice. A different explicit STRATEGY is a conflict, refused.
    The file is then consumed (launch.accelerate_config cleared), so the launcher and every worker
    run the same checked recipe; the worker re-reads the same inputs and maps them identically.
    """
    path = cfg.launch.accelerate_config
    if not path:
        return
    from .user_accelerate import UnsupportedAccelerateConfig, read

    try:
        settings, file_notes = read(path)
    except UnsupportedAccelerateConfig as e:
        raise ConfigError(f"ACCELERATE_CONFIG {path!r}: {e}; or use STRATEGY= instead "
                          f"({', '.join(STRATEGIES)})") from None
    src = sources(cfg)
    mapped = []
    for dotted, value in settings.items():
        section, _, name = dotted.rpartition(".")
        current = getattr(getattr(cfg, section) if section else cfg, name)
        if _explicit(src.get(dotted)):
            if str(current) != str(value if value is not False else "no"):
                if dotted == "launch.strategy":
                    raise ConfigError(f"ACCELERATE_CONFIG {path!r} selects strategy {value!r} but "
                                      f"STRATEGY={current} ({src[dotted]}); set only one of them")
                notes(cfg).append(f"{_short(dotted)}={current} ({src[dotted]}) wins over "
                                  f"{dotted} = {value!r} from ACCELERATE_CONFIG {path}")
            continue
        _set(cfg, dotted, value, f"ACCELERATE_CONFIG {path}")
        mapped.append(f"{_short(dotted)}={getattr(getattr(cfg, section) if section else cfg, name)}")
    cfg.launch.accelerate_config = ""
    notes(cfg).insert(0, f"ACCELERATE_CONFIG {path} runs as the checked recipe: {', '.join(mapped)}")
    notes(cfg).extend(f"ACCELERATE_CONFIG {path}: {n}" for n in file_notes)
    validate(cfg)


_STEP_DIR = re.compile(r"^step_0*(\d+)$")


def _resolve_resume_name(cfg: RunConfig) -> None:
    """Checkpoints are saved as step_00000050; RESUME=.../step_50 names the same one."""
    resume = cfg.checkpoint.resume
    p = Path(resume)
    m = _STEP_DIR.match(p.name)
    if resume in ("auto", "never") or p.exists() or not m:
        return
    for candidate in (p.with_name(f"step_{int(m.group(1)):08d}"), p.with_name(f"step_{int(m.group(1))}")):
        if candidate.exists():
            cfg.checkpoint.resume = str(candidate)
            return


def validate(cfg: RunConfig) -> None:
    """Checks that need no process group: everything a user can get wrong in the config."""
    launch, train, opt, pre = cfg.launch, cfg.train, cfg.optim, cfg.preflight
    if not launch.accelerate_config and launch.strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy {launch.strategy!r}; allowed: {', '.join(STRATEGIES)}")
    if launch.accelerate_config and not Path(launch.accelerate_config).is_file():
        raise ConfigError(f"ACCELERATE_CONFIG file {launch.accelerate_config!r} not found")
    for key, v in (("preflight.gpu_min_peak_fraction", pre.gpu_min_peak_fraction),
                   ("preflight.link_min_fraction", pre.link_min_fraction)):
        if not 0 <= v <= 1:
            raise ConfigError(f"{key}={v} must be in [0, 1]")
    if not 0 <= pre.port < 65536:
        raise ConfigError(f"preflight.port={pre.port} is not a TCP port (0 = MASTER_PORT + 1)")
    for key, v, lo in (
        ("train.micro_batch", train.micro_batch, 1), ("train.grad_accum", train.grad_accum, 1),
        ("train.max_steps", train.max_steps, 1), ("data.seq_len", cfg.data.seq_len, 8),
        ("launch.nnodes", launch.nnodes, 1), ("launch.nproc_per_node", launch.nproc_per_node, 0),
        ("log.every", cfg.log.every, 1), ("checkpoint.every", cfg.checkpoint.every, 0),
        ("checkpoint.keep", cfg.checkpoint.keep, 1), ("train.global_batch", train.global_batch, 0),
        ("launch.timeout_s", launch.timeout_s, 1), ("launch.master_wait_s", launch.master_wait_s, 0),
        ("train.eval_every", train.eval_every, 0), ("train.eval_batches", train.eval_batches, 1),
        ("optim.warmup_steps", opt.warmup_steps, 0), ("data.num_workers", cfg.data.num_workers, 0),
        ("data.shard_tokens", cfg.data.shard_tokens, 1), ("data.prepare_workers", cfg.data.prepare_workers, 0),
        *((f"model.{k}", getattr(cfg.model, k), 0) for k in SIZE_KEYS),
        ("launch.max_restarts", launch.max_restarts, 0), ("launch.hang_timeout_s", launch.hang_timeout_s, 0),
        ("train.spike_factor", train.spike_factor, 0), ("train.spike_window", train.spike_window, 1),
        ("train.max_rollbacks", train.max_rollbacks, 0),
        ("log.held_bytes_every", cfg.log.held_bytes_every, 1), ("log.straggler_log_steps", cfg.log.straggler_log_steps, 0),
        ("preflight.shm_mb_per_gpu", pre.shm_mb_per_gpu, 0),
        ("preflight.shm_mb_per_cpu_process", pre.shm_mb_per_cpu_process, 0),
        ("preflight.min_stack_mb", pre.min_stack_mb, 0), ("preflight.disk_checkpoints", pre.disk_checkpoints, 0),
        ("preflight.min_link_gb_s", pre.min_link_gb_s, 0), ("preflight.bandwidth_budget_s", pre.bandwidth_budget_s, 0),
        ("preflight.shared_wait_s", pre.shared_wait_s, 0),
    ):
        if v < lo:
            raise ConfigError(f"{key}={v} is too small; it must be >= {lo}")
    for key, v in (("optim.lr", opt.lr), ("optim.eps", opt.eps), ("optim.grad_clip", opt.grad_clip)):
        if not v > 0:
            raise ConfigError(f"{key}={v} must be > 0")
    for key, v in (("optim.beta1", opt.beta1), ("optim.beta2", opt.beta2)):
        if not 0 <= v < 1:
            raise ConfigError(f"{key}={v} must be in [0, 1)")
    if not 0 <= opt.min_lr_ratio <= 1:
        raise ConfigError(f"optim.min_lr_ratio={opt.min_lr_ratio} must be in [0, 1]")
    if opt.weight_decay < 0:
        raise ConfigError(f"optim.weight_decay={opt.weight_decay} must be >= 0")
    if not 0 < launch.master_port < 65536:
        raise ConfigError(f"MASTER_PORT={launch.master_port} is not a TCP port (1..65535)")
    if not 0 <= launch.node_rank < launch.nnodes:
        raise ConfigError(f"launch.node_rank={launch.node_rank} must be in [0, nnodes={launch.nnodes})")
    if cfg.log.straggler_fraction <= 0:
        raise ConfigError(f"log.straggler_fraction={cfg.log.straggler_fraction} must be > 0")
    if not 0 < cfg.data.eval_fraction < 0.5:
        raise ConfigError(f"data.eval_fraction={cfg.data.eval_fraction} must be in (0, 0.5)")
    if cfg.checkpoint.resume not in ("auto", "never") and not Path(cfg.checkpoint.resume).exists():
        raise ConfigError(f"RESUME={cfg.checkpoint.resume!r}: no such checkpoint; use auto, never, or a checkpoint "
                          "directory (checkpoints/step_00000050, or step_50)")


def resolve_batch(cfg: RunConfig, world_size: int) -> tuple[int, int]:
    """(grad_accum, global_batch) for this world size, or a ConfigError saying what fits.

    If global_batch is set it is held fixed and accumulation is derived from it, so the same
    samples make up each optimizer step whatever the world size.
    """
    train = cfg.train
    if train.global_batch:
        per_step = train.micro_batch * world_size
        if train.global_batch % per_step:
            raise ConfigError(
                f"GLOBAL_BATCH={train.global_batch} is not divisible by MICRO_BATCH x world size = "
                f"{train.micro_batch} x {world_size} = {per_step}; choose a multiple of {per_step}"
            )
        return train.global_batch // per_step, train.global_batch
    return train.grad_accum, train.micro_batch * train.grad_accum * world_size


def dump_yaml(cfg: RunConfig, redact: bool = True) -> str:
    import yaml

    return yaml.safe_dump(cfg.redacted() if redact else cfg.to_dict(), sort_keys=False)


def help_text() -> str:
    hints = {**typing.get_type_hints(RunConfig),
             **{f"{sec}.{k}": t for sec, cls in _sections().items() for k, t in typing.get_type_hints(cls).items()}}
    lines = []
    for key, f in _key_fields():
        default = f.default if f.default is not dataclasses.MISSING else "-"
        allowed = typing.get_args(hints[key]) if typing.get_origin(hints[key]) is Literal else ()
        text = f.metadata.get("help") or " | ".join(allowed)
        lines.append(f"  {key:32} {str(default)!r:28} {f.metadata.get('env', ''):18} {text}")
    return "\n".join(lines)


def env_names() -> list[str]:
    """The short environment names, CONFIG first: what the Makefile passes on (its RUN_VARS)."""
    return [CONFIG_ENV, *ENV_VARS]
