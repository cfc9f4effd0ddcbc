"""Preflight: find the bad node, link or volume before training starts, and name it.

``python -m train launch`` runs this on every node just before it spawns the workers
(``launch.preflight``: ``auto`` = run, ``off`` = skip, ``only`` = run, print the table, exit 0);
``python -m train doctor`` / ``make doctor`` run it alone. It reads the launcher's node contract
(train/launcher/nodes.py), so make, compose, the Indexed Job and PyTorchJob all go through this one path.

On each node, before any process group:
  devices      visible GPUs == NPROC (on CPU: NPROC <= cores, else a warning)
  gpuN matmul  (CUDA) every device multiplies bf16 matrices correctly (against a CPU fp32 result)
               at >= preflight.gpu_min_peak_fraction of its datasheet peak (train/flops.py)
  shm          free /dev/shm >= NPROC x preflight.shm_mb_per_gpu (or shm_mb_per_cpu_process)
  memlock      unlimited when InfiniBand devices exist (else NCCL silently uses sockets); warning,
               a failure when NCCL_NET=IB demands InfiniBand
  stack        >= preflight.min_stack_mb; warning
  output-dir   OUTPUT_DIR can be created and written by this uid/gid
  disk         free space at OUTPUT_DIR >= preflight.disk_checkpoints x one checkpoint of this
               model (train/tools/plan.py's bytes: parameters + Adam moments + DeepSpeed's fp32 master)
  hf-cache     the Hugging Face cache is writable (a failure only when something is downloaded)

Across nodes (NNODES > 1), through one short process group of one process per node on the
job's backend (gloo on CPU, NCCL on GPU), torn down before the workers start:
  shared-storage  every node writes a nonce file into OUTPUT_DIR and reads everyone's
  all-reduce      algorithm and bus bandwidth at a few sizes (nccl-tests' definitions:
                  algbw = bytes / time, busbw = algbw x 2(n-1)/n), within bandwidth_budget_s
  link            pairwise exchanges (round k: node i sends to i+k, receives from i-k); a node
                  whose best pair, or a link, is below link_min_fraction of the median fails
  nccl-transport  (GPU) the network NCCL chose, from its INFO log; a warning when InfiniBand
                  devices exist but NCCL used sockets
Local results travel through the process group's TCP store, so a node that failed locally is
still named in node 0's table and every node exits with the same verdict.

Port: node 0 listens on MASTER_PORT + 1 (``preflight.port`` picks another) for the seconds the
preflight takes; the group's gloo/NCCL connections then use ephemeral ports, as training does.
Not MASTER_PORT itself: a node that finished first would start torchrun, whose store client
could reach node 0's preflight store in the moment before it closes and fail. Network policies
must allow this port between the job's pods as they allow MASTER_PORT.

Output: a table on node 0 and OUTPUT_DIR/preflight.json (every check: node, host, measured
value, threshold, verdict, fix). A failed check exits with exitcodes.PREFLIGHT and one line per
failure, "node N (host H): CHECK: measured vs threshold; fix: ..."; a node that cannot reach
node 0's preflight port exits with exitcodes.MASTER_UNREACHABLE. Warnings do not stop the run.
"""

from __future__ import annotations

import errno
import json
import os
import re
import resource
import shutil
import socket
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta
from pathlib import Path

from train.storage import location, work_dir
from train.config import ConfigError, RunConfig, exitcodes, selected_strategy
from train.memory import human

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"
JSON_NAME = "preflight.json"
MiB = 2**20
ALLREDUCE_SIZES = tuple(256 * 2**10 * 8**k for k in range(4))  # 256 KiB, 2 MiB, 16 MiB, 128 MiB
PAIR_START, PAIR_MAX = 64 * 2**10, 64 * MiB
PAIR_TARGET_S = 0.02  # grow the pairwise message until the slowest exchange takes this long
MAX_ROUNDS = 8  # pairwise rounds (shifts) at most: each node meets its 8 nearest ranks on either side
GPU_MATMUL_N, GPU_CHECK_N, GPU_MAX_REL_ERROR = 8192, 1024, 1e-2


@dataclass
class Check:
    check: str
    value: str  # what was measured, for people
    threshold: str
    verdict: str  # ok | warn | fail | skip
    fix: str = ""
    measured: float | None = None  # the same as numbers, for the JSON
    limit: float | None = None
    node: int | None = None  # None: the whole job (all-reduce)
    host: str = "-"

    def where(self) -> str:
        return "all nodes" if self.node is None else f"node {self.node} (host {self.host})"

    def line(self) -> str:
        fix = f"; fix: {self.fix}" if self.fix else ""
        return f"{self.where()}: {self.check}: {self.value} vs {self.threshold}{fix}"


