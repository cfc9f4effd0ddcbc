"""The training loop: the same code under every strategy.

Reads top to bottom: build accelerator -> check it engaged -> build model, data, optimizer ->
prepare -> resume -> loop (accumulate, step, log, evaluate, checkpoint, stop on signal) ->
export. Strategy differences stay in distributed.py and the config files.
"""

from __future__ import annotations

import os
import sys
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from train import data as data_mod
from train import progress
from train.checkpoint.export import export_final
from train.checkpoint.layout import checkpoint_root
from train.checkpoint.remote import fetch_metrics, publish_export
from train.checkpoint.saver import MIRRORED, Checkpointer, TrainState
from train.config import RunConfig, dump_yaml, resolve_batch, selected_strategy, strategy_name
from train.config.exitcodes import OK, OUT_OF_MEMORY, PREEMPTED, Exit
from train.config.strategies import GRADS, OPTIM, PARAMS, Strategy
from train.data.packing import IGNORE_INDEX, model_inputs
from train.flops import device_peak_flops, flops_per_token
from train.memory import held_bytes
from train.progress import ENV_DEVICE
from train.storage import location, mirror, work_dir
from train.worker import failpoints, lora, profiler, provenance_log, rollback
from train.worker.accelerator import (
    align_scheduler,
    build_accelerator,
    fused_adamw,
    loads_on_rank0_only,
    optimizer_step_skipped,
    prepare_alone,
    resolve_device,
)
from train.worker.engage import HeldBytes, HeldBytesProbe, check_engaged, check_sharded
from train.worker.evaluate import evaluate as evaluate_sets
from train.worker.metrics import MetricsLog, MetricsWindow, loss_scale
from train.worker.model import build_model, is_preset, load_tokenizer, model_config, param_count
from train.worker.preemption import StopSignal
from train.worker.rollback import SpikeGuard
from train.worker.tracking import start_trackers


