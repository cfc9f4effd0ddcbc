"""What the NVIDIA driver says, read from ``nvidia-smi`` (standard library only: `make venv` asks
it before any venv exists, through ``python -m train info torch-index``).

Two uses:
- ``torch_index``: which of PyTorch's CUDA builds the venv gets. PyPI's Linux torch targets one
  CUDA major (torch 2.13: CUDA 13, driver R580+); on an older driver ``torch.cuda.is_available()``
  is simply False, no error. So the driver's version picks the build.
- ``check_torch_sees_gpus``: at launch, refuse in one line when ``nvidia-smi`` lists GPUs that
  torch cannot use, instead of resolving DEVICE=auto to cpu and training on CPU in silence.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

from train.config import ConfigError

PYTORCH_INDEX = "https://download.pytorch.org/whl"
# (oldest driver major, build). cu128 is the image's build (docker/Dockerfile CUDA_TORCH_INDEX_URL),
# so a host whose driver runs it gets the same torch as the container. CUDA 12.8 needs R570;
# CUDA 12's minor-version compatibility runs the cu126 build on any R525+ driver (PyTorch ships
# compiled kernels for every supported GPU, so nothing needs the newer driver's PTX JIT).
CUDA_BUILDS = ((570, "cu128"), (525, "cu126"))
DEFAULT_BUILD = "cu128"  # nvidia-smi answers but prints no version we can read


@dataclass(frozen=True)
class Driver:
    version: str | None  # e.g. "550.54.15"; None when nvidia-smi does not say
    gpus: list[str]  # `nvidia-smi -L` lines, e.g. "GPU 0: NVIDIA H100 80GB HBM3 (UUID: ...)"

    @property
    def major(self) -> int | None:
        head = (self.version or "").split(".")[0]
        return int(head) if head.isdigit() else None


def _smi(*args: str) -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def driver() -> Driver | None:
    """The driver's version and the GPUs it lists, or None where nvidia-smi is absent or fails."""
    listing = _smi("-L")
    if listing is None:
        return None
    gpus = [ln.strip() for ln in listing.splitlines() if ln.strip().startswith("GPU ")]
    versions = (_smi("--query-gpu=driver_version", "--format=csv,noheader") or "").split()
    return Driver(versions[0] if versions and versions[0][:1].isdigit() else None, gpus)


def torch_index(drv: Driver | None = None) -> str:
    """The PyTorch wheel index for this host: the CPU build without a driver, else the newest CUDA
    build the driver runs."""
    drv = driver() if drv is None else drv
    if drv is None or not drv.gpus:
        return f"{PYTORCH_INDEX}/cpu"
    if drv.major is None:
        return f"{PYTORCH_INDEX}/{DEFAULT_BUILD}"
    for floor, build in CUDA_BUILDS:
        if drv.major >= floor:
            return f"{PYTORCH_INDEX}/{build}"
    raise ConfigError(f"NVIDIA driver {drv.version} is older than any CUDA build of torch supports (R{CUDA_BUILDS[-1][0]}+, "
                      f"R{CUDA_BUILDS[0][0]}+ for the image's {CUDA_BUILDS[0][1]}): upgrade the driver, or "
                      f"TORCH_INDEX={PYTORCH_INDEX}/cpu for a CPU-only venv")


def gpus_hidden_on_purpose(env=os.environ) -> bool:
    """CUDA_VISIBLE_DEVICES set to nothing (or -1): the user hid the GPUs; torch seeing none is right."""
    value = env.get("CUDA_VISIBLE_DEVICES")
    return value is not None and value.strip() in ("", "-1")


def check_torch_sees_gpus(requested_device: str, cuda_available: bool, torch_version: str,
                          torch_cuda: str | None) -> None:
    """DEVICE=auto/cuda on a host whose driver lists GPUs that this torch cannot use: one line."""
    if requested_device == "cpu" or cuda_available or gpus_hidden_on_purpose():
        return
    drv = driver()
    if drv is None or not drv.gpus:
        return
    build = f"built for CUDA {torch_cuda}" if torch_cuda else "a CPU-only build"
    raise ConfigError(f"nvidia-smi lists {len(drv.gpus)} GPU(s) (driver {drv.version or 'of unknown version'}) but torch "
                      f"{torch_version} ({build}) cannot use them; install the torch build this driver runs "
                      f"({torch_index(drv)}: rm -rf .venv && make venv), or set DEVICE=cpu to train on CPU")
