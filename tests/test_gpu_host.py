"""A GPU host as it really is, shown on CPU (issue 25): what a CPU can show of the GPU path.

- The venv's torch build follows the NVIDIA driver (a fake `nvidia-smi` on PATH), and a launch
  on a host whose GPUs torch cannot use is refused in one line instead of training on CPU.
- DEVICE=cpu hides every GPU from the workers.
(The cases only a GPU can show are in tests/test_gpu.py.)
"""

from __future__ import annotations

import os
import subprocess
import sys

import psutil
import pytest
from helpers import (
    REPO,
    assert_refused,
    fake_nvidia_smi,
    job_env,
    kill_tree,
    start,
    worker_pids,
)


# -- 1. the torch build the driver runs ----------------------------------------------------------
def torch_install_line(path: str, tmp_path) -> subprocess.CompletedProcess:
    """What `make venv` would run (make -n) on a host whose PATH is ``path``."""
    return subprocess.run(["make", "-n", "-f", str(REPO / "Makefile"), "venv", f"VENV={tmp_path / 'venv'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=60, env={**os.environ, "PATH": path})


@pytest.mark.parametrize("driver, build", [("580.65.06", "cu128"), ("570.124.06", "cu128"),
                                           ("550.54.15", "cu126"), ("525.60.13", "cu126"), (None, "cu128")])
def test_make_venv_installs_the_torch_build_the_driver_runs(tmp_path, driver, build):
    """PyPI's torch needs the newest driver; the venv gets the build this driver runs instead
    (cu128, the image's build, from R570; cu126 from R525; cu128 when nvidia-smi prints no version)."""
    out = torch_install_line(fake_nvidia_smi(tmp_path / "bin", driver), tmp_path)
    line = next(ln for ln in out.stdout.splitlines() if "pip install" in ln and ln.endswith(" torch"))
    assert f"--extra-index-url https://download.pytorch.org/whl/{build} " in line, line


def test_a_driver_too_old_for_any_cuda_torch_is_named_in_one_line(tmp_path):
    env = {**os.environ, "PATH": fake_nvidia_smi(tmp_path / "bin", "470.82.01")}
    p = subprocess.run([sys.executable, "-m", "train", "info", "torch-index"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.splitlines() == [p.stderr.strip()] and "NVIDIA driver 470.82.01" in p.stderr
    assert "R525+" in p.stderr and "TORCH_INDEX=" in p.stderr


def launch(tmp_path, path: str, **settings) -> subprocess.CompletedProcess:
    args = [f"{k}={v}" for k, v in {"OUTPUT_DIR": tmp_path / "out", "MODEL": "llama-debug", "NPROC": "1",
                                    "PREFLIGHT": "only", **settings}.items()]
    return subprocess.run([sys.executable, "-m", "train", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=180, env=job_env({"PATH": path}))


def test_gpus_torch_cannot_use_are_refused_instead_of_training_on_cpu(tmp_path):
    """nvidia-smi lists 2 GPUs, this torch sees none (a CPU build here, as a CUDA 13 build on a
    550 driver would): DEVICE=auto would silently become cpu. One line, exit 2, nothing started."""
    path = fake_nvidia_smi(tmp_path / "bin", "550.54.15")
    line = assert_refused(launch(tmp_path, path, DEVICE="auto"), "nvidia-smi lists 2 GPU(s) (driver 550.54.15)",
                          "cannot use them", "whl/cu126", "DEVICE=cpu")
    assert "torch" in line
    assert not (tmp_path / "out").exists()


def test_device_cpu_on_a_gpu_host_is_a_choice_not_refused(tmp_path):
    p = launch(tmp_path, fake_nvidia_smi(tmp_path / "bin", "550.54.15"), DEVICE="cpu")
    assert p.returncode == 0, p.stdout + p.stderr


# -- 2. DEVICE=cpu hides the GPUs ----------------------------------------------------------------
@pytest.mark.slow
def test_device_cpu_hides_every_gpu_from_the_workers(tmp_path):
    """On a GPU workstation (CUDA_VISIBLE_DEVICES=0,1 set) an fsdp job with DEVICE=cpu: accelerate
    would pick CUDA under the forced gloo backend for any GPU the workers can see."""
    proc = start(tmp_path / "out", env={"CUDA_VISIBLE_DEVICES": "0,1"}, STRATEGY="fsdp", MAX_STEPS="2")
    try:  # the workers' environment is what they start with: read it, no need to train
        pids = worker_pids(tmp_path / "out", 2, timeout=180)
        seen = {rank: psutil.Process(pid).environ().get("CUDA_VISIBLE_DEVICES") for rank, pid in pids.items()}
        assert seen == {0: "", 1: ""}
    finally:
        kill_tree(proc)
        proc.wait(timeout=60)
