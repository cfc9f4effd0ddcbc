"""Running the measurements: every run is a child process (a real job as users start it, or one
``bench --worker KIND`` process per single-process loop), results are raw per-step numbers.
Summaries and the report are train/tools/bench/report.py's job."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from train.config import RunConfig
from train.config.strategies import REPO_ROOT, STRATEGIES
from train.launcher.nodes import LAUNCHER_SCRUB_VARS
from train.storage import local_dir
from train.tools.bench.settings import LOOPS, PARTNER, RUN_TIMEOUT_S, BenchSettings, go, ready


def read_metrics(out: Path, key: str = "loss") -> list[dict]:
    """The rows of a run's metrics.jsonl that hold ``key``: the training rows by default
    (evaluation rows left out), or e.g. the checkpoint stalls (``checkpoint_stall_s``)."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if key in r]


# -- child processes --------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_env(extra: dict | None = None) -> dict:
    """This environment without a surrounding job's rank variables (the launcher's own list);
    every run setting the bench depends on is on the child's command line, which beats the
    environment (see ``_run_args``)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_SCRUB_VARS}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def _spawn(cmd: list[str], env: dict, timeout: float, marks: dict[str, str], core: int | None = None,
           on_mark=None) -> dict:
    """Run a command (on one ``core`` if given); timestamp (seconds after start) the first stdout
    line matching each mark, and call ``on_mark(name)`` then."""
    t0, started = time.perf_counter(), time.time()
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    if core is not None:  # (not preexec_fn: the bench starts two runs from two threads)
        os.sched_setaffinity(proc.pid, {core})  # before the interpreter starts any thread of its own
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
                    if on_mark:
                        on_mark(name)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the job's own session: launcher, accelerate, ranks
        proc.wait()
        rc = "timeout"
    reader.join(timeout=10)
    return {"rc": rc, "wall_s": time.perf_counter() - t0, "marks": seen, "tail": "".join(tail),
            "started": started, "ended": time.time()}


def _run_args(s: BenchSettings, out: Path, **over) -> list[str]:
    args = {"MODEL": s.model, "SEQ_LEN": s.seq_len, "MICRO_BATCH": s.micro_batch, "DEVICE": s.device,
            "LOG_EVERY": 1, "MAX_STEPS": s.steps, "CHECKPOINT_EVERY": 0, "OUTPUT_DIR": out, "RESUME": "never",
            "checkpoint.export": "false", "log.trackers": "none", "log.progress": "false",
            "train.eval_every": 0, "train.eval_tokens": s.seq_len, "GRAD_ACCUM": 1, "GLOBAL_BATCH": 0,
            # one node on this machine, our strategy files, whatever the surrounding environment says
            "NNODES": 1, "NODE_RANK": 0, "MASTER_ADDR": "127.0.0.1", "ACCELERATE_CONFIG": ""}
    args.update(over)
    return [f"{k}={v}" for k, v in args.items()]


def run_job(s: BenchSettings, workdir: Path, *, strategy: str, nproc: int = 2, precision: str = "no",
            env: dict | None = None, **over) -> dict:
    """A real job exactly as users start it, ``python -m train`` (launcher -> accelerate launch ->
    ranks); per-step wall times, tokens/s, held bytes and the training stall of each checkpoint
    save (the one at the end, and every CHECKPOINT_EVERY steps) come from its metrics.jsonl (on
    the node's scratch when ``OUTPUT_DIR`` is a bucket)."""
    out = Path(tempfile.mkdtemp(prefix=f"job-{strategy}-", dir=workdir))
    if "OUTPUT_DIR" in over:  # a bucket: what needs a real directory is staged under out
        over["checkpoint.scratch_dir"] = out
    args = _run_args(s, out, NPROC=nproc, STRATEGY=strategy, PRECISION=precision, MASTER_PORT=_free_port(), **over)
    res = _spawn([sys.executable, "-m", "train", *args], _child_env(env), RUN_TIMEOUT_S,
                 {"launcher": r"^\[launch\]", "engaged": r"^\[train\] strategy=", "first_step": r"^step=1 "})
    out = local_dir(str(over["OUTPUT_DIR"]), str(out)) if "OUTPUT_DIR" in over else out
    rows = read_metrics(out)
    result = {"kind": "job", "nproc": nproc, "strategy": strategy, "precision": precision, "rc": res["rc"],
              "wall_s": res["wall_s"], "marks": res["marks"],
              "step_times": [r["step_time_s"] for r in rows][s.burn_in:],
              "tokens_per_second": [r["tokens_per_second"] for r in rows][s.burn_in:],
              "losses": [r["loss"] for r in rows],
              "held_bytes": rows[0].get("held_bytes") if rows else None,
              "checkpoint_stalls": [r["checkpoint_stall_s"] for r in read_metrics(out, "checkpoint_stall_s")],
              "checkpoint_uploads": [r["checkpoint_upload_s"] for r in read_metrics(out, "checkpoint_upload_s")],
              "peak_memory_mb": max((r["peak_memory_mb"] for r in rows), default=None),
              "threads": max(1, (os.cpu_count() or 1) // nproc) if s.device == "cpu" else None}  # launcher's rule
    if res["rc"] != 0 or len(rows) < s.steps:
        result["error"] = f"exit {res['rc']} after {len(rows)} of {s.steps} steps:\n{res['tail'][-3000:]}"
    return result


def object_store_stall(s: BenchSettings, workdir: Path, log, every: int) -> list[dict]:
    """Section 7's saves again with ``OUTPUT_DIR`` in a bucket (``--s3``, else a local moto
    server): FSDP if benched (synchronous, and asynchronous unless quick), else the first strategy."""
    from contextlib import ExitStack

    from train.tools import s3server

    name = "fsdp" if "fsdp" in s.strategies else s.strategies[0]
    modes = (False, True) if STRATEGIES[name].family == "fsdp" and not s.quick else (False,)
    with ExitStack() as stack:
        if s.s3:
            url, env, where = s.s3.rstrip("/"), {}, s.s3
        elif s3server.available():
            endpoint, proc = s3server.start_moto(workdir / "moto.log")
            stack.callback(s3server.stop, proc)
            env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                   "AWS_DEFAULT_REGION": s3server.REGION}
            import boto3

            boto3.client("s3", endpoint_url=endpoint, region_name=s3server.REGION, aws_access_key_id="bench",
                         aws_secret_access_key="bench").create_bucket(Bucket="bench")
            url, where = "s3://bench", "moto_server on this machine"
        else:
            log("checkpoint stall on object storage: skipped (no --s3 and no moto_server: the dev extra)")
            return []
        rows = []
        for async_save in modes:
            log(f"checkpoint stall: {name}, {'asynchronous' if async_save else 'synchronous'} saves to {where}")
            r = run_job(s, workdir, strategy=name, env=env, CHECKPOINT_EVERY=every, KEEP_CHECKPOINTS=2,
                        ASYNC_SAVE=str(async_save).lower(), OUTPUT_DIR=f"{url}/{name}-{os.getpid()}-{len(rows)}")
            r["load"] = os.getloadavg()[0]
            if "error" in r:
                log(f"  {name} to object storage failed: {r['error'][:2000]}")
            rows.append({"strategy": name, "async_save": async_save, "checkpoint_every": every, "run": r,
                         "storage": f"s3 ({where})"})
        return rows


def run_single(kind: str, s: BenchSettings, workdir: Path, precision: str = "no", core: int | None = None,
               until: Path | None = None, beside: Path | None = None) -> dict:
    """One single-process run of ``kind`` (ours | plain | plain-pg | trainer), ``bench --worker KIND``.

    All get the same ``OMP_NUM_THREADS`` / ``torch.set_num_threads`` and, on CPU, the malloc
    settings our workers get (``cpu_allocator_env``): the loops differ, their allocator does
    not. ``ours`` and ``plain-pg`` also get the environment torchrun gives a 1-process job
    (what ``python -m train NPROC=1`` runs under: a gloo group of one).

    ``until``: this is a partner run, stepping from ``go(until)`` until ``until`` exists.
    ``beside``: the ``until`` of the partner beside this run, which starts stepping when this one does.
    """
    from train.launcher.worker_env import cpu_allocator_env, worker_env
    from train.progress import ENV_EXPECTED_WORLD

    out = Path(tempfile.mkdtemp(prefix=f"{kind}-{precision}-", dir=workdir))
    result_path = out / "bench-result.json"
    env = {"OMP_NUM_THREADS": str(s.threads), **(cpu_allocator_env() if s.device == "cpu" else {})}
    if kind in ("ours", "plain-pg"):
        env.update(worker_env(STRATEGIES["ddp"], s.device))
        env.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), ENV_EXPECTED_WORLD: "1",
                    "ACCELERATE_MIXED_PRECISION": precision})
    # A partner runs until ``until`` exists: through the whole of the run beside it, however long
    # that one's start-up takes (RUN_TIMEOUT_S bounds it).
    partner = ["--until", str(until)] if until else []
    cmd = [sys.executable, "-m", "train", "bench", "--worker", kind, "--result", str(result_path), *partner,
           "--steps", str(10**9 if until else s.steps), "--threads", str(s.threads),
           *_run_args(s, out, PRECISION=precision, NPROC=1, STRATEGY="ddp")]
    marks = {"engaged": r"^(\[train\] strategy=|\[bench\] built)", "stepping": r"^(\[train\] model prepared as |\[bench\] stepping)",
             "first_step": r"^(step=1 |\[bench\] step 1 )"}

    def start_partner(name: str) -> None:  # this run enters its loop: the partner beside it steps too
        if name == "stepping":
            go(beside).touch()

    res = _spawn(cmd, _child_env(env), RUN_TIMEOUT_S, marks, core, on_mark=start_partner if beside else None)
    result = {"kind": kind, "precision": precision, "rc": res["rc"], "wall_s": res["wall_s"], "marks": res["marks"],
              "started": res["started"], "ended": res["ended"], "core": core}
    try:
        data = json.loads(result_path.read_text())
    except (OSError, ValueError):
        data = {}
    result.update(data)
    result["step_times"] = data.get("step_times", [])[s.burn_in:]
    result["cpu_times"] = data.get("cpu_times", [])[s.burn_in:]
    result["ends"] = data.get("ends", [])[s.burn_in:]
    if res["rc"] != 0 or (len(data.get("step_times", [])) < s.steps and not until):
        result["error"] = f"exit {res['rc']}:\n{res['tail'][-3000:]}"
    return result


