"""The preflight's meeting point across nodes: node 0 serves a TCP store on the preflight port,
every node publishes its results there (``Group.share``) and says goodbye before node 0 closes it."""

from __future__ import annotations

import socket
from dataclasses import dataclass, replace
from datetime import timedelta

from train.config import ConfigError, RunConfig
from train.launcher.preflight.report import FAIL, Check


class Lost(Exception):
    """A peer did not answer in time: the check names who."""

    def __init__(self, check: Check):
        super().__init__(check.line())
        self.check = check


@dataclass
class Group:
    """The preflight's TCP store (node 0 serves it) with the few operations the checks need."""

    store: object
    me: int
    n: int
    timeout_s: float
    port: int

    def share(self, name: str, value: str) -> list[str]:
        """Publish this node's ``value``; every node's, in node order, once all have published."""
        self.store.set(f"{name}/{self.me}", value)
        keys = [f"{name}/{j}" for j in range(self.n)]
        try:
            self.store.wait(keys, timedelta(seconds=self.timeout_s))
        except RuntimeError:
            missing = [j for j, k in enumerate(keys) if not self.store.check([k])]
            raise Lost(Check("peers", f"node(s) {', '.join(map(str, missing))} did not answer ({name}) within "
                                       f"{self.timeout_s:.0f} s", "every node answers", FAIL,
                              f"check that the node started and reaches node 0's preflight port {self.port}; "
                              "its own log says why", node=missing[0] if missing else None, host="?")) from None
        return [self.store.get(k).decode() for k in keys]

    def leave(self) -> None:
        """Node 0's store must outlive every client's last request: the others say goodbye first."""
        try:
            self.store.set(f"bye/{self.me}", "1")
            if self.me == 0:
                self.store.wait([f"bye/{j}" for j in range(self.n)], timedelta(seconds=30))
        except RuntimeError:
            pass  # someone is gone already: nothing left to protect


def connect(cfg: RunConfig, spec, port: int):
    """The preflight's TCP store: node 0 serves it on ``port``, the others wait for it (bounded)."""
    import torch.distributed as dist

    from train.launcher.nodes import MasterUnreachable, wait_for_master

    timeout = timedelta(seconds=cfg.launch.timeout_s)
    if spec.node_rank == 0:
        try:
            # The server listens on every interface; node 0's own client needs no DNS for itself.
            return dist.TCPStore("127.0.0.1", port, spec.nnodes, True, timeout, wait_for_workers=False)
        except (RuntimeError, OSError) as e:
            raise ConfigError(f"preflight: node 0 cannot listen on port {port} ({str(e).splitlines()[0]}); "
                              "set preflight.port to a free port (every node the same)") from None
    try:
        wait_for_master(replace(spec, master_port=port), cfg.launch.master_wait_s)
        return dist.TCPStore(spec.master_addr, port, spec.nnodes, False, timeout)
    except (ConfigError, MasterUnreachable, RuntimeError) as e:
        raise MasterUnreachable(f"node {spec.node_rank} (host {socket.gethostname()}): preflight: node 0's preflight "
                                f"port {spec.master_addr}:{port} did not answer: {str(e).splitlines()[0]}") from None


