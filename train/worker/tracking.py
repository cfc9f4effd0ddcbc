"""Experiment trackers through accelerate (``log_with``): TensorBoard, MLflow, Weights & Biases.

accelerate's tracker classes do the logging; this module picks them from ``log.trackers``,
checks the names and packages before any process starts, and points each at the run's
output directory: TensorBoard at OUTPUT_DIR/tensorboard, MLflow at a SQLite store
OUTPUT_DIR/mlflow.db (MLFLOW_TRACKING_URI, e.g. a server, overrides), W&B's files at
OUTPUT_DIR/wandb (WANDB_MODE=offline keeps them local; `wandb sync` uploads later).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from train.config import ConfigError, RunConfig
from train.storage import work_dir

# tracker -> (module accelerate imports, the package that provides it in constraints.txt)
TRACKERS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "mlflow": ("mlflow", "mlflow-skinny"),
    "wandb": ("wandb", "wandb"),
}


def tracker_names(cfg: RunConfig) -> list[str]:
    names = [t.strip().lower() for t in cfg.log.trackers.split(",") if t.strip()]
    names = [] if names == ["none"] else list(dict.fromkeys(names))
    return names


def check_trackers(cfg: RunConfig) -> None:
    """Launcher check: every tracker is known and its package importable (one line each)."""
    for name in tracker_names(cfg):
        if name not in TRACKERS:
            raise ConfigError(f"unknown tracker {name!r} in TRACKERS={cfg.log.trackers!r}; "
                              f"allowed: {', '.join(TRACKERS)} (comma-separated), or none")
        module, package = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"tracker {name!r} needs the {package} package, which is not installed; "
                              f"pip install -c constraints.txt {package}, or drop it from TRACKERS")
    if "wandb" in tracker_names(cfg) and not _wandb_can_log():
        raise ConfigError("TRACKERS includes wandb but no W&B login was found; set WANDB_API_KEY (or run "
                          "`wandb login`), or WANDB_MODE=offline to keep the run local")


def _wandb_can_log() -> bool:
    """Offline/disabled runs need nothing; online ones a key from the environment or ~/.netrc
    (where `wandb login` writes it). Otherwise each rank would fail inside wandb.init."""
    import netrc
    from urllib.parse import urlparse

    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun", "disabled") or os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def mlflow_uri(output_dir: str) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


def start_trackers(acc, cfg: RunConfig, config: dict) -> None:
    """``init_trackers`` with the resolved (redacted) config as parameters."""
    names = tracker_names(cfg)
    if not names:
        return
    out = work_dir(cfg).resolve()  # OUTPUT_DIR, or its node-local scratch when it is a URL
    run_name = out.name
    if "mlflow" in names:
        os.environ["MLFLOW_TRACKING_URI"] = mlflow_uri(str(out))  # accelerate's tracker reads the env
    kwargs = {"mlflow": {"run_name": run_name, "logging_dir": str(out / "mlflow-artifacts")},
              "wandb": {"name": run_name, "dir": os.environ.get("WANDB_DIR") or str(out)}}
    if "wandb" in names and acc.is_main_process:
        Path(kwargs["wandb"]["dir"]).mkdir(parents=True, exist_ok=True)
    acc.init_trackers(cfg.log.project, config=config, init_kwargs={k: v for k, v in kwargs.items() if k in names})