def _keep_beside(partner: dict, run: dict) -> None:
    """Keep only the partner's steps that ran while ``run`` ran its timed steps."""
    if "error" in partner or "error" in run or not run["ends"]:
        return
    start, end = run["ends"][0] - run["step_times"][0], run["ends"][-1]
    keep = [i for i, (t, w) in enumerate(zip(partner["ends"], partner["step_times"])) if t - w >= start and t <= end]
    for k in ("step_times", "cpu_times", "ends"):
        partner[k] = [partner[k][i] for i in keep]
    if not keep:
        partner["error"] = "no step of the plain loop ran while the run beside it ran its timed steps"


# -- data efficiency ------------------------------------------------------------------------
def data_efficiency(cfg: RunConfig) -> dict:
    """Useful tokens of the packed pipeline vs padding each line (document) to seq_len."""
    from train.data import open_source
    from train.worker.model import load_tokenizer

    tok = load_tokenizer(cfg.model)
    corpus = open_source(cfg.data.dataset, cfg.data, tok)
    lengths = corpus.document_lengths().tolist()  # each document with its EOS
    seq, raw = cfg.data.seq_len, sum(lengths)
    kept_packed = raw // seq * seq  # one token stream: only the tail shorter than a block is dropped
    kept_padded = sum(min(n, seq) for n in lengths)
    mb = cfg.train.micro_batch
    batches = [lengths[i:i + mb] for i in range(0, len(lengths), mb)]
    computed_dynamic = sum(len(b) * min(max(b), seq) for b in batches)
    return {
        "documents": len(lengths), "corpus_tokens": raw, "seq_len": seq,
        "mean_document_tokens": raw / len(lengths), "max_document_tokens": max(lengths),
        "packed": {"computed": kept_packed, "useful": kept_packed, "useful_fraction": 1.0,
                   "corpus_fraction": kept_packed / raw},
        "pad_to_max_length": {"computed": len(lengths) * seq, "useful": kept_padded,
                              "useful_fraction": kept_padded / (len(lengths) * seq), "corpus_fraction": kept_padded / raw},
        "pad_to_longest_in_batch": {"computed": computed_dynamic, "useful": kept_padded,
                                    "useful_fraction": kept_padded / computed_dynamic,
                                    "corpus_fraction": kept_padded / raw},
    }


