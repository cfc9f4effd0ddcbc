"""Node resources the workers share: /dev/shm, the memlock limit InfiniBand needs, the stack size."""

from __future__ import annotations

import os
import resource

from train.config import RunConfig
from train.launcher.preflight.report import FAIL, OK, WARN, MiB, Check
from train.memory import human


def checks(cfg: RunConfig, nproc: int, device: str) -> list[Check]:
    return [_shm(cfg, nproc, device), _memlock(), _stack(cfg)]


def shm_needed(cfg: RunConfig, nproc: int, device: str) -> int:
    per = cfg.preflight.shm_mb_per_gpu if device == "cuda" else cfg.preflight.shm_mb_per_cpu_process
    return nproc * per * MiB


def _shm(cfg: RunConfig, nproc: int, device: str) -> Check:
    need = shm_needed(cfg, nproc, device)
    per = need // max(1, nproc) // MiB
    threshold = f">= {human(need)} free ({nproc} x {per} MiB)"
    fix = (f"give the container a larger /dev/shm: docker --shm-size or --ipc=host (compose: shm_size or "
           f"ipc: host); Kubernetes: a memory-backed emptyDir at /dev/shm with sizeLimit >= {human(need)}")
    try:
        st = os.statvfs("/dev/shm")
    except OSError as e:
        return Check("shm", f"/dev/shm missing ({e.strerror})", threshold, FAIL, fix, 0, need)
    free, size = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
    verdict = OK if free >= need else FAIL
    return Check("shm", f"/dev/shm {human(free)} free of {human(size)}", threshold, verdict,
                 fix if verdict == FAIL else "", free, need)


def ib_devices() -> list[str]:
    try:
        return sorted(os.listdir("/sys/class/infiniband"))
    except OSError:
        return []


def _limit(value: int) -> str:
    return "unlimited" if value == resource.RLIM_INFINITY else human(value)


def _memlock() -> Check:
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    ib = ib_devices()
    unlimited = soft == resource.RLIM_INFINITY
    measured = None if unlimited else soft
    # NCCL_NET=IB asks for InfiniBand or nothing: with a small memlock NCCL's memory registration
    # fails at the first collective, so fail here, with the limit named (the k8s rdma component).
    forced_ib = os.environ.get("NCCL_NET", "").strip().upper() == "IB"
    if not ib and not forced_ib:
        return Check("memlock", _limit(soft), "unlimited only with InfiniBand (none here)", OK, measured=measured)
    verdict = OK if unlimited else (FAIL if forced_ib else WARN)
    fix = "" if unlimited else ("NCCL's InfiniBand transport pins memory: docker --ulimit memlock=-1; Kubernetes: "
                                "the node's container runtime must give containers an unlimited memlock "
                                "(containerd: LimitMEMLOCK=infinity in its systemd unit; upstream sets none)")
    where = f"InfiniBand: {', '.join(ib)}" if ib else "NCCL_NET=IB"
    return Check("memlock", _limit(soft), f"unlimited ({where})", verdict, fix, measured)


def _stack(cfg: RunConfig) -> Check:
    soft, _ = resource.getrlimit(resource.RLIMIT_STACK)
    need = cfg.preflight.min_stack_mb * MiB
    ok = soft == resource.RLIM_INFINITY or soft >= need
    fix = "" if ok else "raise it: docker --ulimit stack=67108864 (compose: ulimits.stack), or `ulimit -s` before launch"
    return Check("stack", _limit(soft), f">= {human(need)}", OK if ok else WARN, fix,
                 None if soft == resource.RLIM_INFINITY else soft, need)

