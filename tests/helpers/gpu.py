"""A GPU host as CPU tests see it: a fake `nvidia-smi`, and fp16 loss scaling in one process
(accelerate's GradScaler on CPU)."""

from __future__ import annotations

import os
from pathlib import Path


def fake_nvidia_smi(bin_dir: Path, driver: str | None = "550.54.15", gpus: int = 2) -> str:
    """An `nvidia-smi` in ``bin_dir`` answering as a host with ``gpus`` GPUs and this driver
    (``-L`` and ``--query-gpu=driver_version``); returns a PATH with ``bin_dir`` first."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    listing = "".join(f"echo 'GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i:08d})'\n" for i in range(gpus))
    version = f"echo '{driver}'" if driver else "echo 'N/A'"
    script = bin_dir / "nvidia-smi"
    script.write_text("#!/bin/sh\ncase \"$*\" in\n"
                      f"  *driver_version*) for i in $(seq {gpus}); do {version}; done ;;\n"
                      f"  *) {listing or ':'} ;;\nesac\n")
    script.chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}"


def fp16_accelerator(device: str):
    """accelerate with the GradScaler it uses for fp16 on a GPU. On CUDA it is accelerate's own;
    accelerate makes none on CPU, so there the same torch GradScaler is handed to it before
    `prepare` (the optimizer wrapper, backward and step are accelerate's real code)."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    if device == "cuda":
        acc = Accelerator(mixed_precision="fp16")
    else:
        acc = Accelerator(cpu=True)
        acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    assert acc.scaler is not None
    return acc


def one_step(acc, model, opt, sched, inject_inf: bool) -> bool:
    """One training step of a prepared model under the loop's rules; True if it was skipped."""
    import torch

    from train.worker.accelerator import optimizer_step_skipped

    x = torch.randn(4, 8, device=acc.device)
    with acc.autocast():
        loss = model(x).float().pow(2).mean()
    acc.backward(loss)
    if inject_inf:
        next(model.parameters()).grad.view(-1)[0] = float("inf")
    norm = acc.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    skipped = optimizer_step_skipped(acc, norm)
    if not skipped:  # the loop's rule: an overflowed step does not advance the LR schedule
        sched.step()
    opt.zero_grad(set_to_none=True)
    return skipped


FAKE_CUDA = '''\
# Written by tests/helpers/gpu.py:fake_cuda. Every CUDA use passes torch.cuda._lazy_init first,
# from Python or from C++ (torch::utils::device_lazy_init calls it): the moment a real process
# would create its CUDA context is the moment this one writes its pid down (and fails).
import os

import torch

torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: {gpus}


def _lazy_init():
    with open({log!r}, "a") as f:
        f.write(f"{{os.getpid()}}\\n")
    raise RuntimeError("fake CUDA: this process would have created a CUDA context here")


torch.cuda._lazy_init = _lazy_init
'''


def fake_cuda(site_dir: Path, log: Path, gpus: int = 1) -> dict:
    """Environment under which every Python process believes it has ``gpus`` CUDA GPUs until it
    uses one: a ``sitecustomize`` on PYTHONPATH. Creating a CUDA context appends the process's
    pid to ``log`` and raises. Returns the variables to add to a job's environment."""
    site_dir.mkdir(parents=True, exist_ok=True)
    (site_dir / "sitecustomize.py").write_text(FAKE_CUDA.format(gpus=gpus, log=str(log)))
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(site_dir), os.environ.get("PYTHONPATH")]))}


def cuda_pids(log: Path) -> set[int]:
    """The pids that created a (fake) CUDA context, from ``fake_cuda``'s log."""
    return {int(x) for x in log.read_text().split()} if log.exists() else set()
