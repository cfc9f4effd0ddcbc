"""``python -m train hang-report OUTPUT_DIR``: the table and verdict of the newest hang dump."""

from __future__ import annotations

from train.config import ConfigError
from train.launcher.hang_verdict import report


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise ConfigError("usage: python -m train hang-report OUTPUT_DIR")
    print(report(argv[0]))
