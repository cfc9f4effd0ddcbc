"""The job's exit codes: one table for the launcher, the README, compose and the Job's podFailurePolicy.

The launcher (one supervisor per node) exits with one of these. ``final`` codes mean a retry
cannot help (the Kubernetes Job fails at once, compose does not restart); the others may succeed
on another attempt (a restart resumes from the newest complete checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ExitCode:
    code: int
    name: str
    final: bool
    meaning: str


OK = 0
FAILED = 1
CONFIG = 2
PREFLIGHT = 3
HANG = 4
MASTER_UNREACHABLE = 5
REPEATED_FAILURE = 6
DIVERGED = 7
SUPERSEDED = 8
NOT_REPRODUCED = 9
OUT_OF_MEMORY = 10
PREEMPTED = 143  # 128 + SIGTERM, what a process killed by SIGTERM reports, so shells read it alike

TABLE: tuple[ExitCode, ...] = (
    ExitCode(OK, "ok", True, "the run finished (or `launch.preflight=only` passed)"),
    ExitCode(FAILED, "failed", False, "a worker crashed and the restart budget is spent, or an unexpected error"),
    ExitCode(CONFIG, "config", True, "bad input (a setting, a file, a refused resume); the last line names it"),
    ExitCode(PREFLIGHT, "preflight", True, "a preflight check failed on a node (shm, disk, devices, shared storage, link)"),
    ExitCode(HANG, "hang", False, "no rank finished a step for launch.hang_timeout_s; stacks in OUTPUT_DIR/hangs"),
    ExitCode(MASTER_UNREACHABLE, "master-unreachable", False,
             "this node could not reach the master within launch.master_wait_s (e.g. still pulling an image)"),
    ExitCode(REPEATED_FAILURE, "repeated-failure", True, "the same failure at the same step twice: restarting cannot help"),
    ExitCode(DIVERGED, "diverged", True, "the loss stayed non-finite or spiking after train.max_rollbacks rollbacks"),
    ExitCode(SUPERSEDED, "superseded", True, "another gang took over this OUTPUT_DIR (run lock); this one stepped aside"),
    ExitCode(NOT_REPRODUCED, "not-reproduced", True,
             "`verify`: the replayed losses differ from the logged ones, or the data changed; the lines above say which"),
    ExitCode(OUT_OF_MEMORY, "out-of-memory", True,
             "a rank ran out of GPU memory; the memory snapshot is in OUTPUT_DIR/profiles (same settings, same result)"),
    ExitCode(PREEMPTED, "preempted", False, "SIGTERM: every rank stopped at one agreed step and saved; RESUME=auto continues"),
)

BY_CODE = {e.code: e for e in TABLE}
FINAL_CODES = tuple(e.code for e in TABLE if e.final and e.code != OK)


def name(code: int) -> str:
    """The table's name for a code: also the status a rank reports to its supervisor."""
    e = BY_CODE.get(code)
    return e.name if e else f"exit {code}"


class Exit(Exception):
    """Leave the process with ``code``, saying ``message`` in one line (nothing if empty).

    Raised where the decision is made (a check, a refusal, a verdict) and turned into the
    process's exit once, in ``train.__main__``; a rank hands final codes to its supervisor first.
    Subclasses fix the code: ``ConfigError`` (2), ``MasterUnreachable`` (5), ``Diverged`` (7).
    """

    code = FAILED

    def __init__(self, message: str = "", code: int | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


def describe(code: int) -> str:
    e = BY_CODE.get(code)
    return f"exit {code} ({e.name}: {e.meaning})" if e else f"exit {code}"


def markdown_table() -> str:
    """The README's table, generated so it cannot drift (a test compares them)."""
    rows = ["| code | name | retry helps | meaning |", "|---|---|---|---|"]
    rows += [f"| {e.code} | {e.name} | {'-' if e.code == OK else 'no' if e.final else 'yes'} | {e.meaning} |" for e in TABLE]
    return "\n".join(rows)
