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

Code: one module per check family, each a function returning ``Check``s (report.py: Check, Report).
On one node, ``NODE_FAMILIES`` in order: devices.py (GPUs or cores, GPU matmul), resources.py (shm,
memlock, stack), storage.py (output-dir, disk, hf-cache). Across nodes, ``CROSS_NODE_FAMILIES`` in
order, each only while nothing has failed: storage.shared_storage, then network.bandwidth
(all-reduce, links, NCCL transport), through group.py's TCP store. A new family (say, object
storage) is a module with ``checks(cfg, nproc, device) -> list[Check]`` added to NODE_FAMILIES, and
``name(cfg, group, device, hosts, report)`` added to CROSS_NODE_FAMILIES when it needs the other nodes.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from dataclasses import asdict, replace

from train.config import RunConfig, exitcodes
from train.launcher import cuda_child
from train.launcher.preflight import devices, network, resources, storage
from train.launcher.preflight.group import Group, Lost, connect
from train.launcher.preflight.network import (allreduce_bandwidth, link_checks, nccl_transport,
                                              pairwise_bandwidth)
from train.launcher.preflight.report import FAIL, JSON_NAME, OK, SKIP, WARN, Check, Report
from train.launcher.preflight.storage import checkpoint_bytes
from train.storage import work_dir

# Checks on one node, in table order: (cfg, nproc, device) -> [Check].
NODE_FAMILIES = (devices.checks, resources.checks, storage.checks)
# Checks that need the other nodes, in order, each run only while nothing has failed:
# (cfg, group, device, hosts, report) -> [Check].
CROSS_NODE_FAMILIES = (("shared_storage", storage.shared_storage), ("bandwidth", network.bandwidth))

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
    except with MASTER_UNREACHABLE when node 0's preflight port never answers.

    On CUDA all of it runs in a child process that exits (train/launcher/cuda_child.py): the
    matmul check, bf16 support and the NCCL group would otherwise leave a CUDA context on every
    GPU in this process, which goes on to supervise the whole run."""
    if device != "cuda":
        return _check_job(cfg, spec, nproc, device)
    start = time.monotonic()
    try:
        return cuda_child.call(_check_job, cfg, spec, nproc, device)
    except cuda_child.ChildFailed as e:
        report = Report(spec.nnodes, nproc, device, "nccl", preflight_port(cfg, spec) if spec.nnodes > 1 else None)
        report.checks = [Check("gpu checks", f"their process failed: {e}", "completes", FAIL,
                               "the GPU or its driver is broken: check `nvidia-smi` and the kernel log for Xid "
                               "errors, or drain the node", node=spec.node_rank, host=socket.gethostname())]
        report.elapsed_s = time.monotonic() - start
        return report


def _check_job(cfg: RunConfig, spec, nproc: int, device: str) -> Report:
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
    checks = [c for family in NODE_FAMILIES for c in family(cfg, nproc, device)]
    return [replace(c, node=node, host=host) for c in checks]


# -- across nodes ------------------------------------------------------------------------------
def _cross_node(cfg: RunConfig, spec, device: str, local: list[Check], report: Report) -> None:
    t = time.monotonic()

    def phase(name: str) -> None:
        nonlocal t
        report.phases[name] = time.monotonic() - t
        t = time.monotonic()

    group = Group(connect(cfg, spec, report.port), spec.node_rank, spec.nnodes, cfg.launch.timeout_s, report.port)
    try:
        everything = [Check(**d) for part in group.share("local", json.dumps([asdict(c) for c in local]))
                      for d in json.loads(part)]
        phase("join")
        hosts = {c.node: c.host for c in everything}
        report.checks = everything
        for name, family in CROSS_NODE_FAMILIES:
            if report.failures():
                break
            report.checks += family(cfg, group, device, hosts, report)
            phase(name)
    except Lost as e:
        report.checks.append(e.check)
    except RuntimeError as e:  # a peer died mid-way: connections reset, collectives time out
        report.checks.append(Check("peers", f"lost contact: {str(e).splitlines()[0][:200]}", "every node answers",
                                   FAIL, "another node's log says why it stopped", node=spec.node_rank,
                                   host=socket.gethostname()))
    finally:
        group.leave()


__all__ = ["Check", "Report", "OK", "WARN", "FAIL", "SKIP", "JSON_NAME", "NODE_FAMILIES", "CROSS_NODE_FAMILIES",
           "run_preflight", "doctor", "check_job", "node_checks", "link_checks", "allreduce_bandwidth",
           "pairwise_bandwidth", "nccl_transport", "preflight_port", "checkpoint_bytes"]
