"""``make bench`` / ``python -m train bench``: one command, one Markdown table + JSON.

    python -m train bench [--quick] [--out DIR] [--rounds R] [--steps S] [--burn-in B]
                          [--threads T] [--strategies ddp,zero2,...] [KEY=value ...]

Sections (what each row means: bench-results/README.md):
  1. Loop overhead: our loop (train/loop.py) vs a minimal plain-PyTorch loop vs HF
     ``Trainer``, plus the plain loop inside the DDP wrapper accelerate puts around ours in
     a 1-process job - same ``build_model``, packed data, micro-batch, seq_len, precision
     and torch thread count; one process per run, kinds alternating (A B C D, then D C B A,
     ...), burn-in steps excluded, medians of all rounds' steps and per-round ratios.
  2. Strategies: tokens/s of every strategy with 2 processes at the same global batch,
     started exactly as users start them (``python -m train STRATEGY=... NPROC=2``).
  3. Data: useful-token fraction of the packed pipeline vs padding each line to seq_len.
  4. Memory: per-rank bytes of parameters, gradients, optimizer state measured in those runs
     (train/loop.py's ``held_bytes``) vs the ZeRO formulas (train/plan.py's ``held_bytes``).
  5. Precision: fp32 vs bf16 step time and peak memory of our loop (measured, not asserted).
  6. Launch to first completed step, split at the launcher's and the loop's first lines.

What is timed: the time between the ends of consecutive optimizer steps, with a host sync
every step (the loss is read every step: LOG_EVERY=1 for our loop, ``loss.item()`` in the
plain loop, ``logging_steps=1`` for Trainer). A step so includes data loading, forward,
backward, clipping, the optimizer and scheduler step, zeroing gradients and per-step
logging. Both wall time and process CPU time are recorded; on a CPU shared with other jobs
(where the wall clock also measures the neighbours) the ratios use CPU time with one
thread per process. Our loop runs as the process ``accelerate launch`` starts for a
1-process job (``python -m train worker`` with torchrun's environment), so its thread count
can be set like the others'; the launcher always gives cores // NPROC threads. Process
start-up is timed separately (section 6).

Results go to ``<out>/<model>_<hardware>_<date>.md`` and ``.json`` (a ``-2``, ``-3`` ...
suffix instead of overwriting), with the commit, a dirty flag, versions, thread count and
the machine's load average: on a shared machine the load is what makes two runs differ.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from .config import ConfigError, RunConfig, load_config
from .strategies import GRADS, OPTIM, PARAMS, REPO_ROOT, STRATEGIES

QUICK = {"MODEL": "llama-debug", "SEQ_LEN": "32", "MICRO_BATCH": "4"}
TARGET_OVERHEAD = 1.02  # our loop's median step time / the plain loop's
TARGET_USEFUL = 0.999
TARGET_MEMORY = 0.05  # |measured / formula - 1| for N=2
RUN_TIMEOUT_S = 600


# -- child processes --------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_env(extra: dict | None = None) -> dict:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OUTPUT_DIR",
            "NPROC", "STRATEGY", "PRECISION", "RESUME", "ACCELERATE_CONFIG")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def _spawn(cmd: list[str], env: dict, timeout: float, marks: dict[str, str]) -> dict:
    """Run a command; timestamp (seconds after start) the first stdout line matching each mark."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    seen: dict[str, float] = {}
    tail: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            now = time.perf_counter() - t0
            tail.append(line)
            del tail[:-60]
            for name, pattern in marks.items():
                if name not in seen and re.search(pattern, line):
                    seen[name] = now

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the job's own session: launcher, accelerate, ranks
        proc.wait()
        rc = "timeout"
    reader.join(timeout=10)
    return {"rc": rc, "wall_s": time.perf_counter() - t0, "marks": seen, "tail": "".join(tail)}


def _run_args(s: dict, out: Path, **over) -> list[str]:
    args = {"MODEL": s["model"], "SEQ_LEN": s["seq_len"], "MICRO_BATCH": s["micro_batch"], "DEVICE": s["device"],
            "LOG_EVERY": 1, "MAX_STEPS": s["steps"], "CHECKPOINT_EVERY": 0, "OUTPUT_DIR": out, "RESUME": "never",
            "checkpoint.export": "false", "log.tensorboard": "false", "log.progress": "false",
            "train.eval_every": 0, "train.eval_batches": 1, "GRAD_ACCUM": 1, "GLOBAL_BATCH": 0}
    args.update(over)
    return [f"{k}={v}" for k, v in args.items()]


