"""How many CPUs this process may really use: its affinity mask and its cgroup CPU quota.

``os.cpu_count()`` counts the host's cores. A container or Kubernetes pod is limited by a CFS
quota (a CPU limit: cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``)
and/or a cpuset (which shows up as the affinity mask). Sizing threads from the host count
gives, e.g., 8 ranks x 24 threads on a 48-CPU limit: throttled, worst in the CPU optimizer
step of the offload strategies.

Written by hand (about 50 lines) because no kept library answers it: ``os.process_cpu_count``
(3.13) sees only affinity, psutil neither, and joblib/loky read only the cgroup mounted at the
root, which is right inside a container but not for a process in a limited cgroup on a host.
Here the process's own cgroup is read (``/proc/self/cgroup`` + ``/proc/self/mountinfo``) and
every ancestor up to the mount, since the tightest quota on the path is the one that binds.
"""

from __future__ import annotations

import math
import os
from pathlib import Path


def _mounts(mountinfo: Path) -> list[tuple[str, str, str, set[str]]]:
    """(fstype, mount root, mount point, super options) of every cgroup mount."""
    out = []
    for line in mountinfo.read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) >= 5 and len(tail) >= 3 and tail[0] in ("cgroup", "cgroup2"):
            out.append((tail[0], fields[3], fields[4], set(tail[2].split(","))))
    return out


def _quota_v2(d: Path) -> float | None:
    quota, _, period = (d / "cpu.max").read_text().split()[:2] + [""]
    return None if quota == "max" else int(quota) / int(period or 100000)


def _quota_v1(d: Path) -> float | None:
    quota = int((d / "cpu.cfs_quota_us").read_text())
    return None if quota <= 0 else quota / int((d / "cpu.cfs_period_us").read_text())


def cgroup_cpu_limit(proc_cgroup: str | Path = "/proc/self/cgroup",
                     mountinfo: str | Path = "/proc/self/mountinfo") -> float | None:
    """The CPU quota (in CPUs, may be fractional) of this process's cgroup, or None if unlimited.

    Reads cgroup v2 and v1 (whichever has the cpu controller); the smallest quota on the path
    from the process's cgroup up to the hierarchy's mount wins.
    """
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
        mounts = _mounts(Path(mountinfo))
    except OSError:
        return None
    limits = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2 unified hierarchy
            cands, read, name = [m for m in mounts if m[0] == "cgroup2"], _quota_v2, "cpu.max"
        elif "cpu" in controllers.split(","):
            cands, read, name = [m for m in mounts if m[0] == "cgroup" and "cpu" in m[3]], _quota_v1, "cpu.cfs_quota_us"
        else:
            continue
        for _, root, point, _ in cands:
            rel = os.path.relpath(path, root) if path.startswith(root) else "."
            top = Path(point)
            d = (top / rel).resolve() if not rel.startswith("..") else top
            if not d.is_dir():  # our cgroup is not visible under this mount: read what is
                d = top
            while True:
                try:
                    if (d / name).exists():
                        q = read(d)
                        if q is not None:
                            limits.append(q)
                except (OSError, ValueError):
                    pass
                if d == top or top not in d.parents:
                    break
                d = d.parent
    return min(limits) if limits else None


def available_cpus() -> int:
    """CPUs this process can use: the affinity mask, capped by the cgroup quota (rounded down,
    at least 1: a 1.5-CPU limit runs one thread without throttling, two with)."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no affinity API
        count = os.cpu_count() or 1
    quota = cgroup_cpu_limit()
    if quota is not None:
        count = min(count, max(1, math.floor(quota + 1e-9)))
    return max(1, count)
