"""Threads per rank come from the CPUs the job may use, not the host's core count.

Checked under a real CFS quota (a cgroup v1 `cpu` cgroup made for the test, as a container's
CPU limit is) and a real affinity mask (what a cpuset or `taskset` gives). cgroup v2's
`cpu.max` cannot be made on this machine (v2 is mounted without controllers), so its parsing is
checked on files laid out as a v2 host shows them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from train.config.strategies import STRATEGIES
from train.launcher.cpus import available_cpus, cgroup_cpu_limit
from train.launcher.worker_env import worker_env

REPO = Path(__file__).resolve().parent.parent
CPU_V1 = Path("/sys/fs/cgroup/cpu")

# Bytes glibc keeps free in its heap after a 20 MiB tensor is freed, printed by a fresh process.
HEAP_KEPT_AFTER_FREE = (
    "import ctypes, torch\n"
    "class MallInfo(ctypes.Structure):\n"
    "    _fields_ = [(n, ctypes.c_int) for n in ('arena', 'ordblks', 'smblks', 'hblks', 'hblkhd',\n"
    "                                           'usmblks', 'fsmblks', 'uordblks', 'fordblks', 'keepcost')]\n"
    "libc = ctypes.CDLL(None)\n"
    "libc.mallinfo.restype = MallInfo\n"
    "x = torch.ones(5 * 2**20)\n"
    "del x\n"
    "print(libc.mallinfo().fordblks)\n"
)

# What the launcher passes to accelerate for one process per node, printed by a fresh process.
LAUNCH_THREADS = (
    "from train.config import load_config\n"
    "from train.launcher.launch import accelerate_args\n"
    "from train.launcher.nodes import resolve_nodes\n"
    "cfg = load_config(['DEVICE=cpu', 'NPROC=1'])\n"
    "a = accelerate_args(cfg, resolve_nodes(cfg.launch, {}), 1, 'cpu')\n"
    "print(a[a.index('--num_cpu_threads_per_process') + 1])\n"
)


def run_python(code: str, *, cgroup: Path | None = None, cpus: set[int] | None = None,
               env: dict | None = None) -> str:
    """Run `code` in a new process placed in `cgroup` and/or pinned to `cpus` before Python starts,
    with `env` as its environment (this one's by default)."""
    def place():
        if cgroup is not None:
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))
        if cpus is not None:
            os.sched_setaffinity(0, cpus)

    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                       preexec_fn=place, env={**(os.environ if env is None else env), "PYTHONPATH": str(REPO)})
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout.strip()


@pytest.fixture
def cpu_quota():
    """A cgroup v1 `cpu` cgroup with a CFS quota; yields a setter `(cpus) -> Path`."""
    if os.geteuid() != 0 or not (CPU_V1 / "cpu.cfs_quota_us").exists():
        pytest.skip("needs root and the cgroup v1 cpu controller (CI has both)")
    path = CPU_V1 / f"train-test-{uuid.uuid4().hex[:8]}"
    path.mkdir()

    def limit(cpus: float) -> Path:
        (path / "cpu.cfs_period_us").write_text("100000")
        (path / "cpu.cfs_quota_us").write_text(str(int(cpus * 100000)))
        return path

    try:
        yield limit
    finally:
        path.rmdir()  # the test's processes have exited, so the cgroup is empty


@pytest.fixture
def two_cpus():
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs at least 2 CPUs to show a limit below them")


def test_a_cpu_quota_limits_the_threads_the_launcher_gives_each_rank(cpu_quota, two_cpus):
    cg = cpu_quota(1)
    assert run_python("from train.launcher.cpus import cgroup_cpu_limit as f; print(f())", cgroup=cg) == "1.0"
    assert run_python(LAUNCH_THREADS, cgroup=cg) == "1"
    assert int(run_python(LAUNCH_THREADS)) == available_cpus() >= 2  # outside the cgroup: every CPU


def test_a_fractional_quota_rounds_down_so_the_rank_is_not_throttled(cpu_quota, two_cpus):
    cg = cpu_quota(1.5)
    assert run_python("from train.launcher.cpus import available_cpus as f; print(f())", cgroup=cg) == "1"


def test_the_affinity_mask_limits_the_threads_the_launcher_gives_each_rank(two_cpus):
    assert run_python(LAUNCH_THREADS, cpus={0}) == "1"


def _v2_host(tmp_path: Path, quotas: dict[str, str]) -> tuple[Path, Path]:
    """/proc/self/cgroup and mountinfo of a process in /kubepods/pod1/ctr on a cgroup v2 host."""
    root = tmp_path / "sys-fs-cgroup"
    for rel, cpu_max in quotas.items():
        (root / rel).mkdir(parents=True, exist_ok=True)
        (root / rel / "cpu.max").write_text(cpu_max + "\n")
    proc = tmp_path / "cgroup"
    proc.write_text("0::/kubepods/pod1/ctr\n")
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(f"30 23 0:26 / {root} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n")
    return proc, mountinfo


def test_cgroup_v2_cpu_max_is_read_and_the_tightest_ancestor_wins(tmp_path):
    proc, mi = _v2_host(tmp_path, {"kubepods": "max 100000", "kubepods/pod1": "400000 100000",
                                   "kubepods/pod1/ctr": "max 100000"})
    assert cgroup_cpu_limit(proc, mi) == 4.0
    proc, mi = _v2_host(tmp_path / "b", {"kubepods/pod1/ctr": "max 100000"})
    assert cgroup_cpu_limit(proc, mi) is None


def test_inside_a_container_the_namespaced_root_is_read(tmp_path):
    # With a cgroup namespace the process sees itself at "/" and the mount root is its own cgroup.
    root = tmp_path / "fs"
    root.mkdir()
    (root / "cpu.max").write_text("250000 100000\n")
    (tmp_path / "cgroup").write_text("0::/\n")
    (tmp_path / "mountinfo").write_text(f"30 23 0:26 / {root} ro - cgroup2 cgroup rw\n")
    assert cgroup_cpu_limit(tmp_path / "cgroup", tmp_path / "mountinfo") == 2.5


def test_cpu_workers_keep_a_freed_step_in_the_heap(monkeypatch):
    """glibc's default hands a freed block of this size back to the kernel, so the next step takes
    it again in page faults; CPU workers keep it. A GLIBC_TUNABLES of the user's own wins, and
    GPU workers (whose tensors are not in malloc's heap) get nothing."""
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    plain = dict(os.environ)
    workers = {**plain, **worker_env(STRATEGIES["ddp"], "cpu")}
    assert int(run_python(HEAP_KEPT_AFTER_FREE, env=workers)) >= 20 * 2**20
    assert int(run_python(HEAP_KEPT_AFTER_FREE, env=plain)) < 20 * 2**20
    assert "GLIBC_TUNABLES" not in worker_env(STRATEGIES["ddp"], "cuda")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.check=0")
    assert "GLIBC_TUNABLES" not in worker_env(STRATEGIES["fsdp"], "cpu")
