"""The pinned versions and the tools the dev extra installs."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest


VENV_BIN = Path(sys.executable).parent


# -- versions and tools -----------------------------------------------------------------------
def constraint(pkg: str) -> str:
    """The pinned version, as the package reads it (`python -m train info pin PKG`)."""
    from train.config import ConfigError
    from train.tools.info import pin

    try:
        return pin(pkg)
    except ConfigError as e:
        raise AssertionError(str(e)) from None





def tool(name: str, hint: str) -> str:
    found = VENV_BIN / name if (VENV_BIN / name).exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} not found: {hint}")
    return str(found)


