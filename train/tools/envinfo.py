"""`python -m train env` (what this machine/container has) and `python -m train warm`."""

from __future__ import annotations

import os
import subprocess
import sys


def print_env() -> None:
    """The same provenance a checkpoint records (train/checkpoint/provenance.py), for this host,
    then the details: each GPU, cores, the extensions cache and `accelerate env`."""
    import torch

    from train.checkpoint import provenance

    for line in provenance.summary(provenance.host()):
        print(f"[provenance] {line}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"{'gpu ' + str(i):14} {p.name} {p.total_memory / 2**30:.0f} GiB cc {p.major}.{p.minor}")
    else:
        print(f"{'gpus':14} none visible")
    print(f"{'cpu cores':14} {os.cpu_count()}")
    print(f"{'torch_ext dir':14} {os.environ.get('TORCH_EXTENSIONS_DIR', '(default)')}")
    sys.stdout.flush()
    subprocess.run([sys.executable, "-m", "accelerate.commands.accelerate_cli", "env"], check=False)


def warm_ops() -> None:
    """Build the DeepSpeed ops a run would JIT-compile (30-60 s each) once, ahead of time."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    for name in ("ShareMemCommBuilder", "CPUAdamBuilder"):
        builder = acc.create_op_builder(name)
        if builder is None or not builder.is_compatible(verbose=False):
            print(f"[warm] {name}: not available on {acc.device_name()}, skipped", flush=True)
            continue
        builder.load(verbose=False)
        print(f"[warm] {name}: ready in {os.environ.get('TORCH_EXTENSIONS_DIR', '~/.cache/torch_extensions')}", flush=True)
