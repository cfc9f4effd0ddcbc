"""The devices the workers will use: the GPU count against NPROC (cores on CPU) and, on CUDA, every
GPU's bf16 matmul against a CPU reference and its datasheet peak."""

from __future__ import annotations

import os

from train.config import RunConfig
from train.launcher.preflight.report import FAIL, OK, WARN, Check

GPU_MATMUL_N, GPU_CHECK_N, GPU_MAX_REL_ERROR = 8192, 1024, 1e-2


def checks(cfg: RunConfig, nproc: int, device: str) -> list[Check]:
    found = [_devices(nproc, device)]
    if device == "cuda":
        found += _gpu_matmul(cfg, nproc)
    return found


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