def build_optimizer(model, cfg: RunConfig, device: str):
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            # no weight decay on norms/biases; ZeRO-3 (zero.Init) keeps the real shape in ds_shape
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    opt = cfg.optim
    groups = [{"params": decay, "weight_decay": opt.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # Drop an empty group (LoRA adapters are all matrices): ZeRO drops it, and the LR scheduler
    # built on our groups would then no longer line up with DeepSpeed's (align_scheduler).
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps,
                             fused=fused_adamw(selected_strategy(cfg.launch), cfg.train.precision, device))


def build_scheduler(optimizer, cfg: RunConfig):
    from transformers import get_scheduler

    opt = cfg.optim
    name, extra = {"cosine": ("cosine_with_min_lr", {"min_lr_rate": opt.min_lr_ratio}),
                   "linear": ("linear", None), "constant": ("constant_with_warmup", None)}[opt.schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=opt.warmup_steps, num_training_steps=cfg.train.max_steps,
                         scheduler_specific_kwargs=extra)


def sample_hash(index: torch.Tensor) -> torch.Tensor:
    """An order-free fingerprint of which samples a step consumed (audited by the resume tests)."""
    return ((index.long() + 1) * 2654435761 % 2_147_483_647).sum()


def forward_backward(model, micro: list[dict], acc, waiting=nullcontext) -> torch.Tensor:
    """Forward/backward over one optimizer step's micro-batches; returns the summed loss terms.

    The loss is the per-token mean over the whole effective batch (all micro-batches, all
    ranks): each micro-batch's summed token loss is divided by that global token count, not
    by its own (averaging per-micro-batch means is wrong when counts differ, transformers#24725).
    accelerate (or DeepSpeed) divides by the accumulation steps and the gradient all-reduce
    averages over ranks, so the count passed to the model is pre-divided by both. That count
    is the step's first collective: ``waiting`` times it (a rank that arrives early waits there).
    """
    world, accum = acc.num_processes, len(micro)
    local_items = sum((b["labels"][:, 1:] != IGNORE_INDEX).sum() for b in micro)
    with waiting():  # (a sum over one rank is the rank's own count: no collective)
        items = (acc.reduce(local_items.float(), "sum") if world > 1 else local_items.float()) / (world * accum)
    total = torch.zeros((), device=acc.device)
    for b in micro:
        with acc.accumulate(model):
            # Keep the loss only: the output's logits (micro-batch x seq_len x vocab) are freed
            # before the backward pass instead of held through it.
            loss = model(**model_inputs(b), num_items_in_batch=items).loss
            acc.backward(loss)
        total += loss.detach()
    return total


@dataclass
class Run:
    """Everything the loop trains with: built, prepared and resumed by ``setup``."""

    cfg: RunConfig
    acc: Any  # accelerate.Accelerator
    strategy: Strategy | None
    tokenizer: Any
    splits: Any  # data.Splits: train and eval blocks
    model: Any
    optimizer: Any
    scheduler: Any
    sampler: data_mod.GlobalCursorSampler
    loader: Any
    evals: dict  # eval sets by name (data.Splits.eval_sets), read by train/worker/evaluate.py
    ckpt: Checkpointer
    state: TrainState
    log: MetricsLog
    probe: HeldBytesProbe
    full: HeldBytes  # what a DDP rank would hold: the yardstick of check_sharded
    stop: StopSignal
    profiler: profiler.StepProfiler
    grad_accum: int
    global_batch: int
    tokens_per_step: int
    config_yaml: str
    mconf: Any  # the transformers model config

    def close(self) -> None:
        self.probe.close()
        self.log.close()
        self.acc.end_training()


def setup(cfg: RunConfig) -> Run:
    """Build the accelerator, check it engaged, build model/data/optimizer, prepare, resume."""
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
                            log_dir=str(work_dir(cfg) / "tensorboard"))
    check_engaged(acc, strategy, device)
    profiler.start_memory_history(cfg, device)
    stop = StopSignal()
    if acc.is_main_process:
        print(f"[train] strategy={strategy_name(cfg.launch)} engaged as {acc.distributed_type.name} "
              f"world_size={acc.num_processes} device={acc.device} precision={cfg.train.precision} "
              f"micro_batch={cfg.train.micro_batch} grad_accum={grad_accum} global_batch={global_batch}", flush=True)
        print("[train] resolved config:\n" + config_yaml, flush=True)

    prov = provenance_log.collect_and_print(cfg, acc, device)  # rank 0's record; {} on the others
    with acc.main_process_first():
        splits = data_mod.build_splits(cfg.data, tokenizer, cfg.seed)
    data_mod.check_splits(splits, cfg.data, global_batch)
    if model is None:
        set_seed(cfg.seed)
        family = strategy.family if strategy is not None and world > 1 else None
        model = build_model(cfg.model, len(tokenizer),
                            without_weights=loads_on_rank0_only(cfg, family) and not acc.is_main_process)
    if lora.enabled(cfg.model):
        set_seed(cfg.seed)  # the same adapter init on every rank and under every strategy
        model = lora.apply_lora(model, cfg.model)
    n_params, n_train = param_count(model), lora.trainable_count(model)
    if acc.is_main_process:
        print(f"[train] parameters: {n_params} total, {n_train} trainable", flush=True)
    # The planner's formula for a full replica; gradients and Adam state exist for trainable parameters only (LoRA).
    ddp, ddp_trained = held_bytes("ddp", n_params, world_size=1), held_bytes("ddp", n_train, world_size=1)
    full = HeldBytes(parameters=ddp[PARAMS], gradients=ddp_trained[GRADS], optimizer=ddp_trained[OPTIM])
    optimizer = build_optimizer(model, cfg, device)
    scheduler = build_scheduler(optimizer, cfg)
    if splits.chat_template:  # the export's tokenizer renders conversations the way training did
        tokenizer.chat_template = splits.chat_template
    if acc.is_main_process:
        print(f"[train] data: {splits.described}", flush=True)
        print(f"[train] sequences: {splits.packing_line}", flush=True)
    sampler = data_mod.GlobalCursorSampler(len(splits.train), global_batch, cfg.seed, splits.train)
    loader = data_mod.train_loader(splits.train, sampler, cfg.train.micro_batch, cfg.data)
    evals = splits.eval_sets  # not a prepared DataLoader: its rank shares would repeat blocks (evaluate.py)
    model = prepare_alone(acc, model)
    model, optimizer, loader, scheduler = acc.prepare(model, optimizer, loader, scheduler)
    align_scheduler(scheduler, optimizer)
    if acc.is_main_process:  # e.g. DistributedDataParallel, FSDPLlamaForCausalLM, DeepSpeedEngine
        print(f"[train] model prepared as {type(model).__name__}", flush=True)
    start_trackers(acc, cfg, {k: v for k, v in _flat(cfg.redacted()).items() if isinstance(v, (int, float, str, bool))})

    ckpt = Checkpointer(cfg, acc, {"strategy": strategy_name(cfg.launch), "global_batch": global_batch,
                                   **({"provenance": prov} if prov else {})})
    state = TrainState()
    resume_from = ckpt.claim_and_find_resume()  # rank 0 takes OUTPUT_DIR over and chooses for all
    if resume_from is not None:
        state = ckpt.load(resume_from)
        if acc.is_main_process:
            print(f"[train] resumed from {resume_from} at step {state.step} (epoch {state.epoch}, "
                  f"{state.samples_in_epoch} samples into it)", flush=True)
            provenance_log.say_what_changed(resume_from, prov)
    if acc.is_main_process:
        fetch_metrics(cfg)
    log = MetricsLog(acc, str(work_dir(cfg)), cfg.train.max_steps, state.step, cfg.log.progress)
    if acc.is_main_process:
        progress.log_restart(log, state.step)  # this start is torchrun's restart: one event line
        ckpt.extra["events"] = progress.event_counts(log.path)
    return Run(cfg, acc, strategy, tokenizer, splits, model, optimizer, scheduler, sampler, loader, evals, ckpt,
               state, log, HeldBytesProbe(model, optimizer), full, stop,
               profiler.StepProfiler(cfg, acc.process_index, acc.num_processes, device), grad_accum, global_batch,
               global_batch * cfg.data.seq_len, config_yaml, mconf)


