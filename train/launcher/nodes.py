"""Which node am I, how many are there, and where is the master: one answer for every launcher.

The same image runs under five contracts. Each sets different variables, and each field is
taken from the first of these that supplies it:

1. ``config``: our own names (``NNODES``, ``NODE_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``,
   ``NPROC``) set in the environment, or in the run file / command line. Something a person
   wrote down explicitly beats anything a controller inferred.
2. ``pet``: Kubeflow Trainer v2 (and newer training-operator releases) set the torchrun
   variables ``PET_NNODES``, ``PET_NPROC_PER_NODE``, ``PET_NODE_RANK``, ``PET_MASTER_ADDR``,
   ``PET_MASTER_PORT``. They are named for exactly this purpose, so they beat the older ones.
3. ``pytorchjob``: the PyTorchJob v1 operator sets ``MASTER_ADDR``/``MASTER_PORT`` and a
   *node-level* ``RANK`` and ``WORLD_SIZE``. In older operators ``WORLD_SIZE`` is the number
   of pods (nodes), not processes; newer ones also set ``PET_NNODES`` and ``WORLD_SIZE`` =
   pods x nprocPerNode, which is why ``PET_*`` is read first. Passing ``WORLD_SIZE`` on as a
   process count is the classic wrong-world-size bug.
4. ``indexed-job``: a plain Kubernetes Indexed Job gives each pod ``JOB_COMPLETION_INDEX``
   (its node rank); ``NNODES`` and ``MASTER_ADDR`` come from the manifest's env (contract 1).
5. ``slurm``: a task of a Slurm job step (``srun``, one task per node: slurm/train.sbatch) has
   ``SLURM_STEP_NUM_NODES``, ``SLURM_NODEID``, ``SLURM_STEP_NODELIST`` (the master is its
   first node, at the address slurmctld knows it by: train/launcher/slurm.py), ``SLURM_JOB_ID`` (the
   port of a multi-node job is derived from it) and, when GPUs were allocated,
   ``SLURM_GPUS_ON_NODE``. Last, because Kubernetes contracts are explicit about training and
   Slurm variables can leak into a pod from an image built on a cluster.

Anything that disagrees with itself (rank >= nodes, a non-integer) is a ``ConfigError`` that
names the variable, raised before any process group exists.
"""

from __future__ import annotations

import socket
import sys
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

from train.config import ConfigError, LaunchConfig
from train.config.exitcodes import MASTER_UNREACHABLE, Exit
from train.launcher import slurm as slurm_env

_DEFAULTS = LaunchConfig()


class MasterUnreachable(Exit):
    """Node 0 did not answer within ``launch.master_wait_s``: exit 5 (exitcodes.MASTER_UNREACHABLE).

    Not a ConfigError: a cold node still pulling a 10 GB image, or slow DNS, is not bad input,
    and the Job retries this code while it fails at once on configuration errors.
    """

    code = MASTER_UNREACHABLE

# Node-level variables of the contracts above. The launcher should drop them from the
# environment it hands to `accelerate launch`: torchrun sets the per-process RANK/WORLD_SIZE
# itself, and a stale pod-level WORLD_SIZE reaching the workers is the wrong-world-size bug.
LAUNCHER_SCRUB_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                       "PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR",
                       "PET_MASTER_PORT")


_Parser = Optional[Callable[[Mapping[str, str], str], object]]  # reads a variable; None = our own name


@dataclass(frozen=True)
class NodeSpec:
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int
    nproc_per_node: int  # 0 = let the launcher decide from the devices
    source: str  # which contract supplied it: "config", "pet", "pytorchjob", "indexed-job", "slurm"


def _int(env: Mapping[str, str], name: str, lo: int = 0) -> int:
    raw = env[name].strip()
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={env[name]!r} is not an integer") from None
    if value < lo:
        raise ConfigError(f"{name}={value} must be >= {lo}")
    return value


def _nnodes(env: Mapping[str, str], name: str) -> int:
    """PET_NNODES may be an elastic range "MIN:MAX"; static rendezvous needs one number."""
    raw = env[name].strip()
    lo, sep, hi = raw.partition(":")
    if sep:
        if lo.strip() != hi.strip():
            raise ConfigError(f"{name}={raw!r} is an elastic range; this launcher needs a fixed node count (MIN == MAX)")
        return _int({name: lo}, name, lo=1)
    return _int(env, name, lo=1)


def _nproc(env: Mapping[str, str], name: str) -> int:
    """torchrun's nproc_per_node also accepts auto/gpu/cpu: leave those to the launcher (0)."""
    if env[name].strip().lower() in ("auto", "gpu", "cpu", "xpu"):
        return 0
    return _int(env, name, lo=0)


