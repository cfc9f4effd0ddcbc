"""``python -m train verify CKPT [--steps N] [--tolerance R] [--out DIR] [key=value ...]``:
does this checkpoint still reproduce?

1. Reads the checkpoint's provenance (train/checkpoint/provenance.py) and says which fields
   differ from this host: code, image, packages, hardware, and the config with any overrides.
2. Hashes the data the run trained from again: a changed, missing or new file is named and the
   verdict is "does not reproduce" at once (exit 9), without a replay.
3. Replays the ``N`` steps after the checkpoint through the normal launcher (a real job, the
   recorded settings, a scratch OUTPUT_DIR; ``train.until_step`` keeps the LR schedule of the
   whole run) and compares each logged loss and sample hash with the run's own metrics.jsonl:
   bitwise when code, packages, hardware, image, config and world size are the recorded ones,
   else (or with ``--tolerance``) within a relative tolerance, said in the verdict. Exit 0: it reproduces;
   exit 9 (not-reproduced): it does not, with the first step that differs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from train.checkpoint import provenance
from train.checkpoint.layout import MANIFEST, read_manifest
from train.config import ENV_VARS, ConfigError, RunConfig, load_config
from train.config.exitcodes import CONFIG, NOT_REPRODUCED, Exit, describe
from train.config.schema import CONFIG_ENV
from train.config.strategies import REPO_ROOT

DEFAULT_STEPS = 10
DEFAULT_TOLERANCE = 1e-3
# The replay is a check, not a run: no trackers, saves, export, evaluation or node checks.
REPLAY_SETTINGS = {"CHECKPOINT_EVERY": "0", "TRACKERS": "none", "PREFLIGHT": "off", "NNODES": "1", "NODE_RANK": "0",
                   "MASTER_ADDR": "127.0.0.1", "checkpoint.export": "false", "train.eval_every": "0",
                   "log.profile_steps": ""}


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="python -m train verify", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a checkpoint directory (OUTPUT_DIR/checkpoints/step_N)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="steps to replay after the checkpoint")
    p.add_argument("--tolerance", type=float, default=None,
                   help=f"compare within this relative tolerance instead of bitwise (default: bitwise when nothing "
                        f"differs from the recorded environment, else {DEFAULT_TOLERANCE:g})")
    p.add_argument("--out", help="scratch OUTPUT_DIR of the replay (default: OUTPUT_DIR/verify/step_N)")
    args, rest = p.parse_known_args(argv)
    bad = [a for a in rest if "=" not in a]
    if bad:
        raise ConfigError(f"verify: unexpected argument {bad[0]!r}; allowed: CKPT, --steps N, --tolerance R, "
                          "--out DIR and key=value overrides")
    if args.steps < 1:
        raise ConfigError(f"verify --steps {args.steps}: must be >= 1")
    if args.tolerance is not None and not args.tolerance >= 0:
        raise ConfigError(f"verify --tolerance {args.tolerance}: must be >= 0")
    return args, rest


def logged(metrics: Path) -> dict[int, dict]:
    """step -> the run's loss row for it; a step logged twice (a restart replayed it) keeps its last row."""
    rows = {}
    for line in metrics.read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if "loss" in r and "step" in r:
            rows[int(r["step"])] = r
    return rows


def _windows(steps: list[int], start: int) -> dict[int, int]:
    """step -> the step its log window started after (a logged loss is the mean since the previous one)."""
    out, prev = {}, start
    for s in sorted(steps):
        out[s], prev = prev, s
    return out


def _fmt(value) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def replay_args(run_config: Path, recorded: RunConfig, ckpt: Path, out: Path, until: int, port: int,
                overrides: list[str]) -> list[str]:
    """The recorded settings, each by its short name (so neither this shell's environment nor a
    .env file can change them), the replay's own, then the user's overrides."""
    short = {name: _fmt(_get(recorded, dotted)) for name, dotted in ENV_VARS.items()}
    fixed = {**REPLAY_SETTINGS, "OUTPUT_DIR": str(out), "RESUME": str(ckpt), "MASTER_PORT": str(port),
             "train.until_step": str(until)}
    return [f"{CONFIG_ENV}={run_config}", *(f"{k}={v}" for k, v in {**short, **fixed}.items()), *overrides]