def run_job(s: dict, workdir: Path, *, strategy: str, nproc: int = 2, precision: str = "no") -> dict:
    """A real job exactly as users start it, ``python -m train`` (launcher -> accelerate launch ->
    ranks); per-step wall times, tokens/s and held bytes come from its metrics.jsonl."""
    out = Path(tempfile.mkdtemp(prefix=f"job-{strategy}-", dir=workdir))
    args = _run_args(s, out, NPROC=nproc, STRATEGY=strategy, PRECISION=precision, MASTER_PORT=_free_port())
    res = _spawn([sys.executable, "-m", "train", *args], _child_env(), RUN_TIMEOUT_S,
                 {"launcher": r"^\[launch\]", "engaged": r"^\[train\] strategy=", "first_step": r"^step=1 "})
    rows = _metrics(out)
    burn = s["burn_in"]
    result = {"kind": "job", "nproc": nproc, "strategy": strategy, "precision": precision, "rc": res["rc"],
              "wall_s": res["wall_s"], "marks": res["marks"],
              "step_times": [r["step_time_s"] for r in rows][burn:],
              "tokens_per_second": [r["tokens_per_second"] for r in rows][burn:],
              "losses": [r["loss"] for r in rows],
              "held_bytes": rows[0].get("held_bytes") if rows else None,
              "peak_memory_mb": max((r["peak_memory_mb"] for r in rows), default=None),
              "threads": max(1, (os.cpu_count() or 1) // nproc) if s["device"] == "cpu" else None}  # launcher's rule
    if res["rc"] != 0 or len(rows) < s["steps"]:
        result["error"] = f"exit {res['rc']} after {len(rows)} of {s['steps']} steps:\n{res['tail'][-3000:]}"
    return result


def _metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


def run_single(kind: str, s: dict, workdir: Path, precision: str = "no") -> dict:
    """One single-process run of ``kind`` (ours | plain | plain-ddp | trainer), ``bench --worker KIND``.

    All get the same ``OMP_NUM_THREADS`` / ``torch.set_num_threads``. ``ours`` and
    ``plain-ddp`` also get the environment torchrun gives a 1-process job (what
    ``python -m train NPROC=1`` runs under: a gloo group of one, DDP-wrapped by accelerate).
    """
    from .distributed import ENV_EXPECTED_WORLD, worker_env

    out = Path(tempfile.mkdtemp(prefix=f"{kind}-{precision}-", dir=workdir))
    result_path = out / "bench-result.json"
    env = {"OMP_NUM_THREADS": str(s["threads"])}
    if kind in ("ours", "plain-ddp"):
        env.update(worker_env(STRATEGIES["ddp"], s["device"]))
        env.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), ENV_EXPECTED_WORLD: "1",
                    "ACCELERATE_MIXED_PRECISION": precision})
    cmd = [sys.executable, "-m", "train", "bench", "--worker", kind, "--result", str(result_path),
           "--steps", str(s["steps"]), "--threads", str(s["threads"]),
           *_run_args(s, out, PRECISION=precision, NPROC=1, STRATEGY="ddp")]
    res = _spawn(cmd, _child_env(env), RUN_TIMEOUT_S,
                 {"engaged": r"^(\[train\] strategy=|\[bench\] built)", "first_step": r"^(step=1 |\[bench\] step 1 )"})
    result = {"kind": kind, "precision": precision, "rc": res["rc"], "wall_s": res["wall_s"], "marks": res["marks"]}
    try:
        data = json.loads(result_path.read_text())
    except (OSError, ValueError):
        data = {}
    result.update(data)
    burn = s["burn_in"]
    result["step_times"] = data.get("step_times", [])[burn:]
    result["cpu_times"] = data.get("cpu_times", [])[burn:]
    if res["rc"] != 0 or len(data.get("step_times", [])) < s["steps"]:
        result["error"] = f"exit {res['rc']}:\n{res['tail'][-3000:]}"
    return result


# -- the single-process loops (each runs inside a `bench --worker` process) -----------------------
class _Clock:
    """Wall and process CPU time between consecutive ``lap`` calls (CPU time counts every
    thread of the process and none of the neighbours': the steady measure on a shared machine)."""

    def __init__(self):
        self.wall, self.cpu = [], []
        self.reset()

    def reset(self) -> None:
        self._w, self._c = time.perf_counter(), time.process_time()

    def lap(self) -> None:
        w, c = time.perf_counter(), time.process_time()
        self.wall.append(w - self._w)
        self.cpu.append(c - self._c)
        self._w, self._c = w, c


def ours_loop(cfg: RunConfig, steps: int, threads: int) -> dict:
    """train/loop.py's ``train()`` unchanged; its StepTimer.lap (called at every log, LOG_EVERY=1)
    also reads the process CPU time, at the same points as the wall clock it already reads."""
    import torch

    from . import loop, metrics

    torch.set_num_threads(threads)
    clock = _Clock()
    init, lap = metrics.StepTimer.__init__, metrics.StepTimer.lap

    def timed_init(self, device):
        init(self, device)
        clock.reset()

    def timed_lap(self):
        dt = lap(self)
        clock.lap()
        return dt

    metrics.StepTimer.__init__, metrics.StepTimer.lap = timed_init, timed_lap
    loop.train(cfg)
    rows = _metrics(Path(cfg.output_dir))
    return {"step_times": [r["step_time_s"] for r in rows], "cpu_times": clock.cpu[:len(rows)],
            "losses": [r["loss"] for r in rows], "threads": torch.get_num_threads(),
            "peak_memory_mb": max((r["peak_memory_mb"] for r in rows), default=None)}


def _setup(cfg: RunConfig, threads: int):
    import torch
    from accelerate.utils import set_seed

    from . import data as data_mod
    from .distributed import resolve_device
    from .model import build_model, load_tokenizer

    torch.set_num_threads(threads)
    device = torch.device(resolve_device(cfg.launch.device))
    tok = load_tokenizer(cfg.model)
    set_seed(cfg.seed)  # as train/loop.py does right before building a preset
    model = build_model(cfg.model, len(tok)).to(device)
    splits = data_mod.build_splits(cfg.data, tok, cfg.seed)
    print("[bench] built", flush=True)
    return torch, device, model, splits


