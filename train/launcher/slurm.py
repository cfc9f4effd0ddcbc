"""What a Slurm job step tells a node about the job, for the node contract (train/launcher/nodes.py).

Slurm names nodes, not addresses: ``SLURM_STEP_NODELIST`` is a compressed host list such as
``gpu[01-04,07],login1``, and its names need not resolve on the nodes (here two slurmd on one
host are called ``n1``/``n2``; on clusters the names are often short names of a management
network). The master address is therefore the first node's ``NodeAddr``, read from
``scontrol show node``: it is the address slurmctld itself uses to reach that node's slurmd,
it defaults to the node name where the admin set none (so it is never worse than the name),
and it needs no DNS. Where scontrol cannot answer (a container without the Slurm client), the
name is used as it is.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from typing import Mapping

from train.config import ConfigError

# Ports derived from the job id (see master_port): below Linux's ephemeral range (32768+), so an
# outgoing connection never holds it, and even, so the preflight's MASTER_PORT + 1 is the job's too.
PORT_BASE, PORT_SLOTS = 20000, 5000


def expand_hostlist(hostlist: str) -> list[str]:
    """``n[1-2],gpu[01-03,07]`` -> n1, n2, gpu01, gpu02, gpu03, gpu07, in Slurm's order.

    Zero padding follows the range's lower bound, as in Slurm's hostlist.c; several bracket
    groups in one name (``rack[1-2]-n[1-2]``) expand as a product."""
    names: list[str] = []
    for item in _split_top_level(hostlist.strip()):
        names.extend(_expand_one(item, hostlist))
    return names


def _split_top_level(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p for p in parts if p]


def _expand_one(item: str, whole: str) -> list[str]:
    m = re.match(r"([^\[]*)\[([^\]]*)\](.*)$", item)
    if not m:
        if "[" in item or "]" in item:
            raise ConfigError(f"SLURM_JOB_NODELIST={whole!r} is not a Slurm host list")
        return [item]
    prefix, ranges, rest = m.groups()
    tails = _expand_one(rest, whole) if rest else [""]
    out = []
    for part in ranges.split(","):
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ConfigError(f"SLURM_JOB_NODELIST={whole!r} is not a Slurm host list")
        width = len(lo)
        for n in range(int(lo), int(hi if sep else lo) + 1):
            out.extend(f"{prefix}{n:0{width}d}{tail}" for tail in tails)
    return out


def node_address(name: str) -> str:
    """The node's ``NodeAddr`` as slurmctld knows it; ``name`` itself if scontrol cannot say."""
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return name
    try:
        out = subprocess.run([scontrol, "show", "node", "--oneliner", name], capture_output=True, text=True,
                             timeout=10)  # it retries a missing slurm.conf for 60 s
    except (OSError, subprocess.TimeoutExpired):
        return name
    m = re.search(r"\bNodeAddr=(\S+)", out.stdout)
    return m.group(1) if out.returncode == 0 and m else name


def master_port(job_id: str) -> int:
    """A port every node of the job computes alike, different for jobs that share a node
    (their ids differ by less than PORT_SLOTS). ``MASTER_PORT`` overrides it."""
    return PORT_BASE + 2 * (int(job_id) % PORT_SLOTS)


def in_step(env: Mapping[str, str]) -> bool:
    """Inside ``srun``: Slurm sets the step id for every task (not in the batch shell itself)."""
    return env.get("SLURM_STEP_ID", "").strip() != ""
