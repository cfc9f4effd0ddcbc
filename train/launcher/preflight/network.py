"""The network between nodes, through one short process group on the job's backend: all-reduce
bandwidth, pairwise links (naming the slow node or link), and the transport NCCL chose."""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, replace
from datetime import timedelta
from pathlib import Path

from train.config import RunConfig
from train.launcher.preflight.group import Group
from train.launcher.preflight.report import FAIL, OK, WARN, MiB, Check, Report
from train.launcher.preflight.resources import ib_devices
from train.memory import human

ALLREDUCE_SIZES = tuple(256 * 2**10 * 8**k for k in range(4))  # 256 KiB, 2 MiB, 16 MiB, 128 MiB
PAIR_START, PAIR_MAX = 64 * 2**10, 64 * MiB
PAIR_TARGET_S = 0.02  # grow the pairwise message until the slowest exchange takes this long
MAX_ROUNDS = 8  # pairwise rounds (shifts) at most: each node meets its 8 nearest ranks on either side


def rate(bytes_per_s: float) -> str:
    for unit, size in (("GB/s", 1e9), ("MB/s", 1e6), ("KB/s", 1e3)):
        if bytes_per_s >= size:
            return f"{bytes_per_s / size:.3g} {unit}"
    return f"{bytes_per_s:.0f} B/s"


def bandwidth(cfg: RunConfig, group: Group, device: str, hosts: dict, report: Report) -> list[Check]:
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