@dataclass
class Report:
    nnodes: int
    nproc_per_node: int
    device: str
    backend: str
    port: int | None
    checks: list[Check] = field(default_factory=list)
    allreduce: list[dict] = field(default_factory=list)
    pairs: list[dict] = field(default_factory=list)
    elapsed_s: float = 0.0
    # Seconds per phase on this node. "join" is waiting for the other nodes to arrive, which the
    # rendezvous would otherwise spend; the rest is what the preflight adds to start-up.
    phases: dict[str, float] = field(default_factory=dict)

    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.verdict == FAIL]

    def warnings(self) -> list[Check]:
        return [c for c in self.checks if c.verdict == WARN]

    @property
    def passed(self) -> bool:
        return not self.failures()

    def summary(self) -> str:
        n_warn = len(self.warnings())
        verdict = "passed" if self.passed else f"FAILED ({len(self.failures())} check(s))"
        port = f" on port {self.port}" if self.port else ""
        added = self.elapsed_s - self.phases.get("join", 0.0)
        waited = f" + {self.phases['join']:.1f} s waiting for the other nodes" if "join" in self.phases else ""
        return (f"[preflight] {self.nnodes} node(s) x {self.nproc_per_node} process(es), {self.device}, "
                f"{self.backend}{port}: {verdict} in {added:.1f} s{waited}"
                + (f", {n_warn} warning(s)" if n_warn else ""))

    def table(self) -> str:
        rows = [("node", "host", "check", "measured", "threshold", "verdict")]
        rows += [("all" if c.node is None else str(c.node), c.host, c.check, c.value, c.threshold, c.verdict)
                 for c in self.checks]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
        return "\n".join([self.summary(), *lines])

    def to_json(self) -> dict:
        return {"version": 1, "passed": self.passed, "nnodes": self.nnodes, "nproc_per_node": self.nproc_per_node,
                "device": self.device, "backend": self.backend, "port": self.port,
                "elapsed_s": round(self.elapsed_s, 3), "phases_s": {k: round(v, 3) for k, v in self.phases.items()},
                "failures": [c.line() for c in self.failures()],
                "checks": [asdict(c) for c in self.checks], "allreduce": self.allreduce, "pairs": self.pairs}


# -- entry points ------------------------------------------------------------------------------
def run_preflight(cfg: RunConfig, spec, nproc: int, device: str) -> Report | None:
    """What the launcher calls on every node before it spawns the workers (see module doc).

    ``launch.preflight=off``: returns None at once. A failed check exits with PREFLIGHT;
    ``only`` exits 0 after the table; otherwise returns the report and training starts.
    """
    mode = cfg.launch.preflight
    if mode == "off":
        print("[preflight] off (launch.preflight=off)", flush=True)
        return None
    report = check_job(cfg, spec, nproc, device)
    conclude(report, cfg, spec)
    if mode == "only":
        raise exitcodes.Exit("[preflight] launch.preflight=only: not starting training", exitcodes.OK)
    return report


def doctor(cfg: RunConfig, spec, nproc: int, device: str) -> None:
    """``python -m train doctor``: the checks alone, whatever launch.preflight says."""
    conclude(check_job(cfg, spec, nproc, device), cfg, spec)


def conclude(report: Report, cfg: RunConfig, spec) -> None:
    """Table and JSON on node 0, the failures on every node; exit PREFLIGHT if any check failed."""
    if spec.node_rank == 0:
        print(report.table(), flush=True)
        path = work_dir(cfg) / JSON_NAME
        try:
            path.write_text(json.dumps(report.to_json(), indent=1) + "\n")
        except OSError as e:
            print(f"[preflight] could not write {path}: {e.strerror or e}", file=sys.stderr, flush=True)
    else:
        print(report.summary() + " (the table is on node 0)", flush=True)
    for c in report.warnings():
        print(f"[preflight] warning: {c.line()}", file=sys.stderr, flush=True)
    if not report.passed:
        for c in report.failures():
            print(f"preflight failed: {c.line()}", file=sys.stderr, flush=True)
        raise exitcodes.Exit(code=exitcodes.PREFLIGHT)  # the lines above said why