def plain_loop(cfg: RunConfig, steps: int, threads: int, ddp: bool = False) -> dict:
    """The minimal loop: same model, data order, optimizer, schedule and clipping as ours.

    ``ddp=True`` wraps the model in DistributedDataParallel over a process group of one,
    which is what accelerate does to our loop in a 1-process job: the difference between
    the two plain variants is the cost of that wrapper, not of our loop.
    """
    from . import data as data_mod
    from .loop import build_optimizer, build_scheduler

    torch, device, model, splits = _setup(cfg, threads)
    if ddp:
        torch.distributed.init_process_group("gloo" if device.type == "cpu" else "nccl")
        model = torch.nn.parallel.DistributedDataParallel(model)
    mb = cfg.train.micro_batch
    sampler = data_mod.GlobalCursorSampler(len(splits.train), mb, cfg.seed)
    loader = data_mod.train_loader(splits.train, sampler, mb, cfg.data)
    optimizer = build_optimizer(model, cfg, device.type)
    scheduler = build_scheduler(optimizer, cfg)
    half = cfg.train.precision == "bf16"
    clock, losses = _Clock(), []
    model.train()
    batches = iter(loader)
    clock.reset()
    for step in range(1, steps + 1):
        x = next(batches)["input_ids"].to(device, non_blocking=True)
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
    return {"step_times": clock.wall, "cpu_times": clock.cpu, "losses": losses, "threads": torch.get_num_threads(),
            "peak_memory_mb": _peak_mb(torch, device)}


def trainer_loop(cfg: RunConfig, steps: int, threads: int) -> dict:
    """HF ``Trainer`` on the same model and packed blocks, same hyperparameters."""
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from .data import collate

    torch, device, model, splits = _setup(cfg, threads)

    class Blocks(Dataset):  # Trainer passes every key to the model: drop the audit index
        def __len__(self):
            return len(splits.train)

        def __getitem__(self, i):
            x = splits.train.blocks[i]
            return {"input_ids": x, "labels": x}

    clock = _Clock()

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            clock.reset()

        def on_step_end(self, args, state, control, **kw):
            clock.lap()
            if state.global_step == 1:
                print("[bench] step 1 done", flush=True)

    O = cfg.optim
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=cfg.train.micro_batch, max_steps=steps,
            learning_rate=O.lr, weight_decay=O.weight_decay, adam_beta1=O.beta1, adam_beta2=O.beta2,
            adam_epsilon=O.eps, max_grad_norm=O.grad_clip, warmup_steps=O.warmup_steps,
            lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": O.min_lr_ratio},
            logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, seed=cfg.seed,
            use_cpu=device.type == "cpu", bf16=cfg.train.precision == "bf16", dataloader_num_workers=0,
            optim="adamw_torch_fused" if device.type == "cuda" else "adamw_torch")
        trainer = Trainer(model=model, args=args, train_dataset=Blocks(), data_collator=collate, callbacks=[Clock()])
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"step_times": clock.wall, "cpu_times": clock.cpu, "losses": losses, "threads": torch.get_num_threads(),
            "peak_memory_mb": _peak_mb(torch, device)}


def _peak_mb(torch, device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- data efficiency ------------------------------------------------------------------------
def data_efficiency(cfg: RunConfig) -> dict:
    """Useful tokens of the packed pipeline vs padding each line (document) to seq_len."""
    from .data import load_text, tokenize_and_pack
    from .model import load_tokenizer

    tok = load_tokenizer(cfg.model)
    tokenized, packed = tokenize_and_pack(load_text(cfg.data), tok, cfg.data)
    lengths = [len(x) for x in tokenized["input_ids"]]  # each document with its EOS
    S, raw = cfg.data.seq_len, sum(lengths)
    kept_packed = len(packed) * S
    kept_padded = sum(min(n, S) for n in lengths)
    mb = cfg.train.micro_batch
    batches = [lengths[i:i + mb] for i in range(0, len(lengths), mb)]
    computed_dynamic = sum(len(b) * min(max(b), S) for b in batches)
    return {
        "documents": len(lengths), "corpus_tokens": raw, "seq_len": S,
        "mean_document_tokens": raw / len(lengths), "max_document_tokens": max(lengths),
        "packed": {"computed": kept_packed, "useful": kept_packed, "useful_fraction": 1.0,
                   "corpus_fraction": kept_packed / raw},
        "pad_to_max_length": {"computed": len(lengths) * S, "useful": kept_padded,
                              "useful_fraction": kept_padded / (len(lengths) * S), "corpus_fraction": kept_padded / raw},
        "pad_to_longest_in_batch": {"computed": computed_dynamic, "useful": kept_padded,
                                    "useful_fraction": kept_padded / computed_dynamic,
                                    "corpus_fraction": kept_padded / raw},
    }


# -- statistics and report ------------------------------------------------------------------
def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _pooled(runs: list[dict], key: str = "step_times") -> list[float]:
    return [x for r in runs if "error" not in r for x in r.get(key, [])]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def hardware() -> dict:
    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "gpu": None, "gpus": 0}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    if torch.cuda.is_available():
        info["gpu"], info["gpus"] = torch.cuda.get_device_name(0), torch.cuda.device_count()
    short = re.sub(r"\b(processor|\d+-core|cpu|with.*)\b", "", info["cpu"], flags=re.I)
    info["slug"] = (f"{info['gpus']}x-{_slug(info['gpu'])}" if info["gpu"]
                    else f"cpu{info['cores']}-{'-'.join(_slug(short).split('-')[:3])}")
    return info


