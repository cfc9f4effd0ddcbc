"""Which node am I, how many are there, and where is the master: one answer for every launcher.

The same image runs under four contracts. Each sets different variables, and each field is
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
    source: str  # which contract supplied it: "config", "pet", "pytorchjob", "indexed-job"


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


def resolve_nodes(launch: LaunchConfig, env: Mapping[str, str]) -> NodeSpec:
    """The node topology for ``launch`` under whichever contract ``env`` carries (see module doc).

    ``launch`` already holds our own names resolved from the run file, env and command line;
    a value counts as explicit if its variable is set in ``env`` or it differs from the default.
    A single node with no port given gets a free one (``free_port``).
    """

    def explicit(var: str, field: str) -> bool:
        return _set(env, var) or getattr(launch, field) != getattr(_DEFAULTS, field)

    # RANK + WORLD_SIZE without LOCAL_RANK is the PyTorchJob v1 pod contract; with LOCAL_RANK
    # they are a launched worker's *process* ranks and say nothing about nodes.
    pytorchjob = _set(env, "RANK") and _set(env, "WORLD_SIZE") and not _set(env, "LOCAL_RANK")
    used: dict[str, str] = {}
    defaulted: set[str] = set()

    def pick(field: str, candidates: list[tuple[str, str, _Parser]]) -> object:
        """The first candidate (source, variable, parser) that is set; parser None = our own name."""
        for source, var, parse in candidates:
            if parse is None and explicit(var, field):
                used[field] = source
                return getattr(launch, field)
            if parse is not None and _set(env, var):
                used[field] = source
                return parse(env, var)
        used[field] = "config"  # nobody said: the run file's value or the default
        defaulted.add(field)
        return getattr(launch, field)

    nnodes = pick("nnodes", [
        ("config", "NNODES", None),
        ("pet", "PET_NNODES", _nnodes),
        *([("pytorchjob", "WORLD_SIZE", lambda e, n: _int(e, n, lo=1))] if pytorchjob else []),
    ])
    node_rank = pick("node_rank", [
        ("config", "NODE_RANK", None),
        ("pet", "PET_NODE_RANK", _int),
        *([("pytorchjob", "RANK", _int)] if pytorchjob else []),
        ("indexed-job", "JOB_COMPLETION_INDEX", _int),
    ])
    # PyTorchJob v1's MASTER_ADDR/MASTER_PORT are our own names, so they arrive as "config".
    master_addr = pick("master_addr", [
        ("config", "MASTER_ADDR", None),
        ("pet", "PET_MASTER_ADDR", lambda e, n: e[n].strip()),
    ])
    master_port = pick("master_port", [
        ("config", "MASTER_PORT", None),
        ("pet", "PET_MASTER_PORT", lambda e, n: _int(e, n, lo=1)),
    ])
    nproc = pick("nproc_per_node", [
        ("config", "NPROC", None),
        ("pet", "PET_NPROC_PER_NODE", _nproc),
    ])

    if int(nnodes) == 1 and "master_port" in defaulted:
        master_port = free_port()
    source = next((used[f] for f in ("node_rank", "nnodes") if used[f] != "config"), "config")
    spec = NodeSpec(int(nnodes), int(node_rank), str(master_addr), int(master_port), int(nproc), source)
    _check(spec, used, env)
    return spec


def free_port() -> int:
    """A TCP port nobody listens on now: two single-node runs on one host must not both take
    the default 29500 (the second would fail at rendezvous). Multi-node runs need a port every
    node agrees on, so they keep MASTER_PORT."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


_VAR_OF = {  # for error messages: which variable a field came from, per source
    ("nnodes", "config"): "NNODES", ("nnodes", "pet"): "PET_NNODES", ("nnodes", "pytorchjob"): "WORLD_SIZE",
    ("node_rank", "config"): "NODE_RANK", ("node_rank", "pet"): "PET_NODE_RANK",
    ("node_rank", "pytorchjob"): "RANK", ("node_rank", "indexed-job"): "JOB_COMPLETION_INDEX",
    ("master_addr", "config"): "MASTER_ADDR", ("master_addr", "pet"): "PET_MASTER_ADDR",
    ("master_port", "config"): "MASTER_PORT", ("master_port", "pet"): "PET_MASTER_PORT",
}


def _check(spec: NodeSpec, used: Mapping[str, str], env: Mapping[str, str]) -> None:
    rank_var = _VAR_OF[("node_rank", used["node_rank"])]
    nodes_var = _VAR_OF[("nnodes", used["nnodes"])]
    if spec.nnodes < 1:
        raise ConfigError(f"{nodes_var}={spec.nnodes} must be >= 1")
    if not 0 <= spec.node_rank < spec.nnodes:
        hint = ""
        if used["nnodes"] == "config" and not _set(env, "NNODES"):
            hint = "; set NNODES to the Job's completions/parallelism"
        raise ConfigError(f"{rank_var}={spec.node_rank} is not a valid node rank for "
                          f"{nodes_var}={spec.nnodes} (must be 0..{spec.nnodes - 1}){hint}")
    if not 0 < spec.master_port < 65536:
        raise ConfigError(f"{_VAR_OF[('master_port', used['master_port'])]}={spec.master_port} is not a TCP port")
    if not spec.master_addr:
        raise ConfigError(f"{_VAR_OF[('master_addr', used['master_addr'])]} is empty")
    if spec.nnodes > 1 and spec.source != "config" and used["master_addr"] == "config" \
            and spec.master_addr == _DEFAULTS.master_addr and not _set(env, "MASTER_ADDR"):
        # A pod that is told it is one of several nodes but not where the master is would wait
        # on its own loopback forever.
        raise ConfigError(f"{nodes_var}={spec.nnodes} nodes but MASTER_ADDR is not set; point it at node 0 "
                          "(in an Indexed Job: <job>-0.<headless service>)")


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