def check_job(cfg: RunConfig, spec, nproc: int, device: str) -> Report:
    """Every check on this node, then (NNODES > 1) the cross-node ones; never exits by itself,
    except with MASTER_UNREACHABLE when node 0's preflight port never answers."""
    start = time.monotonic()
    host = socket.gethostname()
    backend = "nccl" if device == "cuda" else "gloo"
    port = preflight_port(cfg, spec) if spec.nnodes > 1 else None
    report = Report(spec.nnodes, nproc, device, backend, port)
    local = node_checks(cfg, nproc, device, spec.node_rank, host)
    report.phases["local"] = time.monotonic() - start
    if spec.nnodes == 1:
        report.checks = local
    else:
        _cross_node(cfg, spec, device, local, report)
    report.elapsed_s = time.monotonic() - start
    return report


def preflight_port(cfg: RunConfig, spec) -> int:
    if cfg.preflight.port:
        return cfg.preflight.port
    return spec.master_port + 1 if spec.master_port < 65535 else spec.master_port - 1


# -- checks on one node ------------------------------------------------------------------------
def node_checks(cfg: RunConfig, nproc: int, device: str, node: int, host: str) -> list[Check]:
    checks = [_devices(nproc, device)]
    if device == "cuda":
        checks += _gpu_matmul(cfg, nproc)
    checks += [_shm(cfg, nproc, device), _memlock(), _stack(cfg)]
    write = _output_dir_writable(cfg)
    checks += [write, _disk(cfg, write.verdict == OK), _hf_cache(cfg)]
    return [replace(c, node=node, host=host) for c in checks]


def _devices(nproc: int, device: str) -> Check:
    if device == "cuda":
        import torch

        n = torch.cuda.device_count()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        seen = f"{n} GPU(s) visible" + (f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else "")
        if n < nproc:
            return Check("devices", seen, f"NPROC={nproc}", FAIL,
                         f"give this node {nproc} GPUs (Kubernetes: nvidia.com/gpu: {nproc}; docker: --gpus all) "
                         f"or set NPROC={n}", n, nproc)
        if n > nproc:
            return Check("devices", seen, f"NPROC={nproc}", WARN, f"{n - nproc} GPU(s) stay idle; NPROC=0 uses all",
                         n, nproc)
        return Check("devices", seen, f"NPROC={nproc}", OK, measured=n, limit=nproc)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    verdict = OK if nproc <= cores else WARN
    fix = "" if verdict == OK else f"{nproc} processes share {cores} cores; set NPROC <= {cores}"
    return Check("devices", f"cpu, {cores} core(s)", f"NPROC={nproc} <= cores", verdict, fix, cores, nproc)


def _gpu_matmul(cfg: RunConfig, nproc: int) -> list[Check]:
    """Each GPU this node will use: a bf16 matmul checked against the CPU, and its speed.

    Correctness on a small product (the CPU reference must stay cheap); speed on a large one,
    timed with CUDA events after a warm-up. A GPU with ECC trouble or throttled clocks shows here.
    """
    import torch

    from train.flops import peak_flops

    frac = cfg.preflight.gpu_min_peak_fraction
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    prec = "bf16" if dtype is torch.bfloat16 else "fp16"
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(GPU_CHECK_N, GPU_CHECK_N, generator=gen).to(dtype)
    b = torch.randn(GPU_CHECK_N, GPU_CHECK_N, generator=gen).to(dtype)
    ref = a.float() @ b.float()
    checks = []
    for i in range(min(nproc, torch.cuda.device_count())):
        dev = torch.device("cuda", i)
        name = torch.cuda.get_device_name(i)
        out = (a.to(dev) @ b.to(dev)).float().cpu()
        err = ((out - ref).norm() / ref.norm()).item()
        n = GPU_MATMUL_N
        x = torch.randn(n, n, device=dev, dtype=dtype)
        y = torch.randn(n, n, device=dev, dtype=dtype)
        for _ in range(3):
            x @ y
        iters = 20
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.device(dev):
            t0.record()
            for _ in range(iters):
                x @ y
            t1.record()
            t1.synchronize()
        flops = 2 * n**3 * iters / (t0.elapsed_time(t1) / 1e3)
        del x, y
        torch.cuda.empty_cache()
        peak = peak_flops(name, prec)
        value = f"{flops / 1e12:.0f} TFLOP/s {prec}, error {err:.1e} ({name})"
        if peak is None:
            threshold = f"error <= {GPU_MAX_REL_ERROR:g} (peak of this GPU unknown to train/flops.py)"
        else:
            threshold = f">= {frac * peak / 1e12:.0f} TFLOP/s ({frac:.0%} of {peak / 1e12:.0f}), error <= {GPU_MAX_REL_ERROR:g}"
        if not err <= GPU_MAX_REL_ERROR:
            verdict, fix = FAIL, ("this GPU computes wrong results: drain the node and check "
                                  "`nvidia-smi -q -d ECC,ROW_REMAPPER` and the kernel log for Xid errors")
        elif peak is not None and flops < frac * peak:
            verdict, fix = FAIL, ("this GPU runs far below its peak: check clocks and throttling "
                                  "(`nvidia-smi -q -d PERFORMANCE,CLOCK,POWER`), other processes on it, the power cap")
        else:
            verdict, fix = OK, ""
        checks.append(Check(f"gpu{i} matmul", value, threshold, verdict, fix, flops,
                            frac * peak if peak else None))
    return checks


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


