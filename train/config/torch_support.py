"""Which torch the stack supports: from TORCH_FLOOR (the oldest, proven by `make
test-torch-floor`: the strategy-agreement and kill-resume tests on that version) to the minor
version pinned in constraints.txt (the one every other test runs on).

Why 2.11: the libraries allow older (transformers 5.24 needs torch >= 2.6, accelerate 1.15 and
DeepSpeed 0.19.8 >= 2.0, peft >= 1.13), but what is tested is what is supported, and 2.11 is the
torch of the GPU machines and NGC-style images this stack meets (older ones are refused in one
line rather than failing somewhere inside FSDP2 or the distributed checkpoint).

The version is read from the installed distribution's metadata, not by importing torch: an old
torch can fail to import against today's numpy before it could be refused.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as installed

from train.config.schema import ConfigError

TORCH_FLOOR = "2.11"


def minor(version: str) -> tuple[int, int]:
    """(2, 11) for "2.11.0", "2.11.0+cu128" or an NGC "2.11.0a0+abc"."""
    major, rest = version.split("+")[0].split(".")[:2]
    return int(major), int("".join(c for c in rest if c.isdigit()) or 0)


def installed_torch() -> str | None:
    try:
        return installed("torch")
    except PackageNotFoundError:
        return None


def check_torch_floor(where: str) -> None:
    """At run start: refuse a torch older than TORCH_FLOOR in one line (exit 2)."""
    found = installed_torch()
    if found is not None and minor(found) < minor(TORCH_FLOOR):
        raise ConfigError(f"{where}: torch {found} is older than the oldest supported, {TORCH_FLOOR} "
                          f"(train/config/torch_support.py); install torch >= {TORCH_FLOOR} (make venv pins one)")
