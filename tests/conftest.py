"""Fixtures only; the helpers the tests share (start a training job, read its metrics, parse the
Dockerfile, render the manifests, ...) are in tests/helpers/, one module per subject."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import REPO


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO
