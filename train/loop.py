"""The training loop: the same code under every strategy.

Reads top to bottom: build accelerator -> check it engaged -> build model, data, optimizer ->
prepare -> resume -> loop (accumulate, step, log, evaluate, checkpoint, stop on signal) ->
export. Strategy differences stay in distributed.py and the config files.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from pathlib import Path

import torch

from . import data as data_mod
from . import failpoints
from . import lora
from .checkpoint import Checkpointer, TrainState, export_final, find_resume
from .config import RunConfig, dump_yaml, resolve_batch, selected_strategy, strategy_name
from .distributed import (ENV_DEVICE, HeldBytes, HeldBytesProbe, align_scheduler, build_accelerator,
                          check_engaged, check_sharded, resolve_device)
from .flops import device_peak_flops, flops_per_token, mfu
from .metrics import MetricsLog, StepTimer, peak_memory_mb
from .model import build_model, is_preset, load_tokenizer, model_config, param_count
from .preemption import EXIT_PREEMPTED, StopSignal
from .tracking import start_trackers

IGNORE_INDEX = -100


def build_optimizer(model, cfg: RunConfig, device: str):
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            # no weight decay on norms/biases; ZeRO-3 (zero.Init) keeps the real shape in ds_shape
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    O = cfg.optim
    groups = [{"params": decay, "weight_decay": O.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # Drop an empty group (LoRA adapters are all matrices): ZeRO drops it, and the LR scheduler
    # built on our groups would then no longer line up with DeepSpeed's (align_scheduler).
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=O.lr, betas=(O.beta1, O.beta2), eps=O.eps, fused=device == "cuda")


def build_scheduler(optimizer, cfg: RunConfig):
    from transformers import get_scheduler

    O = cfg.optim
    name, extra = {"cosine": ("cosine_with_min_lr", {"min_lr_rate": O.min_lr_ratio}),
                   "linear": ("linear", None), "constant": ("constant_with_warmup", None)}[O.schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=O.warmup_steps, num_training_steps=cfg.train.max_steps,
                         scheduler_specific_kwargs=extra)


def sample_hash(index: torch.Tensor) -> torch.Tensor:
    """An order-free fingerprint of which samples a step consumed (audited by the resume tests)."""
    return ((index.long() + 1) * 2654435761 % 2_147_483_647).sum()


def forward_backward(model, micro: list[dict], acc) -> torch.Tensor:
    """Forward/backward over one optimizer step's micro-batches; returns the summed loss terms.

    The loss is the per-token mean over the whole effective batch (all micro-batches, all
    ranks): each micro-batch's summed token loss is divided by that global token count, not
    by its own (averaging per-micro-batch means is wrong when counts differ, transformers#24725).
    accelerate (or DeepSpeed) divides by the accumulation steps and the gradient all-reduce
    averages over ranks, so the count passed to the model is pre-divided by both.
    """
    W, A = acc.num_processes, len(micro)
    local_items = sum((b["labels"][:, 1:] != IGNORE_INDEX).sum() for b in micro)
    items = acc.reduce(local_items.float(), "sum") / (W * A)
    total = torch.zeros((), device=acc.device)
    for b in micro:
        with acc.accumulate(model):
            out = model(input_ids=b["input_ids"], labels=b["labels"], num_items_in_batch=items)
            acc.backward(out.loss)
        total += out.loss.detach()
    return total


def train(cfg: RunConfig) -> int:
    # DeepSpeed calls torch collectives that torch deprecates, once per call: noise, not news.
    warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).*deprecated",
                            category=FutureWarning)
    strategy = selected_strategy(cfg.launch)
    device = os.environ.get(ENV_DEVICE) or resolve_device(cfg.launch.device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    grad_accum, global_batch = resolve_batch(cfg, world)
    config_yaml = dump_yaml(cfg)

    tokenizer = load_tokenizer(cfg.model)
    mconf = model_config(cfg.model, len(tokenizer))
    from accelerate.utils import set_seed

    # Presets (random init) are built before the accelerator exists, so ZeRO-3's zero.Init does
    # not partition them during construction (its init differs): every strategy starts from
    # bitwise the same weights. Pretrained models load after it, already partitioned under ZeRO-3.
    set_seed(cfg.seed)
    model = build_model(cfg.model, len(tokenizer)) if is_preset(cfg.model.name) else None
    acc = build_accelerator(cfg, strategy, grad_accum, world, mconf.hidden_size, device,
                            log_dir=str(Path(cfg.output_dir) / "tensorboard"))
    check_engaged(acc, strategy, device)
    stop = StopSignal()
    if acc.is_main_process:
        print(f"[train] strategy={strategy_name(cfg.launch)} engaged as {acc.distributed_type.name} "
              f"world_size={acc.num_processes} device={acc.device} precision={cfg.train.precision} "
              f"micro_batch={cfg.train.micro_batch} grad_accum={grad_accum} global_batch={global_batch}", flush=True)
        print("[train] resolved config:\n" + config_yaml, flush=True)

    with acc.main_process_first():
        splits = data_mod.build_splits(cfg.data, tokenizer, cfg.seed)
    if model is None:
        set_seed(cfg.seed)
        model = build_model(cfg.model, len(tokenizer))
    if lora.enabled(cfg.model):
        set_seed(cfg.seed)  # the same adapter init on every rank and under every strategy
        model = lora.apply_lora(model, cfg.model)
    n_params, n_train = param_count(model), lora.trainable_count(model)
    full = HeldBytes(4 * n_params, 4 * n_train, 8 * n_train)  # fp32 replica: what DDP holds
    if acc.is_main_process:
        print(f"[train] parameters: {n_params} total, {n_train} trainable", flush=True)
    optimizer = build_optimizer(model, cfg, device)
    scheduler = build_scheduler(optimizer, cfg)
    sampler = data_mod.GlobalCursorSampler(len(splits.train), global_batch, cfg.seed)
    loader = data_mod.train_loader(splits.train, sampler, cfg.train.micro_batch, cfg.data)
    evals = data_mod.eval_loader(splits.eval, cfg.train.micro_batch)
    model, optimizer, loader, evals, scheduler = acc.prepare(model, optimizer, loader, evals, scheduler)
    align_scheduler(scheduler, optimizer)
    start_trackers(acc, cfg, {k: v for k, v in _flat(cfg.redacted()).items() if isinstance(v, (int, float, str, bool))})

    ckpt = Checkpointer(cfg, acc, {"strategy": strategy_name(cfg.launch), "global_batch": global_batch})
    state = TrainState()
    resume_from = find_resume(cfg, acc.num_processes)
    if resume_from is not None:
        state = ckpt.load(resume_from)
        if acc.is_main_process:
            print(f"[train] resumed from {resume_from} at step {state.step} (epoch {state.epoch}, "
                  f"{state.samples_in_epoch} samples into it)", flush=True)
    log = MetricsLog(acc, cfg.output_dir, cfg.train.max_steps, state.step, cfg.log.progress)
    probe = HeldBytesProbe(model, optimizer)
    tokens_per_step = global_batch * cfg.data.seq_len
    # MFU: model FLOPs per token (train/flops.py) against the device's peak; None on CPU/unknown GPUs.
    flops_token = flops_per_token(mconf, cfg.data.seq_len, trust_remote_code=cfg.model.trust_remote_code)
    peak = device_peak_flops(acc.device, cfg.train.precision)

    W, A = acc.num_processes, grad_accum
    timer = StepTimer(acc.device)
    window_loss = torch.zeros((), device=acc.device)
    window_hash = torch.zeros((), dtype=torch.long, device=acc.device)
    window_steps, grad_norm, last_saved = 0, None, state.step
    stopped = False
    model.train()
    while state.step < cfg.train.max_steps and not stopped:
        sampler.set_position(state.epoch, state.samples_in_epoch)
        batches = iter(loader)
        for _ in range(sampler.steps_per_epoch - state.samples_in_epoch // global_batch):
            micro = [next(batches) for _ in range(A)]
            probe.reset(armed=state.step == 0 or (state.step + 1) % cfg.log.every == 0)  # step 1 and log steps
            window_loss += forward_backward(model, micro, acc)
            for b in micro:
                window_hash += sample_hash(b["index"])
            assert acc.sync_gradients, "accumulation boundary out of step with the data"
            grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            if not acc.optimizer_step_was_skipped:  # fp16 overflow: the LR schedule does not advance
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.samples_in_epoch += global_batch
            state.tokens_seen += tokens_per_step
            window_steps += 1
            failpoints.after_step(state.step, acc.process_index)
            if state.step == 1 and strategy is not None and probe.last is not None:
                check_sharded(probe.last, full, strategy, W)

            if state.step % cfg.log.every == 0 or state.step == cfg.train.max_steps:
                dt = timer.lap()
                loss = (acc.reduce(window_loss, "sum") / (W * A * window_steps)).item()
                record = {"step": state.step, "loss": loss, "lr": scheduler.get_last_lr()[0],
                          "grad_norm": float(grad_norm) if grad_norm is not None else None,
                          "tokens_per_second": tokens_per_step * window_steps / dt,
                          "tokens_per_second_per_device": tokens_per_step * window_steps / dt / W,
                          "step_time_s": dt / window_steps, "peak_memory_mb": peak_memory_mb(acc.device),
                          "epoch": state.epoch, "tokens_seen": state.tokens_seen,
                          "sample_hash": int(acc.reduce(window_hash, "sum").item())}
                if peak is not None:
                    record["mfu"] = mfu(record["tokens_per_second_per_device"], flops_token, peak)
                if probe.last is not None:
                    record["held_bytes"] = probe.last.as_dict()
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss} at step {state.step}; lower optim.lr or use bf16 over fp16")
                log.log(record)
                window_loss.zero_(), window_hash.zero_()
                window_steps = 0
            if cfg.train.eval_every and state.step % cfg.train.eval_every == 0:
                log.log({"step": state.step, **evaluate(model, evals, acc, cfg.train.eval_batches)})
            stopped = stop.agreed()
            if stopped or state.step >= cfg.train.max_steps:
                break  # the checkpoint after the loop covers both
            if cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0:
                ckpt.save(state, config_yaml)
                last_saved = state.step
        if state.samples_in_epoch >= sampler.steps_per_epoch * global_batch:
            state.epoch, state.samples_in_epoch = state.epoch + 1, 0

    if last_saved != state.step:
        ckpt.save(state, config_yaml)
    if stopped:
        if acc.is_main_process:
            print(f"[train] stop signal received: saved step {state.step}; resume with RESUME=auto", flush=True)
        log.close()
        acc.end_training()
        return EXIT_PREEMPTED
    if not (cfg.train.eval_every and state.step % cfg.train.eval_every == 0):
        log.log({"step": state.step, **evaluate(model, evals, acc, cfg.train.eval_batches)})
    if cfg.checkpoint.export:
        out = export_final(acc, model, tokenizer, Path(cfg.output_dir) / "final", config_yaml,
                           merge_lora=cfg.checkpoint.merge_lora)
        save_probe(model, splits.eval, acc, Path(cfg.output_dir) / "final_probe.pt")
        if out is not None:
            print(f"[train] exported {out} (load with AutoModelForCausalLM.from_pretrained)", flush=True)
    probe.close()
    log.close()
    acc.end_training()
    return 0


@torch.no_grad()
def evaluate(model, loader, acc, max_batches: int) -> dict:
    model.eval()
    total = torch.zeros((), device=acc.device)
    count = torch.zeros((), device=acc.device)
    for i, b in enumerate(loader):
        if i >= max_batches:
            break
        out = model(input_ids=b["input_ids"], labels=b["labels"])
        n = (b["labels"][:, 1:] != IGNORE_INDEX).sum()
        total += out.loss.float() * n
        count += n
    model.train()
    loss = (acc.reduce(total, "sum") / acc.reduce(count, "sum").clamp(min=1)).item()
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}


@torch.no_grad()
def save_probe(model, eval_set, acc, path: Path) -> None:
    """Logits of the trained (still sharded) model on one eval block, to check the export against."""
    ids = eval_set[0]["input_ids"].unsqueeze(0).to(acc.device)
    model.eval()
    logits = model(input_ids=ids).logits.float().cpu()
    if acc.is_main_process:
        torch.save({"input_ids": ids.cpu(), "logits": logits}, path)
    acc.wait_for_everyone()


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def main(cfg: RunConfig) -> None:
    code = train(cfg)
    sys.stdout.flush()
    # Some 2-process gloo runs hang at interpreter exit after training (MACHINE-NOTES); exit explicitly.
    os._exit(code)
