"""``python -m train harness --model EXPORT_OR_CHECKPOINT --tasks NAME_OR_YAML,...``: a benchmark
harness (EleutherAI's lm-eval, through its Python API) on a Hugging Face export.

- ``--model`` is an export (``OUTPUT_DIR/final``, or any folder ``from_pretrained`` loads) or a
  checkpoint, which is exported first (train/checkpoint/convert.py) to
  ``RUN/harness/<checkpoint name>/``, kept beside the results so the scored model can be read again.
- ``--tasks``: lm-eval task names, or YAML task files. A YAML file's relative ``data_files`` are
  read relative to the file (lm-eval alone reads them relative to the working directory), so
  ``configs/lm_eval/tiny_stories.yaml`` works from anywhere.
- Results go to ``harness.json`` beside the model, and to the run's ``metrics.jsonl`` (a row
  ``{"step": N, "harness/TASK/METRIC": value}``) when the model is a run's ``final/`` or one of its
  checkpoints.
- Offline unless told otherwise: HF_HUB_OFFLINE, HF_DATASETS_OFFLINE and TRANSFORMERS_OFFLINE
  default to 1 here (local tasks never wait on the network); set them to 0 to let lm-eval
  download a hub task's data.

lm-eval is imported only in this process (it is heavy: its task index alone takes seconds). A run
with ``checkpoint.harness_tasks`` gets this command from its launcher after the ranks have exited,
and a ``--check`` of the task names before they start.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import time
from pathlib import Path

from train.config import ConfigError
from train.config.schema import harness_task_list

RESULTS = "harness.json"
OFFLINE = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every bad input
        raise ConfigError(f"{self.prog}: {message}")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m train harness", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="an export (OUTPUT_DIR/final) or a checkpoint (OUTPUT_DIR/checkpoints/step_N)")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names or YAML task files")
    p.add_argument("--limit", type=int, default=0, help="documents per task (0 = all)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="", help="cpu, cuda, cuda:1 ...; empty = cuda if torch sees a GPU, else cpu")
    p.add_argument("--out", default="", help=f"results file; default MODEL/{RESULTS}")
    p.add_argument("--step", type=int, default=0, help="the step the metrics.jsonl row is logged at (default: "
                                                        "the checkpoint's, or the run's last)")
    p.add_argument("--check", action="store_true", help="only check that the tasks exist (no model)")
    return p


def is_task_file(task: str) -> bool:
    return task.endswith((".yaml", ".yml"))


def load_tasks(tasks: list[str]):
    """(lm-eval TaskManager, task specs): names as they are, YAML files as configs with their
    relative data_files made absolute. An unknown name or a missing file is a ConfigError."""
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    specs: list = []
    for t in tasks:
        if not is_task_file(t):
            specs.append(t)
            continue
        path = Path(t).expanduser().resolve()
        if not path.is_file():
            raise ConfigError(f"lm-eval task file {t!r} not found")
        cfg = load_yaml(path, resolve_func=True)
        if not isinstance(cfg, dict) or "task" not in cfg:
            raise ConfigError(f"lm-eval task file {t!r} has no `task:` name (is it a task YAML?)")
        files = (cfg.get("dataset_kwargs") or {}).get("data_files")
        if files:
            cfg["dataset_kwargs"]["data_files"] = _beside(files, path.parent)
        specs.append(cfg)
    names = [s for s in specs if isinstance(s, str)]
    manager = TaskManager(include_defaults=bool(names))  # the built-in index (~10 s) only when a name needs it
    for n in names:
        if n not in manager.all_tasks:
            close = difflib.get_close_matches(n, manager.all_tasks, n=3)
            hint = f"; did you mean {' or '.join(close)}?" if close else "; `lm-eval ls tasks` lists them"
            raise ConfigError(f"unknown lm-eval task {n!r} (not a task, group or tag name, nor a .yaml file){hint}")
    return manager, specs


def _beside(files, base: Path):
    """data_files (a path, a list, or a split -> path(s) mapping) relative to ``base``."""
    if isinstance(files, dict):
        return {k: _beside(v, base) for k, v in files.items()}
    if isinstance(files, list):
        return [_beside(v, base) for v in files]
    return str(base / files) if "://" not in str(files) and not Path(files).is_absolute() else files


def resolve_model(path: str) -> tuple[Path, Path | None, int | None]:
    """(the export to score, the run directory whose metrics.jsonl gets a row, the step), exporting
    a checkpoint first."""
    from train.checkpoint.layout import MANIFEST, read_manifest

    p = Path(path)
    if (p / MANIFEST).is_file():  # a checkpoint: export it beside the run's other results
        from train.checkpoint.convert import _checked, export

        ckpt, manifest = _checked(str(p))
        run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
        out = run / "harness" / ckpt.name
        print(f"[harness] exporting {ckpt} to {out}", flush=True)
        export(ckpt, out)
        return out, run, int(read_manifest(ckpt).get("step", 0))
    if (p / "config.json").is_file():
        run = p.parent if p.name == "final" and (p.parent / "metrics.jsonl").is_file() else None
        return p, run, None
    if (p / "adapter" / "adapter_config.json").is_file():
        raise ConfigError(f"{path!r} holds a LoRA adapter only (checkpoint.merge_lora=false); export a checkpoint "
                          "(`python -m train export CKPT OUT`) or rerun with checkpoint.merge_lora=true")
    raise ConfigError(f"--model {path!r} is neither a model export (no config.json) nor a checkpoint (no {MANIFEST})")


def scalars(results: dict) -> dict[str, float]:
    """lm-eval's per-task results as ``harness/TASK/METRIC`` numbers (filter "none" dropped, no stderr)."""
    out = {}
    for task, metrics in results.items():
        for key, v in metrics.items():
            metric, _, filt = key.partition(",")
            if not filt or "stderr" in metric or not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            out[f"harness/{task}/{metric if filt == 'none' else f'{metric}_{filt}'}"] = float(v)
    return out


