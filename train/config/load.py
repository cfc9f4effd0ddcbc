"""Run configuration: typed dataclasses, filled from YAML, `.env`, environment and CLI.

Precedence, lowest first: dataclass defaults < YAML run file < `.env` < environment < CLI.
CLI overrides are ``section.key=value`` (``--section.key=value`` works too); the short
environment names in ``ENV_VARS`` are the same names the Makefile, compose and k8s use.
Unknown keys and values of the wrong type are errors that name the key and what is allowed."""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import typing
from pathlib import Path
from typing import Any, Literal, Mapping

from train.config.schema import (
    CONFIG_ENV,
    DEFAULT_CONFIG,
    ConfigError,
    RunConfig,
    _key_fields,
    bounds_error,
    eval_set_specs,
    harness_task_list,
    profile_ranks,
    profile_window,
)
from train.config.strategies import REPO_ROOT, STRATEGIES

# Short names shared by the Makefile, `.env`, compose and Kubernetes, from the fields' metadata.
ENV_VARS: dict[str, str] = {f.metadata["env"]: key for key, f in _key_fields() if "env" in f.metadata}
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
        if key == "data.eval_sets" and isinstance(value, Mapping):  # YAML's {name: source} as name=source,...
            value = ",".join(f"{k}={v}" for k, v in value.items())
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


# Keys that existed once: a config still using one gets what replaced it, not "unknown key".
REMOVED_KEYS = {
    "train.eval_batches": "evaluation now reads whole eval sets (the same blocks for any world size): use "
                          "train.eval_tokens (EVAL_TOKENS) to cap the tokens per set, 0 = all of it",
}


def _unknown_key(dotted: str, source: str) -> ConfigError:
    """Close matches only: the full list is ~60 keys, one `make keys` away."""
    if dotted in REMOVED_KEYS:
        return ConfigError(f"config key {dotted!r} (from {source}) was removed; {REMOVED_KEYS[dotted]}")
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
    cfg.sources[dotted] = source


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
    # .env also carries other variables (HF_TOKEN, NCCL_*), so an unknown name is no error;
    # one close to a setting's name is most likely a typo that would silently do nothing.
    for k, close in _misspelt_settings(from_dotenv):
        cfg.notes.append(f".env sets {k}, which is no setting (did you mean {close}?); it is ignored")
    if not cfg.output_dir:
        cfg.output_dir = default_output_dir(cfg, p, tree)
        cfg.sources["output_dir"] = "derived from the run file and strategy"
    _refuse_misspelt_make_variables(env)
    _resolve_resume_name(cfg)
    validate(cfg)
    _apply_accelerate_config(cfg)
    return cfg


# Set by the Makefile: the names given on make's command line. make passes any NAME=value on, so
# `make train MAX_STEP=5` would run the full default silently; `python -m train MAX_STEP=5` and
# the same line in .env are caught, and so is this. Names not close to a setting are make's own.
ENV_MAKE_VARIABLES = "TRAIN_MAKE_VARIABLES"


def _misspelt_settings(names) -> list[tuple[str, str]]:
    """(name, the setting it is close to) for each name that is no setting but nearly one."""
    out = []
    for name in sorted(set(names) - set(ENV_VARS) - {CONFIG_ENV}):
        close = difflib.get_close_matches(name, [*ENV_VARS, CONFIG_ENV], n=1, cutoff=0.85)
        if close:
            out.append((name, close[0]))
    return out


def _refuse_misspelt_make_variables(env: Mapping[str, str]) -> None:
    for name, close in _misspelt_settings(env.get(ENV_MAKE_VARIABLES, "").split()):
        raise ConfigError(f"make variable {name}={env.get(name, '')!r} is no setting; did you mean {close}? "
                          "(`make help` lists the settings)")


def default_output_dir(cfg: RunConfig, run_file: Path, tree: Mapping[str, Any]) -> str:
    """``outputs/<run file>-<strategy>``, plus a short hash when the run is not the run file's own
    (another model, dataset, SEQ_LEN, SEED or LoRA): each run the README shows gets its own
    directory, so trying one after another neither resumes the wrong run nor is refused as
    "a different run"; the same command run again continues where it stopped."""
    own = RunConfig()
    _apply_tree(own, tree, str(run_file))
    strategy = "accelerate" if cfg.launch.accelerate_config else cfg.launch.strategy  # checked after this
    name = f"outputs/{run_file.stem}-{strategy}"
    return name if own.fingerprint_hash() == cfg.fingerprint_hash() else f"{name}-{cfg.fingerprint_hash()[:6]}"


def _short(dotted: str) -> str:
    return next((n for n, d in ENV_VARS.items() if d == dotted), dotted)