def _try_write(directory: Path) -> str | None:
    """None if ``directory`` can be created and a file written (and synced) in it; else why not."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".preflight-write-") as f:
            f.write(b"preflight")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return f"{errno.errorcode.get(e.errno, type(e).__name__)}: {e.strerror or e}"
    return None


def _permission_fix(what: str) -> str:
    # The manifests already set fsGroup; what defeats it is the volume (docs/kubernetes.md, "Storage").
    return (f"{what} must be writable by uid {os.getuid()} gid {os.getgid()} on every node: Kubernetes: the "
            "pod's fsGroup is set, so the volume refused it: an NFS/Filestore export with root_squash (the "
            "kubelet's chown fails silently: export with no_root_squash or chown the share once to "
            f"{os.getuid()}:{os.getgid()}), an EFS access point with another uid/gid (the class's uid/gid "
            "parameters), Azure Files mountOptions with another uid; docker: chown the host directory to the "
            "container's UID:GID")


def _output_dir_writable(cfg: RunConfig) -> Check:
    path = work_dir(cfg)  # OUTPUT_DIR, or the scratch a URL's checkpoints are staged in
    err = _try_write(path)
    if err is None:
        return Check("output-dir", f"{path} writable", "writable", OK)
    fix = ("free space on that volume" if err.startswith("ENOSPC") else _permission_fix("OUTPUT_DIR"))
    return Check("output-dir", f"{path}: {err}", f"writable by uid {os.getuid()} gid {os.getgid()}", FAIL, fix)


def checkpoint_bytes(cfg: RunConfig) -> int:
    """Bytes of one checkpoint of this run, all ranks together: the planner's parameters, Adam
    moments and (DeepSpeed) fp32 master copy at world size 1 (the shards sum to the whole)."""
    from train.config.strategies import OPTIM, PARAMS
    from train.memory import held_bytes, model_shape
    from train.worker.model import load_model_config

    shape = model_shape(load_model_config(cfg), cfg.model.name, cfg.model.trust_remote_code)
    held = held_bytes(selected_strategy(cfg.launch) or "ddp", shape.params, 1, cfg.train.precision)
    return held[PARAMS] + held[OPTIM] + held["master"]


def _existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _disk(cfg: RunConfig, writable: bool) -> Check:
    n = cfg.preflight.disk_checkpoints
    try:
        one = checkpoint_bytes(cfg)
    except (ConfigError, OSError, ValueError) as e:
        return Check("disk", "checkpoint size unknown", f"{n} checkpoints", SKIP, f"the planner could not size the model: {e}")
    need = n * one
    free = shutil.disk_usage(_existing(work_dir(cfg))).free
    threshold = f">= {human(need)} = {need} bytes ({n} checkpoints x {human(one)})"
    value = f"{human(free)} = {free} bytes free"
    if free >= need:
        return Check("disk", value, threshold, OK, measured=free, limit=need)
    return Check("disk", value, threshold, FAIL,
                 f"free space on the OUTPUT_DIR volume or point OUTPUT_DIR at one with >= {human(need)} free "
                 f"(checkpoint.keep={cfg.checkpoint.keep} keeps that many, plus one being written)", free, need)


def _from_hub(name: str) -> bool:
    from train.worker.model import is_preset

    return bool(name) and not is_preset(name) and not name.startswith("builtin:") and not Path(name).exists()


def _hf_cache(cfg: RunConfig) -> Check:
    from huggingface_hub import constants

    path = Path(constants.HF_HUB_CACHE)
    err = _try_write(path)
    if err is None:
        return Check("hf-cache", f"{path} writable", "writable", OK)
    downloads = [n for n in (cfg.model.name, cfg.model.tokenizer, cfg.data.dataset) if _from_hub(n)]
    verdict = FAIL if downloads else WARN
    need = f"writable (downloads {', '.join(downloads)})" if downloads else "writable (nothing to download)"
    fix = ("set HF_HOME to a writable directory (in Kubernetes on the shared volume, e.g. /data/hf-cache), or "
           + _permission_fix("HF_HOME"))
    return Check("hf-cache", f"{path}: {err}", need, verdict, fix)


# -- across nodes ------------------------------------------------------------------------------
class _Lost(Exception):
    """A peer did not answer in time: the check names who."""

    def __init__(self, check: Check):
        super().__init__(check.line())
        self.check = check


@dataclass
class _Group:
    """The preflight's TCP store (node 0 serves it) with the few operations the checks need."""

    store: object
    me: int
    n: int
    timeout_s: float
    port: int

    def share(self, name: str, value: str) -> list[str]:
        """Publish this node's ``value``; every node's, in node order, once all have published."""
        self.store.set(f"{name}/{self.me}", value)
        keys = [f"{name}/{j}" for j in range(self.n)]
        try:
            self.store.wait(keys, timedelta(seconds=self.timeout_s))
        except RuntimeError:
            missing = [j for j, k in enumerate(keys) if not self.store.check([k])]
            raise _Lost(Check("peers", f"node(s) {', '.join(map(str, missing))} did not answer ({name}) within "
                                       f"{self.timeout_s:.0f} s", "every node answers", FAIL,
                              f"check that the node started and reaches node 0's preflight port {self.port}; "
                              "its own log says why", node=missing[0] if missing else None, host="?")) from None
        return [self.store.get(k).decode() for k in keys]

    def leave(self) -> None:
        """Node 0's store must outlive every client's last request: the others say goodbye first."""
        try:
            self.store.set(f"bye/{self.me}", "1")
            if self.me == 0:
                self.store.wait([f"bye/{j}" for j in range(self.n)], timedelta(seconds=30))
        except RuntimeError:
            pass  # someone is gone already: nothing left to protect


