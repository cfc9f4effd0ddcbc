"""The launcher keeps no CUDA context (issue 25, item 6).

The launcher becomes the node's supervisor for the whole run. A CUDA context in it holds ~0.5 GB
on every GPU it touched and, under the EXCLUSIVE_PROCESS compute mode, keeps the workers off
those GPUs. So its GPU questions (bf16 support, the preflight's matmul and NCCL checks) run in a
child process that exits (train/launcher/cuda_child.py).

On CPU a fake CUDA stands in (tests/helpers/gpu.py:fake_cuda): torch says one GPU is there, and
the first real use of it, the point where a context would be created, writes the process's pid
down. The launcher's own pid must never be written. (On a GPU: tests/test_gpu.py.)
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import REPO, args_for, cuda_pids, fake_cuda, job_env

from train.config import exitcodes


@pytest.mark.slow  # a launcher and two spawned children, each importing torch
def test_the_launchers_gpu_questions_run_in_children_that_exit(tmp_path):
    log = tmp_path / "cuda-contexts.txt"
    env = job_env(fake_cuda(tmp_path / "site", log))
    # bf16: the launcher's input check asks whether the GPU supports it; then the preflight
    # runs its GPU checks. Each would create a context; in the fake each fails, so the
    # preflight names the broken GPU and stops the launch before any worker starts.
    argv = [sys.executable, "-m", "train", *args_for(tmp_path / "out", DEVICE="cuda", NPROC=1, PRECISION="bf16")]
    launcher = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = launcher.communicate(timeout=300)
    touched = cuda_pids(log)
    assert launcher.pid not in touched, f"the launcher (pid {launcher.pid}) created a CUDA context:\n{out}"
    assert len(touched) == 2, f"expected the bf16 question and the preflight each in a child: {touched}\n{out}"
    assert launcher.returncode == exitcodes.PREFLIGHT, out
    (line,) = [x for x in out.splitlines() if x.startswith("preflight failed:")]
    assert "gpu checks: their process failed: RuntimeError: fake CUDA" in line, out
