"""The pinned versions and the tools the dev extra installs."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest

from helpers.jobs import REPO

VENV_BIN = Path(sys.executable).parent


# -- versions and tools -----------------------------------------------------------------------
def constraint(pkg: str) -> str:
    m = re.search(rf"^{re.escape(pkg)}==(\S+)$", (REPO / "constraints.txt").read_text(), re.M)
    assert m, f"{pkg} is not pinned in constraints.txt"
    return m.group(1)





def tool(name: str, hint: str) -> str:
    found = VENV_BIN / name if (VENV_BIN / name).exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} not found: {hint}")
    return str(found)


