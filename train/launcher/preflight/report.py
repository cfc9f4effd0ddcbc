"""The preflight's result: one ``Check`` per thing measured, gathered into a ``Report`` (table, JSON)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"
JSON_NAME = "preflight.json"
MiB = 2**20


@dataclass
class Check:
    check: str
    value: str  # what was measured, for people
    threshold: str
    verdict: str  # ok | warn | fail | skip
    fix: str = ""
    measured: float | None = None  # the same as numbers, for the JSON
    limit: float | None = None
    node: int | None = None  # None: the whole job (all-reduce)
    host: str = "-"

    def where(self) -> str:
        return "all nodes" if self.node is None else f"node {self.node} (host {self.host})"

    def line(self) -> str:
        fix = f"; fix: {self.fix}" if self.fix else ""
        return f"{self.where()}: {self.check}: {self.value} vs {self.threshold}{fix}"


@dataclass
class Report:
    nnodes: int
    nproc_per_node: int
    device: str
    backend: str
    port: int | None
    checks: list[Check] = field(default_factory=list)
    allreduce: list[dict] = field(default_factory=list)
    pairs: list[dict] = field(default_factory=list)
    elapsed_s: float = 0.0
    # Seconds per phase on this node. "join" is waiting for the other nodes to arrive, which the
    # rendezvous would otherwise spend; the rest is what the preflight adds to start-up.
    phases: dict[str, float] = field(default_factory=dict)

    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.verdict == FAIL]

    def warnings(self) -> list[Check]:
        return [c for c in self.checks if c.verdict == WARN]

    @property
    def passed(self) -> bool:
        return not self.failures()

    def summary(self) -> str:
        n_warn = len(self.warnings())
        verdict = "passed" if self.passed else f"FAILED ({len(self.failures())} check(s))"
        port = f" on port {self.port}" if self.port else ""
        added = self.elapsed_s - self.phases.get("join", 0.0)
        waited = f" + {self.phases['join']:.1f} s waiting for the other nodes" if "join" in self.phases else ""
        return (f"[preflight] {self.nnodes} node(s) x {self.nproc_per_node} process(es), {self.device}, "
                f"{self.backend}{port}: {verdict} in {added:.1f} s{waited}"
                + (f", {n_warn} warning(s)" if n_warn else ""))

    def table(self) -> str:
        rows = [("node", "host", "check", "measured", "threshold", "verdict")]
        rows += [("all" if c.node is None else str(c.node), c.host, c.check, c.value, c.threshold, c.verdict)
                 for c in self.checks]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
        return "\n".join([self.summary(), *lines])

    def to_json(self) -> dict:
        return {"version": 1, "passed": self.passed, "nnodes": self.nnodes, "nproc_per_node": self.nproc_per_node,
                "device": self.device, "backend": self.backend, "port": self.port,
                "elapsed_s": round(self.elapsed_s, 3), "phases_s": {k: round(v, 3) for k, v in self.phases.items()},
                "failures": [c.line() for c in self.failures()],
                "checks": [asdict(c) for c in self.checks], "allreduce": self.allreduce, "pairs": self.pairs}


