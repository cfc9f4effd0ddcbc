"""The supported torch range and the offline install (issue 25).

- The oldest supported torch (train/config/torch_support.py, `python -m train info torch-floor`)
  is refused below in one line, at `make venv TORCH=system` and at run start. That the stack
  works on it is `make test-torch-floor`'s job (CI runs it: .ci/run): the strategy-agreement and
  kill-resume tests on a venv with that torch, installed from a wheel directory with no index.
- `make venv WHEELS=dir` reads nothing but the directory `make wheels WHEELS=dir` filled.

A fake torch distribution earlier on the path stands in for an installed older torch: the
version is read from the metadata, without importing torch.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, args_for, job_env

from train.config import exitcodes
from train.config.torch_support import TORCH_FLOOR, minor


def fake_torch(tmp_path: Path, version: str) -> dict:
    site = tmp_path / f"site-{version}"
    dist = site / f"torch-{version}.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n")
    return {"PYTHONPATH": str(site)}


def info_system_torch(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train", "info", "system-torch"], cwd=REPO,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=60)


def test_the_floor_is_no_newer_than_the_pin_and_no_newer_than_the_lent_gpus_torch():
    from train.tools.info import pin

    assert minor(TORCH_FLOOR) <= minor(pin("torch"))
    assert minor(TORCH_FLOOR) <= (2, 11)  # the torch of the GPU machines this stack is checked on


@pytest.mark.parametrize("version, ok", [("2.10.2", False), (f"{TORCH_FLOOR}.0", True), ("2.13.1+cu128", True),
                                         ("2.14.0", False)])
def test_torch_system_accepts_the_floor_up_to_the_pinned_minor(version, ok, tmp_path):
    p = info_system_torch(fake_torch(tmp_path, version))
    if ok:
        assert p.returncode == 0 and p.stdout.strip() == version, p.stderr
    else:
        assert p.returncode == exitcodes.CONFIG and p.stdout == ""
        (line,) = p.stderr.splitlines()
        assert f"torch {version}" in line and f"supported: {TORCH_FLOOR} to 2.13.x" in line


@pytest.mark.slow  # a launcher process (imports only: refused before any worker)
def test_a_run_on_a_torch_older_than_the_floor_is_refused_in_one_line_touching_nothing(tmp_path):
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "train", *args_for(out)], cwd=REPO,
                       env=job_env(fake_torch(tmp_path, "2.10.0")), capture_output=True, text=True, timeout=120)
    assert p.returncode == exitcodes.CONFIG, p.stdout + p.stderr
    (line,) = [x for x in p.stderr.splitlines() if x.strip()]
    assert "torch 2.10.0 is older than the oldest supported, 2.11" in line
    assert not out.exists()


def make_dry(*args: str) -> list[str]:
    p = subprocess.run(["make", "-n", "-f", str(REPO / "Makefile"), *args], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout.splitlines()


def test_make_venv_from_a_wheel_directory_asks_no_index(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    lines = make_dry("venv", f"VENV={tmp_path / 'venv'}", f"PYTHON={sys.executable}", f"WHEELS={wheels}")
    installs = [ln for ln in lines if "pip install" in ln]
    assert len(installs) == 4  # pip itself, torch, the checkout, deepspeed
    assert all(f"--no-index --find-links {wheels}" in ln and "--extra-index-url" not in ln for ln in installs)
    assert not [ln for ln in lines if "torch-index" in ln]  # no driver-dependent index either


def test_make_wheels_fills_one_directory_with_pips_builds_and_the_constraints(tmp_path):
    lines = make_dry("wheels", f"WHEELS={tmp_path}", "TORCH_VERSION=2.11.0", "TORCH_INDEX=")
    (constraints,) = [ln for ln in lines if ln.endswith(f"> {tmp_path}/constraints.txt")]
    assert 's/^torch==.*/torch==2.11.0/' in constraints
    fills = [ln for ln in lines if " pip download " in ln or " pip wheel " in ln]
    assert len(fills) == 3 and all(f"-d {tmp_path}" in ln or f"-w {tmp_path}" in ln for ln in fills)
    assert any("--no-build-isolation" in ln and ln.endswith(" deepspeed") for ln in fills)


@pytest.mark.parametrize("args, says", [
    (("wheels",), "make wheels: set WHEELS=dir"),
    (("venv", "WHEELS=/nonexistent/wheels"), "WHEELS=/nonexistent/wheels is not a directory"),
])
def test_a_missing_wheel_directory_is_refused_before_anything_is_made(args, says, tmp_path):
    p = subprocess.run(["make", "-f", str(REPO / "Makefile"), *args, f"VENV={tmp_path / 'venv'}",
                        f"PYTHON={sys.executable}"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and says in p.stderr, p.stderr
    assert not (tmp_path / "venv").exists()