def _cross_node(cfg: RunConfig, spec, device: str, local: list[Check], report: Report) -> None:
    t = time.monotonic()

    def phase(name: str) -> None:
        nonlocal t
        report.phases[name] = time.monotonic() - t
        t = time.monotonic()

    group = _Group(_connect(cfg, spec, report.port), spec.node_rank, spec.nnodes, cfg.launch.timeout_s, report.port)
    try:
        everything = [Check(**d) for part in group.share("local", json.dumps([asdict(c) for c in local]))
                      for d in json.loads(part)]
        phase("join")
        hosts = {c.node: c.host for c in everything}
        report.checks = everything
        if not report.failures():
            report.checks += _shared_storage(cfg, group, hosts)
            phase("shared_storage")
        if not report.failures():
            report.checks += _bandwidth(cfg, group, device, hosts, report)
            phase("bandwidth")
    except _Lost as e:
        report.checks.append(e.check)
    except RuntimeError as e:  # a peer died mid-way: connections reset, collectives time out
        report.checks.append(Check("peers", f"lost contact: {str(e).splitlines()[0][:200]}", "every node answers",
                                   FAIL, "another node's log says why it stopped", node=spec.node_rank,
                                   host=socket.gethostname()))
    finally:
        group.leave()


def _connect(cfg: RunConfig, spec, port: int):
    """The preflight's TCP store: node 0 serves it on ``port``, the others wait for it (bounded)."""
    import torch.distributed as dist

    from train.launcher.nodes import MasterUnreachable, wait_for_master

    timeout = timedelta(seconds=cfg.launch.timeout_s)
    if spec.node_rank == 0:
        try:
            # The server listens on every interface; node 0's own client needs no DNS for itself.
            return dist.TCPStore("127.0.0.1", port, spec.nnodes, True, timeout, wait_for_workers=False)
        except (RuntimeError, OSError) as e:
            raise ConfigError(f"preflight: node 0 cannot listen on port {port} ({str(e).splitlines()[0]}); "
                              "set preflight.port to a free port (every node the same)") from None
    try:
        wait_for_master(replace(spec, master_port=port), cfg.launch.master_wait_s)
        return dist.TCPStore(spec.master_addr, port, spec.nnodes, False, timeout)
    except (ConfigError, MasterUnreachable, RuntimeError) as e:
        raise MasterUnreachable(f"node {spec.node_rank} (host {socket.gethostname()}): preflight: node 0's preflight "
                                f"port {spec.master_addr}:{port} did not answer: {str(e).splitlines()[0]}") from None