def _set(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip() != ""  # Make and compose pass unset variables as ""


def resolve_nodes(launch: LaunchConfig, env: Mapping[str, str],
                  node_address: Callable[[str], str] = slurm_env.node_address) -> NodeSpec:
    """The node topology for ``launch`` under whichever contract ``env`` carries (see module doc).

    ``launch`` already holds our own names resolved from the run file, env and command line;
    a value counts as explicit if its variable is set in ``env`` or it differs from the default.
    A single node with no port given gets a free one (``free_port``). ``node_address`` maps a
    Slurm node name to its address (scontrol; tests give their own).
    """

    def explicit(var: str, field: str) -> bool:
        return _set(env, var) or getattr(launch, field) != getattr(_DEFAULTS, field)

    # RANK + WORLD_SIZE without LOCAL_RANK is the PyTorchJob v1 pod contract; with LOCAL_RANK
    # they are a launched worker's *process* ranks and say nothing about nodes.
    pytorchjob = _set(env, "RANK") and _set(env, "WORLD_SIZE") and not _set(env, "LOCAL_RANK")
    # A task of a Slurm job (srun sets SLURM_NODEID; the batch shell has it too, as node 0).
    slurm = _set(env, "SLURM_JOB_ID") and _set(env, "SLURM_NODEID")
    step = slurm_env.in_step(env)
    slurm_nodes = "SLURM_STEP_NUM_NODES" if step and _set(env, "SLURM_STEP_NUM_NODES") else "SLURM_JOB_NUM_NODES"
    slurm_list = "SLURM_STEP_NODELIST" if step and _set(env, "SLURM_STEP_NODELIST") else "SLURM_JOB_NODELIST"
    used: dict[str, str] = {}
    var_of: dict[str, str] = {}  # field -> the variable it came from, for error messages
    defaulted: set[str] = set()

    def pick(field: str, candidates: list[tuple[str, str, _Parser]]) -> object:
        """The first candidate (source, variable, parser) that is set; parser None = our own name."""
        for source, var, parse in candidates:
            if parse is None and explicit(var, field):
                used[field], var_of[field] = source, var
                return getattr(launch, field)
            if parse is not None and _set(env, var):
                used[field], var_of[field] = source, var
                return parse(env, var)
        used[field], var_of[field] = "config", candidates[0][1]  # nobody said: the run file's value or the default
        defaulted.add(field)
        return getattr(launch, field)

    def first_node(e: Mapping[str, str], name: str) -> str:
        return node_address(slurm_env.expand_hostlist(e[name])[0])

    nnodes = pick("nnodes", [
        ("config", "NNODES", None),
        ("pet", "PET_NNODES", _nnodes),
        *([("pytorchjob", "WORLD_SIZE", lambda e, n: _int(e, n, lo=1))] if pytorchjob else []),
        *([("slurm", slurm_nodes, lambda e, n: _int(e, n, lo=1))] if slurm else []),
    ])
    node_rank = pick("node_rank", [
        ("config", "NODE_RANK", None),
        ("pet", "PET_NODE_RANK", _int),
        *([("pytorchjob", "RANK", _int)] if pytorchjob else []),
        ("indexed-job", "JOB_COMPLETION_INDEX", _int),
        *([("slurm", "SLURM_NODEID", _int)] if slurm else []),
    ])
    # PyTorchJob v1's MASTER_ADDR/MASTER_PORT are our own names, so they arrive as "config".
    master_addr = pick("master_addr", [
        ("config", "MASTER_ADDR", None),
        ("pet", "PET_MASTER_ADDR", lambda e, n: e[n].strip()),
        *([("slurm", slurm_list, first_node)] if slurm else []),
    ])
    master_port = pick("master_port", [
        ("config", "MASTER_PORT", None),
        ("pet", "PET_MASTER_PORT", lambda e, n: _int(e, n, lo=1)),
        # Every node must agree on it; one node takes a free port below, like any single node.
        *([("slurm", "SLURM_JOB_ID", lambda e, n: slurm_env.master_port(_int(e, n)))]
          if slurm and int(nnodes) > 1 else []),
    ])
    nproc = pick("nproc_per_node", [
        ("config", "NPROC", None),
        ("pet", "PET_NPROC_PER_NODE", _nproc),
        *([("slurm", "SLURM_GPUS_ON_NODE", _nproc)] if slurm else []),
    ])

    if int(nnodes) == 1 and "master_port" in defaulted:
        master_port = free_port()
    source = next((used[f] for f in ("node_rank", "nnodes") if used[f] != "config"), "config")
    spec = NodeSpec(int(nnodes), int(node_rank), str(master_addr), int(master_port), int(nproc), source)
    _check(spec, used, var_of, env)
    if used["nnodes"] == "slurm":
        _check_slurm(spec, env, step, slurm_nodes)
    return spec


def free_port() -> int:
    """A TCP port nobody listens on now: two single-node runs on one host must not both take
    the default 29500 (the second would fail at rendezvous). Multi-node runs need a port every
    node agrees on, so they keep MASTER_PORT."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _check(spec: NodeSpec, used: Mapping[str, str], var_of: Mapping[str, str], env: Mapping[str, str]) -> None:
    rank_var, nodes_var = var_of["node_rank"], var_of["nnodes"]
    if spec.nnodes < 1:
        raise ConfigError(f"{nodes_var}={spec.nnodes} must be >= 1")
    if not 0 <= spec.node_rank < spec.nnodes:
        hint = ""
        if used["nnodes"] == "config" and not _set(env, "NNODES"):
            hint = "; set NNODES to the Job's completions/parallelism"
        raise ConfigError(f"{rank_var}={spec.node_rank} is not a valid node rank for "
                          f"{nodes_var}={spec.nnodes} (must be 0..{spec.nnodes - 1}){hint}")
    if not 0 < spec.master_port < 65536:
        raise ConfigError(f"{var_of['master_port']}={spec.master_port} is not a TCP port")
    if not spec.master_addr:
        raise ConfigError(f"{var_of['master_addr']} is empty")
    if spec.nnodes > 1 and spec.source != "config" and used["master_addr"] == "config" \
            and spec.master_addr == _DEFAULTS.master_addr and not _set(env, "MASTER_ADDR"):
        # A pod that is told it is one of several nodes but not where the master is would wait
        # on its own loopback forever.
        raise ConfigError(f"{nodes_var}={spec.nnodes} nodes but MASTER_ADDR is not set; point it at node 0 "
                          "(in an Indexed Job: <job>-0.<headless service>)")


def _check_slurm(spec: NodeSpec, env: Mapping[str, str], step: bool, nodes_var: str) -> None:
    """One launcher per node, started by srun: it starts NPROC processes on its node itself, so
    more tasks per node would start several jobs that each expect to be the only one."""
    if not step:
        if spec.nnodes > 1:
            raise ConfigError(f"{nodes_var}={spec.nnodes} but this is the batch script, not a job step: start "
                              "`python -m train` with `srun --ntasks-per-node=1` (slurm/train.sbatch does)")
        return
    tasks_var = "SLURM_STEP_NUM_TASKS" if _set(env, "SLURM_STEP_NUM_TASKS") else "SLURM_NTASKS"
    if _set(env, tasks_var) and _int(env, tasks_var, lo=1) != spec.nnodes:
        raise ConfigError(f"{tasks_var}={env[tasks_var].strip()} tasks on {nodes_var}={spec.nnodes} nodes: run one task "
                          "per node (srun --ntasks-per-node=1); the launcher starts NPROC processes on each node itself")


def wait_for_master(spec: NodeSpec, timeout_s: float) -> None:
    """Block until the master's name resolves and its port accepts a TCP connection.

    Kubernetes DNS for a new pod can take ~30 s, and a name that resolves is not yet a
    listening rendezvous store, so both are checked. Bounded by ``timeout_s``; then
    ``MasterUnreachable`` says what was tried. A no-op on the master itself and on a single node.
    """
    if spec.node_rank == 0 or spec.nnodes == 1:
        return
    addr, port = spec.master_addr, spec.master_port
    start = time.monotonic()
    deadline = start + timeout_s
    delay, last_report, last_error = 0.2, start, "not tried"
    print(f"[nodes] waiting up to {timeout_s:.0f} s for master {addr}:{port}", file=sys.stderr, flush=True)
    while True:
        now = time.monotonic()
        try:
            infos = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            last_error = f"name does not resolve ({e.strerror or e})"
        else:
            for family, socktype, proto, _, sockaddr in infos:
                try:
                    with socket.socket(family, socktype, proto) as s:
                        s.settimeout(max(0.1, min(2.0, deadline - now)))
                        s.connect(sockaddr)
                    elapsed = time.monotonic() - start
                    print(f"[nodes] master {addr}:{port} reachable after {elapsed:.1f} s", file=sys.stderr, flush=True)
                    return
                except OSError as e:
                    last_error = f"resolves to {sockaddr[0]} but connect failed ({e.strerror or e})"
        now = time.monotonic()
        if now >= deadline:
            raise MasterUnreachable(f"master {addr}:{port} not reachable after {timeout_s:.0f} s: {last_error}; "
                              "is node 0 running, and does MASTER_ADDR name it (<job>-0.<headless service>)?")
        if now - last_report >= 5:
            print(f"[nodes] still waiting for master {addr}:{port} ({now - start:.0f}/{timeout_s:.0f} s): {last_error}",
                  file=sys.stderr, flush=True)
            last_report = now
        time.sleep(min(delay, max(0.0, deadline - now)))
        delay = min(delay * 1.5, 2.0)


__all__ = ["NodeSpec", "MasterUnreachable", "resolve_nodes", "wait_for_master", "free_port", "LAUNCHER_SCRUB_VARS"]