def _last_step(metrics: Path) -> int:
    steps = [json.loads(ln).get("step", 0) for ln in metrics.read_text().splitlines() if ln.strip()]
    return max(steps, default=0)


def run(model: str, tasks: list[str], *, limit: int = 0, batch_size: int = 8, device: str = "", out: str = "",
        step: int = 0) -> dict:
    for var in OFFLINE:
        os.environ.setdefault(var, "1")
    manager, specs = load_tasks(tasks)
    export_dir, run_dir, ckpt_step = resolve_model(model)
    import lm_eval
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.monotonic()
    print(f"[harness] lm-eval {lm_eval.__version__}: {', '.join(tasks)} on {export_dir} ({device}"
          f"{f', {limit} documents per task' if limit else ''})", flush=True)
    r = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(export_dir)}, tasks=specs,
                                task_manager=manager, device=device, batch_size=batch_size, limit=limit or None,
                                log_samples=False)
    numbers = scalars(r["results"])
    record = {"model": str(export_dir), "tasks": tasks, "limit": limit or None, "lm_eval_version": lm_eval.__version__,
              "seconds": round(time.monotonic() - t0, 1), "metrics": numbers, "results": r["results"],
              "versions": r.get("versions"), "n-samples": r.get("n-samples"), "configs": r.get("configs")}
    dest = Path(out) if out else export_dir / RESULTS
    dest.write_text(json.dumps(record, indent=2, default=str) + "\n")
    for k, v in numbers.items():
        print(f"[harness] {k}={v:.6g}", flush=True)
    print(f"[harness] results: {dest}", flush=True)
    metrics = run_dir / "metrics.jsonl" if run_dir is not None else None
    if metrics is not None and metrics.is_file():
        row = {"step": step or ckpt_step or _last_step(metrics), **numbers}
        with metrics.open("a") as f:
            f.write(json.dumps(row) + "\n")
    return record


def main(argv: list[str]) -> None:
    args = _parser().parse_args(argv)
    tasks = harness_task_list(args.tasks)
    if not tasks:
        raise ConfigError("--tasks is empty; name lm-eval tasks or YAML task files (e.g. configs/lm_eval/tiny_stories.yaml)")
    if args.check:
        load_tasks(tasks)
        return
    if not args.model:
        raise ConfigError("--model is required: an export (OUTPUT_DIR/final) or a checkpoint directory")
    if args.limit < 0:
        raise ConfigError(f"--limit={args.limit} must be >= 0 (0 = every document)")
    run(args.model, tasks, limit=args.limit, batch_size=args.batch_size, device=args.device, out=args.out,
        step=args.step)
