"""What one bench run measures: its settings (saved in the report) and its targets."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

QUICK = {"MODEL": "llama-debug", "SEQ_LEN": "32", "MICRO_BATCH": "4"}
TARGET_OVERHEAD = 1.01  # our loop's median step time / the plain loop's
TARGET_USEFUL = 0.999
TARGET_MEMORY = 0.05  # |measured / formula - 1| for N=2
RUN_TIMEOUT_S = 600
LOOPS = ("ours", "plain-pg", "plain", "trainer")  # the single-process loops of section 1
PARTNER = "plain"  # on CPU, the loop that runs beside each of the others (BenchSettings.pair_cores)


def ready(until: str | Path) -> Path:
    """The file a partner run (``bench --worker plain --until FILE``) creates once it is built; it
    takes no step before ``go(until)`` exists."""
    return Path(f"{until}.ready")


def go(until: str | Path) -> Path:
    """Created when the run beside the partner is about to take its first step: both start
    stepping together (a partner that had been stepping for a while measured ~2% slower per step
    than the same loop starting beside it, which favoured loops that start up slowly)."""
    return Path(f"{until}.go")


@dataclass
class BenchSettings:
    model: str
    seq_len: int
    micro_batch: int
    dataset: str
    device: str  # "cpu" | "cuda"
    steps: int  # optimizer steps per run
    burn_in: int  # first steps of each run not timed
    rounds: int  # alternating rounds of the single-process runs
    strategies: list[str]  # section 2: each run with 2 processes
    threads: int  # torch threads of every single-process run
    quick: bool
    data_text_mb: float = 0.0  # section 8: generated text prepared (MB)
    data_gb: float = 0.0  # section 8: the large generated prepared corpus (GB); 0 = no RSS jobs
    s3: str = ""  # section 7: an s3:// prefix saved to beside the disk; "" = a local moto server if installed

    @property
    def primary(self) -> str:
        """The clock the ratios use: process CPU time with one thread per process on CPU (on a shared
        CPU the wall clock also measures the neighbours), wall time otherwise."""
        return "cpu" if self.device == "cpu" and self.threads == 1 else "wall"

    @property
    def pair_cores(self) -> tuple[int, int] | None:
        """On CPU with one thread per run: the two cores a section-1 loop and a plain-loop run
        share, one each, at the same time (swapped every other round). Runs minutes apart on a
        shared machine differ by up to +-30% in CPU time per step (neighbours, frequency); two
        runs side by side see the same machine. None: one run at a time."""
        cores = sorted(os.sched_getaffinity(0))
        return (cores[0], cores[1]) if self.primary == "cpu" and len(cores) >= 2 else None

    @property
    def tokens_per_step(self) -> int:  # of a single-process run
        return self.micro_batch * self.seq_len

    def to_dict(self) -> dict:
        return asdict(self)