def _apply_accelerate_config(cfg: RunConfig) -> None:
    """Map a user's `accelerate config` file onto the checked strategy rows (train/config/user_accelerate.py).

    Its settings beat the run file; a setting given on the command line, in the environment or
    in `.env` beats the file, with a notice. A different explicit STRATEGY is a conflict, refused.
    The file is then consumed (launch.accelerate_config cleared), so the launcher and every worker
    run the same checked recipe; the worker re-reads the same inputs and maps them identically.
    """
    path = cfg.launch.accelerate_config
    if not path:
        return
    from train.config.user_accelerate import UnsupportedAccelerateConfig, read

    try:
        settings, file_notes = read(path)
    except UnsupportedAccelerateConfig as e:
        raise ConfigError(f"ACCELERATE_CONFIG {path!r}: {e}; or use STRATEGY= instead "
                          f"({', '.join(STRATEGIES)})") from None
    src = cfg.sources
    mapped = []
    for dotted, value in settings.items():
        section, _, name = dotted.rpartition(".")
        current = getattr(getattr(cfg, section) if section else cfg, name)
        if _explicit(src.get(dotted)):
            if str(current) != str(value if value is not False else "no"):
                if dotted == "launch.strategy":
                    raise ConfigError(f"ACCELERATE_CONFIG {path!r} selects strategy {value!r} but "
                                      f"STRATEGY={current} ({src[dotted]}); set only one of them")
                cfg.notes.append(f"{_short(dotted)}={current} ({src[dotted]}) wins over "
                                  f"{dotted} = {value!r} from ACCELERATE_CONFIG {path}")
            continue
        _set(cfg, dotted, value, f"ACCELERATE_CONFIG {path}")
        mapped.append(f"{_short(dotted)}={getattr(getattr(cfg, section) if section else cfg, name)}")
    cfg.launch.accelerate_config = ""
    cfg.notes.insert(0, f"ACCELERATE_CONFIG {path} runs as the checked recipe: {', '.join(mapped)}")
    cfg.notes.extend(f"ACCELERATE_CONFIG {path}: {n}" for n in file_notes)
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
    launch, pre = cfg.launch, cfg.preflight
    if not launch.accelerate_config and launch.strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy {launch.strategy!r}; allowed: {', '.join(STRATEGIES)}")
    if launch.accelerate_config and not Path(launch.accelerate_config).is_file():
        raise ConfigError(f"ACCELERATE_CONFIG file {launch.accelerate_config!r} not found")
    if not 0 <= pre.port < 65536:
        raise ConfigError(f"preflight.port={pre.port} is not a TCP port (0 = MASTER_PORT + 1)")
    for key, f in _key_fields():  # each field's own bounds (schema.setting)
        section, _, name = key.rpartition(".")
        problem = bounds_error(key, getattr(getattr(cfg, section) if section else cfg, name), f.metadata)
        if problem:
            raise ConfigError(problem)
    if not 0 < launch.master_port < 65536:
        raise ConfigError(f"MASTER_PORT={launch.master_port} is not a TCP port (1..65535)")
    if not 0 <= launch.node_rank < launch.nnodes:
        raise ConfigError(f"launch.node_rank={launch.node_rank} must be in [0, nnodes={launch.nnodes})")
    profile_window(cfg.log)
    profile_ranks(cfg.log)
    eval_set_specs(cfg.data)
    check_harness_tasks(cfg.checkpoint)
    resume = cfg.checkpoint.resume
    # A URL (s3://...) is looked up where it lives, by the launcher (checkpoint/layout.py find_resume).
    if resume not in ("auto", "never") and "://" not in resume and not Path(resume).exists():
        raise ConfigError(f"RESUME={resume!r}: no such checkpoint; use auto, never, or a checkpoint "
                          "directory (checkpoints/step_00000050, or step_50)")


def check_harness_tasks(ckpt) -> None:
    """What can be checked without lm-eval: a YAML task file exists, and there is an export to run on.
    Task names are checked by lm-eval itself before the job starts (train/launcher/inputs.py)."""
    tasks = harness_task_list(ckpt.harness_tasks)
    if tasks and not ckpt.export:
        raise ConfigError("checkpoint.harness_tasks runs on the final export; set checkpoint.export=true, or run "
                          "`python -m train harness --model CHECKPOINT --tasks ...` on a checkpoint later")
    for t in tasks:
        if t.endswith((".yaml", ".yml")) and not Path(t).is_file():
            raise ConfigError(f"checkpoint.harness_tasks: task file {t!r} not found")


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
        text, choices = f.metadata.get("help", ""), " | ".join(allowed)
        text = f"{text} ({choices})" if choices and choices not in text else text
        lines.append(f"  {key:32} {str(default)!r:28} {f.metadata.get('env', ''):18} {text}")
    return "\n".join(lines)


def env_names() -> list[str]:
    """The short environment names, CONFIG first: what the Makefile passes on (its RUN_VARS)."""
    return [CONFIG_ENV, *ENV_VARS]
