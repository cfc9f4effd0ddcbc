"""The run's provenance as a rank sees it: collected once at start (rank 0 hashes the data),
printed in a few lines, and compared with the checkpoint a run resumes from."""

from __future__ import annotations

from pathlib import Path

import torch

from train.checkpoint import provenance
from train.checkpoint.layout import read_manifest
from train.config import RunConfig


def hosts(acc) -> list[str]:
    """Every rank's hostname, in rank order (one all-gather, on every rank, at the same point)."""
    me = provenance.hostname()
    if acc.num_processes == 1 or not torch.distributed.is_initialized():
        return [me]
    out: list = [None] * acc.num_processes
    torch.distributed.all_gather_object(out, me)
    return out


def collect_and_print(cfg: RunConfig, acc, device: str) -> dict:
    """Rank 0's record (it writes the manifests), printed; {} on the other ranks."""
    names = hosts(acc)
    if not acc.is_main_process:
        return {}
    prov = provenance.collect(cfg, acc.num_processes, names, device)
    for line in provenance.summary(prov):
        print(f"[provenance] {line}", flush=True)
    return prov


def say_what_changed(checkpoint: Path, prov: dict) -> None:
    """A resume onto other code, packages, image, hardware or data says so in its first lines
    (the config fingerprint check already refused a different model, data source or seed)."""
    old = read_manifest(checkpoint).get("provenance")
    changes = provenance.differences(old, prov)
    if not changes:
        print(f"[resume] {checkpoint.name} was written by the same code, packages, image, hardware and data", flush=True)
        return
    print(f"[resume] {checkpoint.name} was written by another recipe; changed since it was saved:", flush=True)
    for line in changes:
        print(f"[resume]   {line}", flush=True)