# -- everything, in order -------------------------------------------------------------------------
def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def collect(s: BenchSettings, cfg: RunConfig, workdir: Path, log) -> dict:
    """Every run of the bench: {"single": {kind: [run, ...]}, "jobs": [run, ...], "data": {...},
    "two_processes": bool}. Each run is the raw result of one process, with the load average."""
    # 1 + 5: alternate the single-process loops; order reversed every other round. With two
    # cores (CPU), each loop runs beside a plain-loop run, its "partner": the ratio to plain
    # is taken between runs that saw the same machine (BenchSettings.pair_cores).
    order = [*LOOPS, "ours-bf16"]
    single: dict[str, list[dict]] = {k: [] for k in order}

    def one(key: str, core: int | None = None, until: Path | None = None, beside: Path | None = None) -> dict:
        r = run_single("ours", s, workdir, "bf16", core, beside=beside) if key == "ours-bf16" else \
            run_single(key, s, workdir, core=core, until=until, beside=beside)
        r["load"] = os.getloadavg()[0]
        if "error" in r:
            log(f"  {key} failed: {r['error'][:2000]}")
        return r

    for rnd in range(s.rounds):
        keys = order if rnd % 2 == 0 else order[::-1]
        if s.pair_cores is None:
            for key in keys:
                log(f"round {rnd + 1}/{s.rounds}: {key}")
                single[key].append(one(key))
            continue
        a, b = s.pair_cores if rnd % 2 == 0 else s.pair_cores[::-1]
        for key in (k for k in keys if k != PARTNER):
            log(f"round {rnd + 1}/{s.rounds}: {key} on core {a}, beside the plain loop on core {b}")
            done = workdir / f"done-{rnd}-{key}"
            with ThreadPoolExecutor(1) as pool:
                partner = pool.submit(one, PARTNER, b, done)
                # Both take their first step together: the partner, built first, waits for the
                # run to reach its loop (``go``). A partner already stepping for a while measured
                # ~2% slower per step than the same loop starting beside it (bench-results/README.md).
                while not ready(done).exists() and not partner.done():
                    time.sleep(0.05)
                run = one(key, a, beside=done)
                done.touch()
                partner = partner.result()
            _keep_beside(partner, run)
            run["partner"] = len(single[PARTNER])  # index of the plain run beside it
            single[PARTNER].append(partner)
            single[key].append(run)

    # 2 + 4: every strategy with 2 processes at the same global batch.
    jobs = []
    two = s.device == "cpu" or _cuda_count() >= 2
    for name in s.strategies if two else []:
        log(f"strategy {name} (2 processes)")
        r = run_job(s, workdir, strategy=name)
        r["load"] = os.getloadavg()[0]
        jobs.append(r)
        if "error" in r:
            log(f"  {name} failed: {r['error'][:2000]}")

    # 7: the training stall per checkpoint save, synchronous and (FSDP) asynchronous. Quick: every
    # run of section 2 saved once, at its end (that does not touch its step times); one FSDP run
    # alike with ASYNC_SAVE=true. Otherwise runs of their own that save every few steps.
    stall = []
    every = 0 if s.quick else max(1, s.steps // 4)
    for name in s.strategies if two else []:
        for async_save in ((False, True) if STRATEGIES[name].family == "fsdp" else (False,)):
            if every == 0 and not async_save:
                r = next(j for j in jobs if j["strategy"] == name)
            else:
                log(f"checkpoint stall: {name}, {'asynchronous' if async_save else 'synchronous'} saves")
                r = run_job(s, workdir, strategy=name, CHECKPOINT_EVERY=every, ASYNC_SAVE=str(async_save).lower(),
                            KEEP_CHECKPOINTS=2)
                r["load"] = os.getloadavg()[0]
                if "error" in r:
                    log(f"  {name} failed: {r['error'][:2000]}")
            stall.append({"strategy": name, "async_save": async_save, "checkpoint_every": every, "run": r})
    stall += object_store_stall(s, workdir, log, every) if two and s.strategies else []

    # 3
    log("data efficiency")
    eff = data_efficiency(cfg)
    # 8
    from .data import data_scale

    scale = data_scale(s, cfg, workdir, log, s.data_text_mb, s.data_gb) if s.data_text_mb else {}
    return {"single": single, "jobs": jobs, "stall": stall, "two_processes": two, "data": eff, "data_scale": scale}
