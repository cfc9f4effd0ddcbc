"""The single-process loops of section 1, each run inside its own ``bench --worker KIND``
process: our loop (train/worker/loop.py's ``train()``, untouched), a minimal plain-PyTorch loop (also
inside a process group of one, as torchrun starts ours in a 1-process job) and HF ``Trainer``.

Each returns per-step wall and process CPU times (``step_times``, ``cpu_times``), the unix time
each step ended (``ends``), losses, thread count and peak memory. All are timed by
train/worker/metrics.py's ``StepTimer``.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from train.config import RunConfig
from train.tools.bench.measure import read_metrics
from train.tools.bench.settings import go, ready
from train.worker.metrics import StepTimer, peak_memory_mb


class Laps:
    """Every lap of a StepTimer, kept: per-step wall and CPU seconds."""

    def __init__(self, device):
        self.device, self.wall, self.cpu, self.ends = device, [], [], []

    def start(self) -> None:
        self.timer = StepTimer(self.device)

    def lap(self) -> None:
        lap = self.timer.lap()
        self.wall.append(lap.wall)
        self.cpu.append(lap.cpu)
        self.ends.append(time.time())


def ours_loop(cfg: RunConfig, steps: int, threads: int) -> dict:
    """train/worker/loop.py's ``train()`` as it is: with LOG_EVERY=1 each metrics.jsonl row is one step,
    with the loop's own wall (``step_time_s``) and process CPU time (``cpu_time_per_step_s``) and
    the time it was logged."""
    import torch

    from train.worker.loop import train

    torch.set_num_threads(threads)
    train(cfg)
    rows = read_metrics(Path(cfg.output_dir))
    return {"step_times": [r["step_time_s"] for r in rows], "cpu_times": [r["cpu_time_per_step_s"] for r in rows],
            "ends": [r["time"] for r in rows], "losses": [r["loss"] for r in rows], "threads": torch.get_num_threads(),
            "peak_memory_mb": max((r["peak_memory_mb"] for r in rows), default=None)}


def _setup(cfg: RunConfig, threads: int):
    import torch
    from accelerate.utils import set_seed

    from train import data as data_mod
    from train.worker.accelerator import resolve_device
    from train.worker.model import build_model, load_tokenizer

    torch.set_num_threads(threads)
    device = torch.device(resolve_device(cfg.launch.device))
    tok = load_tokenizer(cfg.model)
    set_seed(cfg.seed)  # as train/worker/loop.py does right before building a preset
    model = build_model(cfg.model, len(tok)).to(device)
    splits = data_mod.build_splits(cfg.data, tok, cfg.seed)
    print("[bench] built", flush=True)
    return torch, device, model, splits


def plain_loop(cfg: RunConfig, steps: int, threads: int, group: bool = False, until: str | None = None) -> dict:
    """The minimal loop: same model, data order, optimizer, schedule and clipping as ours.
    ``until``: a partner run beside another loop. Built, it creates ``ready(until)`` and waits for
    ``go(until)`` (that loop is about to step), then steps until ``until`` exists (that loop is done).

    ``group=True`` joins a process group of one first (gloo on CPU), which our loop has in a
    1-process job (torchrun; the model is not DDP-wrapped, train/worker/accelerator.py's
    ``prepare_alone``): the difference between the two plain variants is the cost of that
    group (gloo's transport thread wakes every 10 ms), not of our loop.
    """
    from train import data as data_mod
    from train.worker.loop import build_optimizer, build_scheduler

    torch, device, model, splits = _setup(cfg, threads)
    if group:
        torch.distributed.init_process_group("gloo" if device.type == "cpu" else "nccl")
    mb = cfg.train.micro_batch
    sampler = data_mod.GlobalCursorSampler(len(splits.train), mb, cfg.seed)
    loader = data_mod.train_loader(splits.train, sampler, mb, cfg.data)
    optimizer = build_optimizer(model, cfg, device.type)
    scheduler = build_scheduler(optimizer, cfg)
    half = cfg.train.precision == "bf16"
    clock, losses = Laps(device), []
    model.train()
    batches = iter(loader)
    if until:
        ready(until).touch()
        while not go(until).exists() and not Path(until).exists():
            time.sleep(0.01)
    print("[bench] stepping", flush=True)
    clock.start()
    for step in range(1, steps + 1):
        if until and Path(until).exists():
            break
        try:
            x = next(batches)
        except StopIteration:  # a partner (``until``) can outrun one epoch
            batches = iter(loader)
            x = next(batches)
        x = x["input_ids"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=half):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # the host sync our loop does when it logs every step
        clock.lap()
        if step == 1:
            print("[bench] step 1 done", flush=True)
    return {"step_times": clock.wall, "cpu_times": clock.cpu, "ends": clock.ends, "losses": losses, "threads": torch.get_num_threads(),
            "peak_memory_mb": peak_memory_mb(device)}


def trainer_loop(cfg: RunConfig, steps: int, threads: int) -> dict:
    """HF ``Trainer`` on the same model and packed blocks, same hyperparameters."""
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from train import data as data_mod

    torch, device, model, splits = _setup(cfg, threads)

    class Blocks(Dataset):  # Trainer passes every key to the model: drop the audit index
        def __len__(self):
            return len(splits.train)

        def __getitem__(self, i):
            x = splits.train.block(i)
            return {"input_ids": x, "labels": x}

    clock = Laps(device)

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            print("[bench] stepping", flush=True)
            clock.start()

        def on_step_end(self, args, state, control, **kw):
            clock.lap()
            if state.global_step == 1:
                print("[bench] step 1 done", flush=True)

    class SameOrder(Trainer):  # our sampler: the same batches, in the same order, as the other loops
        def _get_train_sampler(self, train_dataset=None):
            return data_mod.GlobalCursorSampler(len(splits.train), cfg.train.micro_batch, cfg.seed)

    opt = cfg.optim
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=cfg.train.micro_batch, max_steps=steps,
            learning_rate=opt.lr, weight_decay=opt.weight_decay, adam_beta1=opt.beta1, adam_beta2=opt.beta2,
            adam_epsilon=opt.eps, max_grad_norm=opt.grad_clip, warmup_steps=opt.warmup_steps,
            lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": opt.min_lr_ratio},
            logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, seed=cfg.seed,
            use_cpu=device.type == "cpu", bf16=cfg.train.precision == "bf16", dataloader_num_workers=0,
            optim="adamw_torch_fused" if device.type == "cuda" else "adamw_torch")
        trainer = SameOrder(model=model, args=args, train_dataset=Blocks(), data_collator=data_mod.collate, callbacks=[Clock()])
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"step_times": clock.wall, "cpu_times": clock.cpu, "ends": clock.ends, "losses": losses, "threads": torch.get_num_threads(),
            "peak_memory_mb": peak_memory_mb(device)}


WORKERS = {"ours": ours_loop, "plain": plain_loop, "trainer": trainer_loop,
           "plain-pg": lambda cfg, steps, threads: plain_loop(cfg, steps, threads, group=True)}