def _git() -> dict:
    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    dirty = git("status", "--porcelain", "--", "train", "configs")
    return {"commit": git("rev-parse", "HEAD") or "unknown", "dirty": bool(dirty)}


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "accelerate", "deepspeed", "datasets"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _fmt(x, spec: str = ".3g", none: str = "n/a") -> str:
    return none if x is None else format(x, spec)


def _range(xs: list[float]) -> str:
    return f"{min(xs):.3f}-{max(xs):.3f}" if xs else "n/a"


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _mb(b) -> str:
    return "n/a" if b is None else f"{b / 2**20:.3f}"


def _md_table(head: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def render_markdown(rep: dict) -> str:
    m, s = rep["meta"], rep["settings"]
    L: list[str] = [
        f"# Benchmark: {s['model']} on {m['hardware']['slug']}, {m['date']}", "",
        f"- commit `{m['git']['commit'][:12]}`{' (uncommitted changes in train/ or configs/)' if m['git']['dirty'] else ''}, "
        f"`{m['command']}`",
        f"- hardware: {m['hardware']['cpu']} ({m['hardware']['cores']} cores)"
        + (f", {m['hardware']['gpus']}x {m['hardware']['gpu']}" if m['hardware']['gpu'] else ", no GPU"),
        f"- versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v),
        f"- config: model {s['model']} ({rep['model']['params']:,} parameters, {rep['model']['flops_per_token']:.4g} "
        f"FLOPs/token), seq_len {s['seq_len']}, micro_batch {s['micro_batch']}, device {s['device']}, "
        f"{s['threads']} torch thread(s) per single-process run, {s['steps']} steps per run of which the first "
        f"{s['burn_in']} are burn-in, {s['rounds']} round(s)",
        f"- machine load average (1 min) at start / end: {m['load_start']:.2f} / {m['load_end']:.2f} "
        f"on {m['hardware']['cores']} cores; total bench time {m['duration_s']:.0f} s", "",
    ]
    # 1
    o = rep["loop_overhead"]
    cpu = o["primary"] == "cpu"
    L += ["## 1. Loop overhead: our loop vs plain PyTorch vs HF Trainer", "",
          "Single process each, same model construction, packed data, micro-batch, seq_len, precision "
          f"({o['precision']}) and {s['threads']} torch thread(s); runs alternate (order reversed every other round) "
          "and the medians pool all rounds' post-burn-in steps. "
          + ("The ratios that count are of process CPU time per step: on this shared CPU machine the wall clock "
             "also measures the other jobs' load (both are shown)." if cpu else ""), ""]
    rows = []
    labels = {"ours": "our loop (train/loop.py, 1 process)",
              "plain-ddp": "plain loop + DDP wrapper (world of 1)",
              "plain": "plain PyTorch loop", "trainer": "HF `Trainer`"}
    for key in LOOPS:
        v = o[key]
        rows.append([labels[key], _fmt(v["median_step_s"], ".4f"), _fmt(v["median_cpu_s"], ".4f"),
                     _fmt(v["tokens_per_second"], ".1f"), _fmt(v["ratio_to_plain"], ".3f"),
                     _fmt(v["cpu_ratio_to_plain"], ".3f"), _fmt(v["achieved_tflops"], ".3g"), _fmt(v["mfu"], ".1%"),
                     " / ".join(_fmt(x, ".4f") for x in v["round_medians"]),
                     " / ".join(_fmt(x, ".3f") for x in v.get("round_ratios_to_plain", [])),
                     v["steps_timed"], _fmt(v["threads"], "d")])
    clk = "CPU" if cpu else "wall"
    L += _md_table(["loop", "median step, wall (s)", "median step, CPU (s)", "tokens/s (wall)", "wall / plain",
                    "CPU / plain", "achieved TFLOP/s", "MFU", f"per-round medians, {clk} (s)",
                    f"per-round {clk} / plain", "steps timed", "threads"], rows)
    parity = o.get("loss_parity_max_abs_diff")
    if parity is not None:
        L += ["", f"Same work? max |our loss - plain loss| over the {o['parity_steps']} shared steps: {parity:.2e} "
                  "(same seed, initial weights, data order, optimizer, schedule and clipping)."]
    L += ["", "`plain loop + DDP wrapper` is the plain loop with the model wrapped the way accelerate wraps ours in "
              "a 1-process job (`python -m train NPROC=1`: torchrun, a process group of one, DDP): the gap from "
              "`plain` is that wrapper's cost, the gap from it to ours is the loop's own.", ""]
    # 2
    st = rep["strategies"]
    L += ["## 2. Strategies: 2 processes, same global batch", "",
          f"Global batch {st['global_batch']} sequences = 2 ranks x micro_batch {s['micro_batch']} "
          f"({st['global_batch'] * s['seq_len']} tokens/step), precision {st['precision']}, "
          f"{st['threads_per_rank']} thread(s) per rank.", ""]
    rows = []
    for r in st["rows"]:
        rows.append([r["strategy"], _fmt(r.get("median_step_s"), ".4f"), _fmt(r.get("tokens_per_second"), ".1f"),
                     _fmt(r.get("relative_to_ddp"), ".2f"), _fmt(r.get("peak_memory_mb"), ".0f"),
                     r.get("error_short", "ok")])
    L += _md_table(["strategy", "median step (s)", "tokens/s (global)", "vs ddp", "peak RSS rank 0 (MB)", "status"], rows)
    if st.get("note"):
        L += ["", st["note"]]
    L += [""]
    # 3
    d = rep["data"]
    L += ["## 3. Data pipeline: useful tokens, packed vs padded", "",
          f"Corpus {s['dataset']}: {d['documents']:,} documents (lines), {d['corpus_tokens']:,} tokens with EOS, "
          f"mean {d['mean_document_tokens']:.1f} / max {d['max_document_tokens']} tokens per document; blocks of "
          f"{d['seq_len']} tokens.", ""]
    rows = []
    for key, label in (("packed", "packed (train/data.py)"), ("pad_to_max_length", "pad each line to seq_len"),
                       ("pad_to_longest_in_batch", f"pad to longest in micro-batch of {s['micro_batch']}")):
        v = d[key]
        rows.append([label, f"{v['computed']:,}", f"{v['useful']:,}", _pct(v["useful_fraction"]),
                     _pct(v["corpus_fraction"])])
    L += _md_table(["layout", "tokens computed", "real tokens", "useful fraction (real / computed)",
                    "corpus tokens trained on"], rows)
    L += [""]
    # 4
    mem = rep["memory"]
    L += ["## 4. Memory per rank: measured vs ZeRO formulas (N=2)", "",
          f"P = {rep['model']['params']:,} parameters, fp32 (4 bytes), Adam moments 8 bytes/param. Measured = "
          "`held_bytes` of rank 0 right before the first optimizer step (MiB); formula = `train.plan.held_bytes`, "
          "which `python -m train plan` prints.", ""]
    rows = []
    for r in mem["rows"]:
        cells = [r["strategy"]]
        for cat in (PARAMS, GRADS, OPTIM):
            c = r.get(cat)
            if c is None:
                cells += ["n/a", "n/a"]
                continue
            mark = "" if c["within"] or c["exempt"] else " ✗"
            note = " ¹" if (r["strategy"] == "zero1" and cat == GRADS) else ""
            cells += [f"{_mb(c['measured'])} / {_mb(c['formula'])}{note}", f"{c['ratio']:.3f}{mark}"]
        cells.append(_mb(r.get("master_formula")) if r.get("master_formula") else "-")
        rows.append(cells)
    L += _md_table(["strategy", "params measured / formula", "ratio", "grads measured / formula", "ratio",
                    "optimizer measured / formula", "ratio", "DeepSpeed fp32 master (formula, not measured) ²"], rows)
    L += ["",
          "¹ ZeRO-1 holds full gradients (4P) through the backward pass, as the formula says; DeepSpeed partitions "
          "them right before the step, and the probe measures the gradients the optimizer steps on, so it sees 4P/N. "
          "Not counted in the ±5% target.",
          "² `optimizer` counts Adam's moments (exp_avg, exp_avg_sq). DeepSpeed also keeps an fp32 master copy of "
          "its partition (4P/N, even in fp32 training), which the planner lists as `master`; the probe does not "
          "measure it. Offload strategies hold the same bytes in CPU RAM (on these CPU runs everything is in RAM).", ""]
    # 5
    p = rep["precision"]
    L += ["## 5. Precision: fp32 vs bf16 (our loop, 1 process)", ""]
    rows = [[k, _fmt(p[k]["median_step_s"], ".4f"), _fmt(p[k]["median_cpu_s"], ".4f"),
             _fmt(p[k]["tokens_per_second"], ".1f"), _fmt(p[k]["peak_memory_mb"], ".0f"),
             _fmt(p[k]["final_loss"], ".4f")] for k in ("fp32", "bf16")]
    L += _md_table(["precision", "median step, wall (s)", "median step, CPU (s)", "tokens/s (wall)",
                    "peak memory (MB)", "loss at last step"], rows)
    L += ["", f"bf16 / fp32: step wall time {_fmt(p['step_time_ratio'], '.3f')}, CPU time "
              f"{_fmt(p['cpu_time_ratio'], '.3f')}, peak memory {_fmt(p['memory_ratio'], '.3f')}. "
              f"{p['memory_note']}", ""]
    # 6
    L += ["## 6. Launch to first completed step", "",
          "Seconds after the process starts (median over runs): `launcher` = config checked, about to exec "
          "`accelerate launch`; `engaged` = ranks started, imports done, model built, process group up (the "
          "loop's first line); `first step` = data built, `prepare` done, first optimizer step done.", ""]
    rows = [[r["run"], _fmt(r.get("launcher_s"), ".1f"), _fmt(r.get("engaged_s"), ".1f"), _fmt(r.get("first_step_s"), ".1f"),
             r["runs"]] for r in rep["startup"]]
    L += _md_table(["run", "launcher (s)", "engaged / model built (s)", "first step (s)", "runs"], rows)
    L += ["", "## Targets", ""]
    rows = [[t["target"], t["value"], "met" if t["met"] else ("not met" if t["met"] is False else "n/a"), t["note"]]
            for t in rep["targets"]]
    L += _md_table(["target", "measured", "status", "note"], rows)
    L += ["", "What is timed: wall and process CPU time between the ends of consecutive optimizer steps, with a "
              "host sync every step (LOG_EVERY=1 / `loss.item()` / `logging_steps=1`), burn-in steps excluded. "
              "See bench-results/README.md.", ""]
    return "\n".join(L)


# -- orchestration --------------------------------------------------------------------------
def _summ(runs: list[dict], tokens_per_step: int, primary: str) -> dict:
    """Medians over all rounds' post-burn-in steps (wall and CPU), per-round medians of ``primary``."""
    wall, cpu = _median(_pooled(runs, "step_times")), _median(_pooled(runs, "cpu_times"))
    key = "cpu_times" if primary == "cpu" else "step_times"
    return {"median_step_s": wall, "median_cpu_s": cpu, "tokens_per_second": tokens_per_step / wall if wall else None,
            "round_medians": [_median(r[key]) for r in runs if "error" not in r and r.get(key)],
            "steps_timed": len(_pooled(runs)), "runs": len(runs), "failed": sum("error" in r for r in runs),
            "peak_memory_mb": _median([r["peak_memory_mb"] for r in runs if r.get("peak_memory_mb")]),
            "threads": next((r.get("threads") for r in runs if r.get("threads")), None)}


LOOPS = ("ours", "plain-ddp", "plain", "trainer")


def run_bench(s: dict, cfg: RunConfig, workdir: Path, log) -> dict:
    from .flops import device_peak_flops, flops_per_token, mfu
    from .plan import held_bytes, load_model_config, model_shape

    conf = load_model_config(cfg)
    shape = model_shape(conf, cfg.model.name, cfg.model.trust_remote_code)
    fpt = flops_per_token(conf, s["seq_len"])
    tokens_per_step = s["micro_batch"] * s["seq_len"]
    # On a CPU shared with other jobs the wall clock also measures the neighbours; with one
    # thread per process, process CPU time measures only the loop's own work.
    primary = "cpu" if s["device"] == "cpu" and s["threads"] == 1 else "wall"

    # 1 + 5: alternate the single-process loops; order reversed every other round.
    runs: dict[str, list[dict]] = {k: [] for k in (*LOOPS, "ours-bf16")}
    order = [*LOOPS, "ours-bf16"]
    for rnd in range(s["rounds"]):
        for key in (order if rnd % 2 == 0 else order[::-1]):
            log(f"round {rnd + 1}/{s['rounds']}: {key}")
            if key == "ours-bf16":
                r = run_single("ours", s, workdir, precision="bf16")
            else:
                r = run_single(key, s, workdir)
            r["load"] = os.getloadavg()[0]
            runs[key].append(r)
            if "error" in r:
                log(f"  {key} failed: {r['error'][:2000]}")
    peak = device_peak_flops(s["device"], "no")
    overhead = {"precision": "no (fp32)", "primary": primary,
                "runs": {k: [_strip(r) for r in v] for k, v in runs.items()}}
    for key in LOOPS:
        v = _summ(runs[key], tokens_per_step, primary)
        tps = v["tokens_per_second"]
        v["achieved_tflops"] = tps * fpt / 1e12 if tps else None
        v["mfu"] = mfu(tps, fpt, peak) if tps else None
        overhead[key] = v
    for key in LOOPS:
        for clock, field in (("median_step_s", "ratio_to_plain"), ("median_cpu_s", "cpu_ratio_to_plain")):
            med, base = overhead[key][clock], overhead["plain"][clock]
            overhead[key][field] = med / base if med and base else None
        # Paired by round (runs of one round are minutes apart at most): the spread of these is
        # the noise floor the pooled ratio has to be read against.
        times = "cpu_times" if primary == "cpu" else "step_times"
        overhead[key]["round_ratios_to_plain"] = [
            _median(a[times]) / _median(b[times]) for a, b in zip(runs[key], runs["plain"])
            if "error" not in a and "error" not in b and a[times] and b[times]]
    ours_l = next((r["losses"] for r in runs["ours"] if "error" not in r), None)
    plain_l = next((r["losses"] for r in runs["plain"] if "error" not in r), None)
    if ours_l and plain_l:
        n = min(len(ours_l), len(plain_l))
        overhead["loss_parity_max_abs_diff"] = max(abs(a - b) for a, b in zip(ours_l[:n], plain_l[:n]))
        overhead["parity_steps"] = n

    fp32, bf16 = _summ(runs["ours"], tokens_per_step, primary), _summ(runs["ours-bf16"], tokens_per_step, primary)
    for v, rs in ((fp32, runs["ours"]), (bf16, runs["ours-bf16"])):
        v["final_loss"] = next((r["losses"][-1] for r in rs if r.get("losses")), None)

    def ratio(key: str, a: dict, b: dict):
        return a[key] / b[key] if a.get(key) and b.get(key) else None

    precision = {"fp32": fp32, "bf16": bf16, "step_time_ratio": ratio("median_step_s", bf16, fp32),
                 "cpu_time_ratio": ratio("median_cpu_s", bf16, fp32),
                 "memory_ratio": ratio("peak_memory_mb", bf16, fp32),
                 "memory_note": ("Peak memory on CPU is the process's peak resident set (all of Python, torch and the "
                                 "data), so the model's share is small at this size." if s["device"] == "cpu"
                                 else "Peak memory is torch.cuda.max_memory_allocated.")}

    # 2 + 4: every strategy with 2 processes at the same global batch.
    strategy_rows, memory_rows = [], []
    st_note = ""
    can_two = s["device"] == "cpu" or _cuda_count() >= 2
    for name in s["strategies"] if can_two else []:
        log(f"strategy {name} (2 processes)")
        r = run_job(s, workdir, strategy=name)
        r["load"] = os.getloadavg()[0]
        med = _median(r["step_times"])
        row = {"strategy": name, "median_step_s": med, "tokens_per_second": _median(r["tokens_per_second"]),
               "peak_memory_mb": r["peak_memory_mb"], "marks": r["marks"], "run": _strip(r)}
        if "error" in r:
            row["error_short"] = f"failed ({r['rc']})"
            log(f"  {name} failed: {r['error'][:2000]}")
        strategy_rows.append(row)
        formula = held_bytes(name, shape.params, 2, "no")
        mrow = {"strategy": name, "master_formula": formula["master"]}
        if r.get("held_bytes"):
            for cat in (PARAMS, GRADS, OPTIM):
                meas, theo = r["held_bytes"][cat], formula[cat]
                ratio = meas / theo if theo else None
                exempt = name == "zero1" and cat == GRADS
                mrow[cat] = {"measured": meas, "formula": theo, "ratio": ratio, "exempt": exempt,
                             "within": ratio is not None and abs(ratio - 1) <= TARGET_MEMORY}
        memory_rows.append(mrow)
    if not can_two:
        st_note = "Skipped: needs 2 GPUs (or DEVICE=cpu)."
    ddp_tps = next((r["tokens_per_second"] for r in strategy_rows if r["strategy"] == "ddp"), None)
    for r in strategy_rows:
        r["relative_to_ddp"] = r["tokens_per_second"] / ddp_tps if ddp_tps and r["tokens_per_second"] else None
    strategies = {"global_batch": 2 * s["micro_batch"], "precision": "no (fp32)", "rows": strategy_rows,
                  "threads_per_rank": max(1, (os.cpu_count() or 1) // 2) if s["device"] == "cpu" else None,
                  "note": st_note}

    # 3
    log("data efficiency")
    data = data_efficiency(cfg)

    # 6
    startup = []
    for label, rs in (("our loop, 1 process (`train worker`, no launcher)", runs["ours"] + runs["ours-bf16"]),
                      ("plain loop (no launcher)", runs["plain"]), ("HF Trainer (no launcher)", runs["trainer"])):
        startup.append(_startup_row(label, rs))
    for row in strategy_rows:
        startup.append(_startup_row(f"{row['strategy']}, 2 processes", [row["run"]]))

    targets = _targets(overhead, data, memory_rows)
    return {"model": {"name": s["model"], "params": shape.params, "matmul_params": shape.matmul_params,
                      "flops_per_token": fpt},
            "loop_overhead": overhead, "strategies": strategies, "data": data, "memory": {"rows": memory_rows},
            "precision": precision, "startup": startup, "targets": targets}


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _strip(r: dict) -> dict:
    return {k: v for k, v in r.items() if k not in ("tail",)}


def _startup_row(label: str, runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    marks = lambda k: _median([r["marks"][k] for r in ok if k in r.get("marks", {})])  # noqa: E731
    return {"run": label, "launcher_s": marks("launcher"), "engaged_s": marks("engaged"),
            "first_step_s": marks("first_step"), "runs": len(ok)}


def _targets(overhead: dict, data: dict, memory_rows: list[dict]) -> list[dict]:
    cpu = overhead["primary"] == "cpu"
    clock, rkey, name = ("median_cpu_s", "cpu_ratio_to_plain", "CPU time") if cpu else \
        ("median_step_s", "ratio_to_plain", "wall time")
    ratio, wall_ratio = overhead["ours"].get(rkey), overhead["ours"].get("ratio_to_plain")
    rr = overhead["ours"].get("round_ratios_to_plain") or []
    t_ours, t_tr = overhead["ours"][clock], overhead["trainer"][clock]
    useful = min(data["packed"]["useful_fraction"], data["packed"]["corpus_fraction"])
    checked = [(r["strategy"], cat, c) for r in memory_rows for cat in (PARAMS, GRADS, OPTIM)
               if (c := r.get(cat)) and not c["exempt"]]
    worst = max(checked, key=lambda x: abs(x[2]["ratio"] - 1), default=None)
    return [
        {"target": f"our loop <= {TARGET_OVERHEAD}x the plain loop's step time",
         "value": f"{_fmt(ratio, '.3f')}x ({name})", "met": None if ratio is None else ratio <= TARGET_OVERHEAD,
         "note": f"median step {name}, pooled post-burn-in steps; per-round ratios {_range(rr)}"
                 + (f"; wall-clock ratio {_fmt(wall_ratio, '.3f')}x" if cpu else "")},
        {"target": "our loop faster than HF Trainer",
         "value": f"{_fmt(t_ours, '.4f')} s vs {_fmt(t_tr, '.4f')} s ({name})",
         "met": None if not (t_ours and t_tr) else t_ours < t_tr, "note": ""},
        {"target": f">= {TARGET_USEFUL:.1%} useful tokens (packed)", "value": _pct(useful),
         "met": useful >= TARGET_USEFUL, "note": "min of real/computed and corpus tokens kept"},
        {"target": f"per-rank bytes within {TARGET_MEMORY:.0%} of the ZeRO formulas (N=2)",
         "value": (f"worst {worst[0]} {worst[1]}: {worst[2]['ratio']:.3f}" if worst else "n/a"),
         "met": None if worst is None else all(c["within"] for _, _, c in checked),
         "note": "ZeRO-1 gradients excluded (footnote 1 of section 4)"},
    ]


def _out_paths(out_dir: Path, model: str, hw: str, date: str) -> tuple[Path, Path]:
    stem = f"{_slug(model)}_{hw}_{date}"
    n = 1
    while True:
        name = stem if n == 1 else f"{stem}-{n}"
        md, js = out_dir / f"{name}.md", out_dir / f"{name}.json"
        if not md.exists() and not js.exists():
            return md, js
        n += 1


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m train bench", description=__doc__.split("\n\n")[0],
                                     epilog="Other arguments are run-config overrides (MODEL=..., SEQ_LEN=..., "
                                            "MICRO_BATCH=..., DEVICE=...).")
    parser.add_argument("--quick", action="store_true", help="tiniest setting (llama-debug, 32 tokens, 4 sequences), "
                        "1 round, ddp+zero2+fsdp: a smoke run, not a measurement")
    parser.add_argument("--out", default=str(REPO_ROOT / "bench-results"), help="output directory")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds of the single-process runs")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run")
    parser.add_argument("--burn-in", type=int, default=None, help="first steps of each run not timed")
    parser.add_argument("--strategies", default=None, help="comma-separated (default: every strategy this device runs)")
    parser.add_argument("--worker", choices=("ours", "plain", "plain-ddp", "trainer"), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of every single-process run (default: 1 on CPU, where 2 threads on a "
                             "busy 2-core machine make step times erratic; all cores on CUDA)")
    args, rest = parser.parse_known_args(argv)

    if args.worker:
        cfg = load_config(rest)
        fn = {"ours": ours_loop, "plain": plain_loop, "trainer": trainer_loop,
              "plain-ddp": lambda c, n, t: plain_loop(c, n, t, ddp=True)}[args.worker]
        result = fn(cfg, args.steps, args.threads or 1)
        Path(args.result).write_text(json.dumps(result))
        sys.stdout.flush()
        os._exit(0)

    if args.quick:
        rest = [f"{k}={v}" for k, v in QUICK.items()] + rest
    cfg = load_config(rest)
    from .distributed import resolve_device

    device = resolve_device(cfg.launch.device)
    if args.strategies:
        names = [n.strip() for n in args.strategies.split(",") if n.strip()]
        bad = [n for n in names if n not in STRATEGIES]
        if bad:
            raise ConfigError(f"--strategies: unknown {', '.join(bad)}; allowed: {', '.join(STRATEGIES)}")
    elif args.quick:
        names = ["ddp", "zero2", "fsdp"]
    else:
        names = [n for n, st in STRATEGIES.items() if device == "cuda" or not st.gpu_only]
    steps = args.steps or (8 if args.quick else 16)
    burn = args.burn_in if args.burn_in is not None else (3 if args.quick else 4)
    if steps <= burn:
        raise ConfigError(f"--steps={steps} must be larger than --burn-in={burn}")
    s = {"model": cfg.model.name, "seq_len": cfg.data.seq_len, "micro_batch": cfg.train.micro_batch,
         "dataset": cfg.data.dataset, "device": device, "steps": steps, "burn_in": burn,
         "rounds": args.rounds or (1 if args.quick else 4), "strategies": names,
         "threads": args.threads or (1 if device == "cpu" else (os.cpu_count() or 1)), "quick": args.quick}
    hw = hardware()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    load_start = os.getloadavg()[0]
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[bench {time.perf_counter() - t0:6.0f}s] {msg}", flush=True)

    log(f"model {s['model']}, seq_len {s['seq_len']}, micro_batch {s['micro_batch']}, {s['rounds']} round(s) x "
        f"{s['steps']} steps, strategies {','.join(names)}; results in {out_dir}")
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        rep = run_bench(s, cfg, Path(tmp), log)
    date = datetime.fromtimestamp(started, timezone.utc).strftime("%Y-%m-%d")
    rep["settings"] = s
    rep["meta"] = {"date": date, "started_utc": datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds"),
                   "git": _git(), "versions": _versions(), "hardware": hw,
                   "command": "python -m train bench " + " ".join(argv), "load_start": load_start,
                   "load_end": os.getloadavg()[0], "duration_s": time.perf_counter() - t0}
    md_path, json_path = _out_paths(out_dir, s["model"], hw["slug"], date)
    json_path.write_text(json.dumps(rep, indent=1, default=str) + "\n")
    md_path.write_text(render_markdown(rep))
    print(render_markdown(rep))
    log(f"wrote {md_path} and {json_path}")
