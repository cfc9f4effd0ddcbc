"""Let accelerate engage FSDP on CPU (gloo), for tests and CPU-only machines.

Why this exists: accelerate 1.15 only selects FSDP on an accelerator. On CPU its backend
choice returns no distributed type for a torchrun-launched process, so every rank trains
alone on the full data with no error (measured; see docs/cpu-distributed.md). PyTorch's
FSDP2 itself works on a CPU device mesh over gloo. So, on CPU only, we make accelerate's
backend choice say "gloo + MULTI_GPU" (which its FSDP path requires) and keep the device on
CPU. This is the only place the project changes accelerate's behaviour; the engagement and
sharding checks in distributed.py prove at start that it worked. GPU runs never call this.
"""

from __future__ import annotations

import os

import torch


def allow_fsdp_on_cpu() -> None:
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    if getattr(PartialState, "_train_cpu_fsdp", False):
        return
    original_backend, original_device = PartialState._prepare_backend, PartialState.set_device

    def _prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        if int(os.environ.get("LOCAL_RANK", -1)) != -1 and not torch.cuda.is_available():
            return "gloo", DistributedType.MULTI_GPU
        return original_backend(self, cpu, sagemaker_dp, backend)

    def set_device(self):
        if self.device is None and not torch.cuda.is_available():
            self.device = torch.device("cpu")
            return
        original_device(self)

    PartialState._prepare_backend = _prepare_backend
    PartialState.set_device = set_device
    PartialState._train_cpu_fsdp = True