def _shared_storage(cfg: RunConfig, group: _Group, hosts: dict) -> list[Check]:
    """Every node writes a nonce file into OUTPUT_DIR; every node must read everyone's."""
    out, me, n = location(cfg.output_dir), group.me, group.n  # a bucket too: every node must read and write it
    tag = group.share("tag", uuid.uuid4().hex[:12])[0]  # node 0's names this launch's files
    nonce = uuid.uuid4().hex

    def path(j: int):
        return out / f".preflight-{tag}-node{j}"

    try:
        path(me).write_text(nonce)
    except OSError:
        pass  # then nobody sees this node's file: named below
    nonces = group.share("nonce", nonce)

    def sees(j: int) -> bool:
        try:
            return path(j).read_text() == nonces[j]
        except OSError:
            return False

    # NFS may show another client's new file only after its attribute cache expires: retry a while.
    deadline = time.monotonic() + cfg.preflight.shared_wait_s
    seen = [sees(j) for j in range(n)]
    while not all(seen) and time.monotonic() < deadline:
        time.sleep(0.2)
        seen = [s or sees(j) for j, s in enumerate(seen)]
    views = [json.loads(v) for v in group.share("seen", json.dumps(seen))]
    path(me).unlink(missing_ok=True)
    fix = ("mount the same ReadWriteMany volume (NFS, CephFS, Lustre, ...) at OUTPUT_DIR on every node; with a "
           "per-node disk each node writes its own half of every checkpoint and resume breaks later")
    checks = []
    for j in range(n):
        if j == 0 or (views[j][0] and views[0][j]):
            value = f"{out} holds every node's file" if all(views[j]) else f"{out} holds node 0's file"
            checks.append(Check("shared-storage", value, "the same OUTPUT_DIR on every node", OK, node=j, host=hosts[j]))
        else:
            checks.append(Check("shared-storage",
                                f"OUTPUT_DIR is not shared: node {j} (host {hosts[j]}) sees a different directory "
                                f"than node 0 at {out}", "the same OUTPUT_DIR on every node", FAIL, fix,
                                node=j, host=hosts[j]))
    return checks


# -- bandwidth ---------------------------------------------------------------------------------
def rate(bytes_per_s: float) -> str:
    for unit, size in (("GB/s", 1e9), ("MB/s", 1e6), ("KB/s", 1e3)):
        if bytes_per_s >= size:
            return f"{bytes_per_s / size:.3g} {unit}"
    return f"{bytes_per_s:.0f} B/s"


def _bandwidth(cfg: RunConfig, group: _Group, device: str, hosts: dict, report: Report) -> list[Check]:
    """All-reduce and pairwise bandwidth through one process group, torn down at the end."""
    import torch
    import torch.distributed as dist

    n, me = group.n, group.me
    nccl = device == "cuda"
    saved_env = {k: os.environ.get(k) for k in ("NCCL_DEBUG", "NCCL_DEBUG_SUBSYS", "NCCL_DEBUG_FILE")}
    logdir = tempfile.mkdtemp(prefix="preflight-nccl-")
    if nccl:  # NCCL reads these at its first call in this process; the workers get the user's own
        os.environ.update(NCCL_DEBUG="INFO", NCCL_DEBUG_SUBSYS="INIT,NET",
                          NCCL_DEBUG_FILE=os.path.join(logdir, "nccl.%h.%p.log"))
        torch.cuda.set_device(0)
    dev = torch.device("cuda", 0) if nccl else torch.device("cpu")
    try:
        dist.init_process_group(report.backend, store=dist.PrefixStore("pg", group.store), rank=me, world_size=n,
                                timeout=timedelta(seconds=cfg.launch.timeout_s))
        try:
            dist.all_reduce(torch.zeros(1, device=dev))  # connects (NCCL: creates the communicator)
            budget = cfg.preflight.bandwidth_budget_s
            report.allreduce = allreduce_bandwidth(dev, n, budget)
            report.pairs = pairwise_bandwidth(dev, n, me, budget)
        finally:
            dist.destroy_process_group()
        checks = [Check(f"all-reduce {human(r['bytes'])}",
                        f"algbw {r['algbw_GBps']:.3g} GB/s, busbw {r['busbw_GBps']:.3g} GB/s ({r['time_s'] * 1e3:.1f} ms)",
                        "- (reported)", OK, measured=r["busbw_GBps"] * 1e9) for r in report.allreduce]
        checks += link_checks(report.pairs, n, hosts, cfg.preflight.link_min_fraction, cfg.preflight.min_link_gb_s)
        if nccl:
            mine = json.dumps(asdict(replace(nccl_transport(logdir), node=me, host=hosts[me])))
            checks += [Check(**json.loads(part)) for part in group.share("nccl", mine)]
        return checks
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(logdir, ignore_errors=True)