def _get(cfg: RunConfig, dotted: str):
    section, _, key = dotted.rpartition(".")
    return getattr(getattr(cfg, section) if section else cfg, key)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _replay_env() -> dict[str, str]:
    """This environment without any setting's variable (the recorded settings rule), running this
    checkout's code whatever the working directory."""
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS and k != CONFIG_ENV}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def main(argv: list[str]) -> int:
    args, overrides = parse(argv)
    ckpt = Path(args.checkpoint).resolve()
    if not (ckpt / MANIFEST).is_file():
        raise ConfigError(f"verify: {args.checkpoint!r} is not a complete checkpoint (no {MANIFEST}); pass "
                          "OUTPUT_DIR/checkpoints/step_N")
    manifest = read_manifest(ckpt)
    recorded = manifest.get("provenance")
    run_config = ckpt / "run_config.yaml"
    if not recorded or not run_config.is_file():
        raise ConfigError(f"verify: {ckpt} records no provenance (written before it existed); nothing to replay against")
    run_dir = ckpt.parent.parent  # OUTPUT_DIR/checkpoints/step_N
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise ConfigError(f"verify: {metrics} is missing: the run's logged losses are what the replay is compared with")
    step = int(manifest["step"])
    rows = logged(metrics)
    after = sorted(s for s in rows if s > step)
    if not after:
        raise ConfigError(f"verify: the run logged no loss after step {step} ({metrics}); pick an earlier checkpoint")
    until = max(s for s in after if s <= step + args.steps) if after[0] <= step + args.steps else after[0]
    out = Path(args.out).resolve() if args.out else run_dir / "verify" / ckpt.name
    if out == run_dir or run_dir.is_relative_to(out):
        raise ConfigError(f"verify --out {out}: must not hold the run itself; pick an empty scratch directory")

    env = _replay_env()
    recorded_cfg = load_config([f"{CONFIG_ENV}={run_config}"], env=env, dotenv_path=None)
    port = _free_port()
    argv_replay = replay_args(run_config, recorded_cfg, ckpt, out, until, port, overrides)
    replay_cfg = load_config(argv_replay, env=env)  # bad overrides stop here: exit 2, nothing started

    from train.launcher.launch import processes_per_node
    from train.worker.accelerator import resolve_device

    device = resolve_device(replay_cfg.launch.device)
    world = processes_per_node(replay_cfg.launch.nproc_per_node, device)
    here = {**provenance.host(replay_cfg, device), "config": replay_cfg.redacted()}
    changes = provenance.differences(recorded, here, parts=("code", "image", "packages", "constraints", "hardware", "config"))
    if world != recorded.get("nodes", {}).get("world_size"):
        changes.append(f"world size: {recorded.get('nodes', {}).get('world_size')} -> {world} (the replay converts)")
    print(f"[verify] {ckpt} (step {step}); written by {provenance.code_line(recorded.get('code', {}))}", flush=True)
    for line in provenance.caveats(recorded):
        print(f"[verify] note: {line}", flush=True)
    for line in changes or ["nothing: same code, image, packages, hardware, config and world size"]:
        print(f"[verify] differs from this host: {line}", flush=True)

    data_changed = provenance.data_changes(recorded.get("data"), provenance.data_identity(replay_cfg.data, deep=True))
    if data_changed:
        for line in data_changed:
            print(f"[verify] {line}", flush=True)
        raise Exit(f"verify: {ckpt.name} does not reproduce: the data differs from what the run trained from "
                   f"({data_changed[0]})", NOT_REPRODUCED)

    exact = not changes and args.tolerance is None
    replayed = _replay(argv_replay, env, out, step, until)
    tolerance = DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance
    return _compare(rows, replayed, step, until, exact, tolerance, ckpt.name, changes)


def _replay(argv: list[str], env: dict, out: Path, step: int, until: int) -> dict[int, dict]:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    log = out.parent / f"{out.name}.log"
    print(f"[verify] replaying steps {step + 1}..{until} into {out} (log: {log})", flush=True)
    with open(log, "w") as f:
        code = subprocess.run([sys.executable, "-m", "train", *argv], env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    text = log.read_text()
    for line in text.splitlines():
        if line.startswith("[resume]"):  # what the replay's own resume saw changed
            print(f"[verify] replay: {line}", flush=True)
    if code != 0:
        tail = "\n".join(text.splitlines()[-15:])
        print(tail, file=sys.stderr, flush=True)
        raise Exit(f"verify: the replay stopped with {describe(code)}; its log: {log}",
                   CONFIG if code == CONFIG else NOT_REPRODUCED)
    return logged(out / "metrics.jsonl")


def _compare(rows: dict, replayed: dict, step: int, until: int, exact: bool, tolerance: float, name: str,
             changes: list[str]) -> int:
    """Logged against replayed, for each step whose log window is the same in both."""
    orig_windows = _windows(list(rows), 0)
    rep_windows = _windows(list(replayed), step)
    steps = [s for s in sorted(replayed) if step < s <= until and s in rows and orig_windows[s] == rep_windows[s]]
    if not steps:
        raise Exit(f"verify: the replay logged no step to compare with the run's (steps {step + 1}..{until})", NOT_REPRODUCED)
    why = "the environment differs, above" if changes else "--tolerance"
    how = "bitwise" if exact else f"within a relative tolerance of {tolerance:g} ({why})"
    print(f"[verify] {'step':>8} {'logged loss':>22} {'replayed loss':>22}  samples", flush=True)
    first_bad = None
    for s in steps:
        a, b = rows[s]["loss"], replayed[s]["loss"]
        same_samples = rows[s].get("sample_hash") == replayed[s].get("sample_hash")
        ok = same_samples and (a == b if exact else abs(a - b) <= tolerance * max(abs(a), abs(b)))
        print(f"[verify] {s:>8} {a!r:>22} {b!r:>22}  {'same' if same_samples else 'DIFFER'}"
              f"{'' if ok else '  <- differs'}", flush=True)
        if not ok and first_bad is None:
            first_bad = (s, a, b, same_samples)
    if first_bad is not None:
        s, a, b, same_samples = first_bad
        what = "consumed other samples" if not same_samples else f"loss {a!r} logged, {b!r} replayed"
        raise Exit(f"verify: {name} does not reproduce {how}: step {s} {what}", NOT_REPRODUCED)
    print(f"verify: {name} reproduces: {len(steps)} logged loss(es) of steps {steps[0]}..{steps[-1]} replayed {how}",
          flush=True)
    return 0