def metrics_window(r: Run) -> MetricsWindow:
    # MFU: model FLOPs per token (train/flops.py) against the device's peak; None on CPU/unknown GPUs.
    flops_token = flops_per_token(r.mconf, r.cfg.data.seq_len, trust_remote_code=r.cfg.model.trust_remote_code)
    scale = (lambda: loss_scale(r.acc, r.optimizer)) if r.cfg.train.precision == "fp16" else None
    return MetricsWindow(r.acc, r.cfg.log, r.cfg.train.max_steps, r.grad_accum, r.tokens_per_step, flops_token,
                         device_peak_flops(r.acc.device, r.cfg.train.precision), scale=scale)


# What a finished run leaves behind is never freed: destroying a DDP reducer's gloo group after
# the process group is gone can hang (docs/cpu-distributed.md); main() ends with os._exit.
_KEEP_ALIVE: list[Run] = []


def train(cfg: RunConfig) -> int:
    r = setup(cfg)
    _KEEP_ALIVE.append(r)
    acc, state, model, optimizer = r.acc, r.state, r.model, r.optimizer  # `state` stays r.state (rollback restores it)
    window = metrics_window(r)
    stopped = False
    guard = SpikeGuard(cfg.train.spike_factor, cfg.train.spike_window)
    model.train()
    # Every rank runs the same collectives in the same order each step; a branch that only some
    # ranks take must not add one. In order: the token count (forward_backward), the gradient
    # reduction (backward / DeepSpeed's step), the grad-norm reduction (clip), the logged loss
    # (window.record, on log steps), the eval reductions (eval steps), the stop agreement
    # (stop.agreed), and the checkpoint's barriers (saves). All branches below depend only on
    # values every rank shares (step, reduced loss, agreed stop).
    end = min(cfg.train.until_step or cfg.train.max_steps, cfg.train.max_steps)  # until_step: a replay's window
    while state.step < end and not stopped:
        r.sampler.set_position(state.epoch, state.samples_in_epoch)
        batches = iter(r.loader)
        for _ in range(r.sampler.steps_left()):
            progress.phase("data")  # what the hang watchdog reports (train/progress.py); no collective
            failpoints.before_data(state.step + 1, acc.process_index)
            micro = [next(batches) for _ in range(r.grad_accum)]
            r.profiler.before(state.step + 1)
            progress.phase("forward")
            r.probe.reset(armed=window.measures_held_bytes(state.step + 1))
            loss = forward_backward(model, micro, acc, window.timer.waiting)
            loss = failpoints.poison(loss, model, state.epoch, state.samples_in_epoch // r.global_batch + 1)
            window.add(loss, sum(sample_hash(b["index"]) for b in micro))
            assert acc.sync_gradients, "accumulation boundary out of step with the data"
            grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            if not optimizer_step_skipped(acc, grad_norm):  # fp16 overflow: the LR schedule does not advance
                r.scheduler.step()
            else:
                window.step_skipped()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.samples_in_epoch += r.global_batch
            state.tokens_seen += r.tokens_per_step
            failpoints.after_step(state.step, acc.process_index)
            r.profiler.after(state.step)
            progress.phase("collective", step=state.step)
            if state.step == 1 and r.strategy is not None and r.probe.last is not None:
                check_sharded(r.probe.last, r.full, r.strategy, acc.num_processes)

            if window.is_log_step(state.step):
                record = window.record(state, r.scheduler.get_last_lr()[0], grad_norm,
                                       r.probe.last if r.probe.armed else None)
                spike = guard.check(record["loss"])
                if spike:  # every rank sees the same reduced loss, so all roll back together
                    roll_back(r, spike)
                    window = metrics_window(r)
                    break
                r.log.log(record)
            if cfg.train.eval_every and state.step % cfg.train.eval_every == 0:
                progress.phase("eval")
                r.log.log({"step": state.step, **evaluate(r)})
            stopped = r.stop.agreed()  # non-blocking: a signal is agreed on one step after it arrives
            if stopped or state.step >= end:
                break  # save_last after the loop covers both
            if r.ckpt.due(state.step):
                progress.phase("checkpoint")
                r.ckpt.save(state, r.config_yaml, r.log)  # logs the stall: {"step", "checkpoint_stall_s"}
        if state.samples_in_epoch >= r.sampler.steps_per_epoch * r.global_batch:
            state.epoch, state.samples_in_epoch = state.epoch + 1, 0

    r.stop.close()
    r.profiler.close(state.step)  # a stop inside the window still writes what was recorded
    progress.phase("checkpoint")
    r.ckpt.save_last(state, r.config_yaml, r.log)
    if stopped and acc.is_main_process:
        print(f"[train] stop signal received: saved step {state.step}; resume with RESUME=auto", flush=True)
    if not stopped and state.step >= cfg.train.max_steps:  # (train.until_step stops short: no export)
        finish(r)
    if acc.is_main_process:  # a remote OUTPUT_DIR gets the metrics rows (and the export's probe) of the end too
        mirror(work_dir(cfg), location(cfg.output_dir), MIRRORED)
    r.close()
    return PREEMPTED if stopped else OK  # a stop that saved is not a success


def roll_back(r: Run, reason: str) -> None:
    """Back to the newest checkpoint, past the batches that led to ``reason`` (train/worker/rollback.py):
    ``r.state`` is restored in place, so every name for it sees the rolled-back position."""
    progress.phase("checkpoint")
    main = r.acc.is_main_process
    restored = rollback.roll_back(r.ckpt, checkpoint_root(r.cfg), r.state, reason, r.cfg.train.max_rollbacks,
                                  r.log if main else None)
    vars(r.state).update(vars(restored))
    if main:
        r.ckpt.extra["events"] = progress.event_counts(r.log.path)


def finish(r: Run) -> None:
    """After the last step: the final evaluation (unless that step had one) and the export."""
    cfg, step = r.cfg, r.state.step
    if not (cfg.train.eval_every and step % cfg.train.eval_every == 0):
        r.log.log({"step": step, **evaluate(r)})
    if cfg.checkpoint.export:
        work = work_dir(cfg)  # OUTPUT_DIR, or node-local scratch for a URL: uploaded below
        out = export_final(r.acc, r.model, r.tokenizer, work / "final", r.config_yaml,
                           merge_lora=cfg.checkpoint.merge_lora, provenance=r.ckpt.extra.get("provenance"))
        save_probe(r.model, r.splits.eval, r.acc, work / "final_probe.pt")
        if out is not None:
            out = publish_export(out, location(cfg.output_dir) / "final")
            print(f"[train] exported {out} (load with AutoModelForCausalLM.from_pretrained)", flush=True)


def evaluate(r: Run) -> dict:
    """Loss and perplexity of every eval set (eval/NAME/loss, eval/NAME/ppl, eval/NAME/tokens)."""
    return evaluate_sets(r.model, r.evals, r.acc, r.cfg.train.micro_batch, r.cfg.data.seq_len, r.cfg.train.eval_tokens)


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
    try:
        code = train(cfg)
    except torch.OutOfMemoryError as e:
        rank = int(os.environ.get("RANK", "0"))
        snapshot = profiler.dump_oom_snapshot(str(work_dir(cfg)), rank)
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise Exit(f"rank {rank} ran out of GPU memory ({first}); the allocator's snapshot: {snapshot} (open it at "
                   "pytorch.org/memory_viz; log.memory_history=true adds who allocated what)", OUT_OF_MEMORY) from None
    progress.finished(code)
    sys.stdout.flush()
    # Some 2-process gloo runs hang at interpreter exit after training (docs/cpu-distributed.md); exit explicitly.
    os._exit(code)