def _sync(dev) -> None:
    if dev.type == "cuda":
        import torch

        torch.cuda.synchronize(dev)


def _slowest(seconds: float, dev) -> float:
    """The largest value across nodes: every node then takes the same decisions (no hangs)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([seconds], dtype=torch.float64, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _all(value: float, dev, n: int) -> list[float]:
    import torch
    import torch.distributed as dist

    parts = [torch.zeros(1, dtype=torch.float64, device=dev) for _ in range(n)]
    dist.all_gather(parts, torch.tensor([value], dtype=torch.float64, device=dev))
    return [float(p.item()) for p in parts]


def allreduce_bandwidth(dev, n: int, budget_s: float) -> list[dict]:
    """nccl-tests' all_reduce_perf in miniature: best of up to 3 at each size, sizes growing
    while the next one fits into ``budget_s`` (so a slow network costs seconds, not minutes)."""
    import torch
    import torch.distributed as dist

    rows, spent = [], 0.0
    for size in ALLREDUCE_SIZES:
        buf = torch.ones(size // 4, dtype=torch.float32, device=dev)
        best = float("inf")
        for _ in range(3):
            _slowest(0.0, dev)  # a barrier that works on every backend
            _sync(dev)
            t0 = time.perf_counter()
            dist.all_reduce(buf)
            _sync(dev)
            t = _slowest(time.perf_counter() - t0, dev)
            best, spent = min(best, t), spent + t
            if spent + t > budget_s:
                break
        algbw = size / best
        rows.append({"bytes": size, "time_s": best, "algbw_GBps": algbw / 1e9, "busbw_GBps": algbw * 2 * (n - 1) / n / 1e9})
        if spent + 8 * best > budget_s:
            break
    return rows


def pairwise_bandwidth(dev, n: int, me: int, budget_s: float) -> list[dict]:
    """Directed edges {src, dst, bytes, time_s}. In round k every node sends to me+k and receives
    from me-k at once, timed from a common start to the end of the receive: a send may finish as
    soon as the data sits in the kernel's buffers, only the receiver sees the link's speed.
    NCCL runs send and receive as one group (two separate blocking calls could deadlock), so its
    time covers both edges; an edge a->b then took at most min(time of a, time of b)."""
    import torch
    import torch.distributed as dist

    grouped = dev.type == "cuda"
    rounds = list(range(1, n))[:MAX_ROUNDS]
    per_round = budget_s / max(1, len(rounds))
    edges = []
    for k in rounds:
        dst, src = (me + k) % n, (me - k) % n
        size, spent = PAIR_START, 0.0
        while True:
            send = torch.ones(size // 4, dtype=torch.float32, device=dev)
            recv = torch.empty_like(send)
            best = float("inf")
            for _ in range(3):
                _slowest(0.0, dev)  # a common start
                _sync(dev)
                t0 = time.perf_counter()
                if grouped:
                    for work in dist.batch_isend_irecv([dist.P2POp(dist.isend, send, dst),
                                                        dist.P2POp(dist.irecv, recv, src)]):
                        work.wait()
                    _sync(dev)
                    t = time.perf_counter() - t0
                else:
                    sent = dist.isend(send, dst)
                    dist.irecv(recv, src).wait()
                    t = time.perf_counter() - t0
                    sent.wait()
                best = min(best, t)
                spent += _slowest(t, dev)
                if spent >= per_round:
                    break
            times = _all(best, dev, n)
            if max(times) >= PAIR_TARGET_S or size >= PAIR_MAX or spent + 3 * 4 * max(times) > per_round:
                for b in range(n):
                    a = (b - k) % n
                    t = min(times[a], times[b]) if grouped else times[b]
                    edges.append({"src": a, "dst": b, "bytes": size, "time_s": max(1e-6, t)})
                break
            size *= 4
    return edges


def link_checks(edges: list[dict], n: int, hosts: dict, min_fraction: float, min_gb_s: float) -> list[Check]:
    """Name the slow node or link. A pair's bandwidth is its slower direction; a node's is its best
    pair (a node whose every link is slow is the node's fault, not the links'). With 3+ nodes a node
    below ``min_fraction`` of the median node fails, then any other pair below that of the median pair."""
    directed: dict[tuple[int, int], float] = {}
    for e in edges:
        key = (e["src"], e["dst"])
        directed[key] = max(directed.get(key, 0.0), e["bytes"] / e["time_s"])
    pairs: dict[tuple[int, int], float] = {}
    for (a, b), bw in directed.items():
        key = (min(a, b), max(a, b))
        pairs[key] = min(pairs.get(key, float("inf")), bw)
    floor = min_gb_s * 1e9
    floor_text = f">= {min_gb_s:g} GB/s" if floor else ""
    node_fix = ("check that node's network: NIC speed and errors (ethtool), NCCL_SOCKET_IFNAME/GLOO_SOCKET_IFNAME "
                "naming the fast interface, InfiniBand reaching the pod; or drain it")
    checks: list[Check] = []
    if n == 2 or not pairs:
        for (a, b), bw in sorted(pairs.items()):
            verdict = FAIL if floor and bw < floor else OK
            checks.append(Check(f"link to node {a}", f"{rate(bw)} (slower direction)",
                                floor_text or "- (2 nodes: nothing to compare; preflight.min_link_gb_s sets a floor)",
                                verdict, node_fix if verdict == FAIL else "", bw, floor or None, b, hosts.get(b, "?")))
        return checks
    best = {j: max((bw for p, bw in pairs.items() if j in p), default=0.0) for j in range(n)}
    median_node = statistics.median(best.values())
    slow = set()
    for j in range(n):
        limit = max(min_fraction * median_node, floor)
        verdict = FAIL if best[j] < limit else OK
        if verdict == FAIL:
            slow.add(j)
        threshold = f">= {rate(limit)} ({min_fraction:.0%} of the median node, {rate(median_node)})"
        if floor:
            threshold += f", {floor_text}"
        checks.append(Check("link", f"best pair {rate(best[j])}", threshold, verdict,
                            node_fix if verdict == FAIL else "", best[j], limit, j, hosts.get(j, "?")))
    median_pair = statistics.median(pairs.values())
    for (a, b), bw in sorted(pairs.items()):
        limit = max(min_fraction * median_pair, floor)
        if bw < limit and a not in slow and b not in slow:
            checks.append(Check(f"link to node {a}", f"{rate(bw)} between node {a} (host {hosts.get(a, '?')}) and "
                                f"node {b}", f">= {rate(limit)} ({min_fraction:.0%} of the median pair)", FAIL,
                                "check the path between these two nodes (switch port, cable, routing)",
                                bw, limit, b, hosts.get(b, "?")))
    return checks


_NCCL_NET = re.compile(r"Using network (\S+)|via NET/(\w+)")


def nccl_transport(logdir: str) -> Check:
    """Which network NCCL used, from its INFO log; a warning when InfiniBand exists but it used sockets."""
    text = ""
    for p in Path(logdir).glob("nccl.*"):
        text += p.read_text(errors="replace")
    found = {m.group(1) or m.group(2) for m in _NCCL_NET.finditer(text)}
    transport = "IB" if "IB" in found else ("Socket" if "Socket" in found else (", ".join(sorted(found)) or "unknown"))
    ib = ib_devices()
    threshold = f"NET/IB (InfiniBand: {', '.join(ib)})" if ib else "- (no InfiniBand devices)"
    if ib and transport == "Socket":
        return Check("nccl-transport", "NET/Socket", threshold, WARN,
                     "NCCL fell back to TCP sockets (4-5x slower): give the pod /dev/infiniband (RDMA device "
                     "plugin, e.g. rdma/ib: 1) and an unlimited memlock; check NCCL_IB_HCA "
                     "and that NCCL_IB_DISABLE is unset")
    return Check("nccl-transport", f"NET/{transport}", threshold, OK)


__all__ = ["Check", "Report", "run_preflight", "doctor", "check_job", "node_checks", "link_checks",
           "allreduce_bandwidth", "pairwise_bandwidth", "nccl_transport", "preflight_port", "checkpoint_bytes"]
