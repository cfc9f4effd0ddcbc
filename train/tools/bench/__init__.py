"""``make bench`` / ``python -m train bench``: one command, one Markdown table + JSON.

    python -m train bench [--quick] [--out DIR] [--rounds R] [--steps S] [--burn-in B]
                          [--threads T] [--strategies ddp,zero2,...] [KEY=value ...]

Sections (what each row means: bench-results/README.md):
  1. Loop overhead: our loop (train/worker/loop.py) vs a minimal plain-PyTorch loop vs HF
     ``Trainer``, plus the plain loop inside the process group of one that ours has in a
     1-process job - same ``build_model``, packed data, micro-batch, seq_len, precision
     and torch thread count; one process per run, kinds alternating (A B C D, then D C B A,
     ...), burn-in steps excluded, medians of all rounds' steps and per-round ratios.
  2. Strategies: tokens/s of every strategy with 2 processes at the same global batch,
     started exactly as users start them (``python -m train STRATEGY=... NPROC=2``).
  3. Data: useful-token fraction of the packed pipeline vs padding each line to seq_len.
  4. Memory: per-rank bytes of parameters, gradients, optimizer state measured in those runs
     (train/worker/loop.py's ``held_bytes``) vs the ZeRO formulas (train/tools/plan.py's ``held_bytes``).
  5. Precision: fp32 vs bf16 step time and peak memory of our loop (measured, not asserted).
  6. Launch to first completed step, split at the launcher's and the loop's first lines.
  7. Checkpoint stall: seconds the loop is blocked per checkpoint save (``checkpoint_stall_s``),
     synchronous for every strategy and, for FSDP, with ``ASYNC_SAVE=true`` (its ratio to
     synchronous); ``--quick`` reads the one save at the end of each section-2 run. The same
     saves to object storage (``OUTPUT_DIR=s3://...``; ``--s3 URL``, else a local moto server),
     with their upload seconds and their ratio to the local save.
  8. Data at scale (train/bench/data.py): prepare tokens/s vs the tokenizers library's own
     encode_batch on the same cores and vs one process running datasets.map; peak RSS and
     launch-to-first-step of a 2-rank job from a small and a generated multi-GB prepared corpus.

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

The package: ``settings.py`` (what a run measures), ``measure.py`` (the child processes),
``loops.py`` (the single-process loops, one per ``--worker`` process), ``report.py`` (medians,
ratios, targets, Markdown). Our loop is measured as it is: its own ``StepTimer`` writes wall
and CPU time per step (``step_time_s``, ``cpu_time_per_step_s``) to metrics.jsonl.

Results go to ``<out>/<model>_<hardware>_<date>.md`` and ``.json`` (a ``-2``, ``-3`` ...
suffix instead of overwriting), with the commit, a dirty flag, versions, thread count and
the machine's load average: on a shared machine the load is what makes two runs differ.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from train.config import ConfigError, load_config
from train.config.strategies import REPO_ROOT, STRATEGIES
from train.tools.bench.measure import collect
from train.tools.bench.report import git_state, hardware, out_paths, render_markdown, summarize, versions
from train.tools.bench.settings import QUICK, BenchSettings


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m train bench", description=__doc__.split("\n\n")[0],
                                     epilog="Other arguments are run-config overrides (MODEL=..., SEQ_LEN=..., "
                                            "MICRO_BATCH=..., DEVICE=...).")
    parser.add_argument("--quick", action="store_true", help="tiniest setting (llama-debug, 32 tokens, 4 sequences), "
                        "1 round, ddp+zero2+fsdp (+ fsdp with ASYNC_SAVE=true): a smoke run, not a measurement")
    parser.add_argument("--out", default=str(REPO_ROOT / "bench-results"), help="output directory")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds of the single-process runs")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run")
    parser.add_argument("--burn-in", type=int, default=None, help="first steps of each run not timed")
    parser.add_argument("--strategies", default=None, help="comma-separated (default: every strategy this device runs)")
    parser.add_argument("--data-text-mb", type=float, default=None, help="section 8: MB of generated text to "
                        "prepare (default 50; --quick 1)")
    parser.add_argument("--data-gb", type=float, default=None, help="section 8: GB of the large generated prepared "
                        "corpus trained from beside a small one (default 4; --quick 0 = no such jobs)")
    parser.add_argument("--s3", default="", metavar="URL", help="section 7: an s3:// prefix to save to beside the "
                        "local disk (credentials as for a run: AWS_*); default: a local moto server when moto is "
                        "installed (the dev extra), else no object-storage rows")
    parser.add_argument("--worker", choices=("ours", "plain", "plain-pg", "trainer"), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--until", help=argparse.SUPPRESS)  # a partner run: waits for <FILE>.go, stops once FILE exists
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of every single-process run (default: 1 on CPU, where 2 threads on a "
                             "busy 2-core machine make step times erratic; all cores on CUDA)")
    args, rest = parser.parse_known_args(argv)

    if args.worker:
        from train.tools.bench.loops import WORKERS

        cfg = load_config(rest)
        until = {"until": args.until} if args.until else {}
        result = WORKERS[args.worker](cfg, args.steps, args.threads or 1, **until)
        Path(args.result).write_text(json.dumps(result))
        sys.stdout.flush()
        os._exit(0)

    if args.quick:
        rest = [f"{k}={v}" for k, v in QUICK.items()] + rest
    cfg = load_config(rest)
    from train.worker.accelerator import resolve_device

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
    # --quick: 24 steps, 21 timed (~10 ms each): with 8 the timed window (~50 ms) could close before the
    # partner beside a loop finished one whole step (it starts cold, polling for `go`), and the pairing failed.
    steps = args.steps or (24 if args.quick else 16)
    burn = args.burn_in if args.burn_in is not None else (3 if args.quick else 4)
    if steps <= burn:
        raise ConfigError(f"--steps={steps} must be larger than --burn-in={burn}")
    s = BenchSettings(model=cfg.model.name, seq_len=cfg.data.seq_len, micro_batch=cfg.train.micro_batch,
                      dataset=cfg.data.dataset, device=device, steps=steps, burn_in=burn,
                      rounds=args.rounds or (1 if args.quick else 4), strategies=names,
                      threads=args.threads or (1 if device == "cpu" else (os.cpu_count() or 1)), quick=args.quick,
                      data_text_mb=args.data_text_mb if args.data_text_mb is not None else (1 if args.quick else 50),
                      data_gb=args.data_gb if args.data_gb is not None else (0 if args.quick else 4), s3=args.s3)
    if s.s3 and not s.s3.startswith("s3://"):
        raise ConfigError(f"--s3={s.s3!r}: an s3:// prefix, e.g. s3://my-bucket/bench")
    hw = hardware()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    load_start = os.getloadavg()[0]
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[bench {time.perf_counter() - t0:6.0f}s] {msg}", flush=True)

    log(f"model {s.model}, seq_len {s.seq_len}, micro_batch {s.micro_batch}, {s.rounds} round(s) x "
        f"{s.steps} steps, strategies {','.join(names)}; results in {out_dir}")
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        raw = collect(s, cfg, Path(tmp), log)
    rep = summarize(raw, s, cfg)
    date = datetime.fromtimestamp(started, timezone.utc).strftime("%Y-%m-%d")
    rep["meta"] = {"date": date, "started_utc": datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds"),
                   "git": git_state(), "versions": versions(), "hardware": hw,
                   "command": "python -m train bench " + " ".join(argv), "load_start": load_start,
                   "load_end": os.getloadavg()[0], "duration_s": time.perf_counter() - t0}
    md_path, json_path = out_paths(out_dir, s.model, hw["slug"], date)
    json_path.write_text(json.dumps(rep, indent=1, default=str) + "\n")
    md_path.write_text(render_markdown(rep))
    print(render_markdown(rep))
    log(f"wrote {md_path} and {json_path}")
