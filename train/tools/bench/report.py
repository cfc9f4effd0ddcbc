"""Writing the report: medians and ratios from the raw runs (``summarize``), the targets, the
run's metadata (commit, versions, hardware) and the Markdown table (``render_markdown``)."""

from __future__ import annotations

import os
import platform
import re
import statistics
import subprocess
from pathlib import Path

from train.config import RunConfig
from train.config.strategies import GRADS, OPTIM, PARAMS, REPO_ROOT
from train.tools.bench.settings import LOOPS, TARGET_MEMORY, TARGET_OVERHEAD, TARGET_USEFUL, BenchSettings


# -- statistics -----------------------------------------------------------------------------
def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _pooled(runs: list[dict], key: str = "step_times") -> list[float]:
    return [x for r in runs if "error" not in r for x in r.get(key, [])]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _summ(runs: list[dict], tokens_per_step: int, primary: str) -> dict:
    """Medians over all rounds' post-burn-in steps (wall and CPU), per-round medians of ``primary``."""
    wall, cpu = _median(_pooled(runs, "step_times")), _median(_pooled(runs, "cpu_times"))
    key = "cpu_times" if primary == "cpu" else "step_times"
    return {"median_step_s": wall, "median_cpu_s": cpu, "tokens_per_second": tokens_per_step / wall if wall else None,
            "round_medians": [_median(r[key]) for r in runs if "error" not in r and r.get(key)],
            "steps_timed": len(_pooled(runs)), "runs": len(runs), "failed": sum("error" in r for r in runs),
            "peak_memory_mb": _median([r["peak_memory_mb"] for r in runs if r.get("peak_memory_mb")]),
            "threads": next((r.get("threads") for r in runs if r.get("threads")), None)}



def _plain_pairs(runs: dict[str, list[dict]], key: str) -> list[tuple[dict, dict]]:
    """Each good run of ``key`` with the plain-loop run it is compared with: the one beside it
    (``partner``, when runs are paired: BenchSettings.pair_cores), else the one of its round."""
    if key == "plain":
        pairs = [(r, r) for r in runs["plain"]]
    elif any("partner" in r for r in runs[key]):
        pairs = [(r, runs["plain"][r["partner"]]) for r in runs[key]]
    else:
        pairs = list(zip(runs[key], runs["plain"]))
    return [(a, b) for a, b in pairs if "error" not in a and "error" not in b]


def summarize(raw: dict, s: BenchSettings, cfg: RunConfig) -> dict:
    """The report (without ``meta``) from ``measure.collect``'s raw runs: medians, ratios, targets."""
    from train.flops import device_peak_flops, flops_per_token, mfu
    from train.memory import held_bytes, model_shape
    from train.worker.model import load_model_config

    conf = load_model_config(cfg)
    shape = model_shape(conf, cfg.model.name, cfg.model.trust_remote_code)
    fpt = flops_per_token(conf, s.seq_len)
    runs, primary, tokens_per_step = raw["single"], s.primary, s.tokens_per_step

    # 1
    peak = device_peak_flops(s.device, "no")
    overhead = {"precision": "no (fp32)", "primary": primary,
                "runs": {k: [_strip(r) for r in v] for k, v in runs.items()}}
    for key in LOOPS:
        v = _summ(runs[key], tokens_per_step, primary)
        tps = v["tokens_per_second"]
        v["achieved_tflops"] = tps * fpt / 1e12 if tps else None
        v["mfu"] = mfu(tps, fpt, peak) if tps else None
        overhead[key] = v
    times = "cpu_times" if primary == "cpu" else "step_times"
    for key in LOOPS:
        pairs = _plain_pairs(runs, key)
        for clock, field in (("step_times", "ratio_to_plain"), ("cpu_times", "cpu_ratio_to_plain")):
            med, base = _median(_pooled([a for a, _ in pairs], clock)), _median(_pooled([b for _, b in pairs], clock))
            overhead[key][field] = med / base if med and base else None
        # The spread of these is the noise floor the pooled ratio has to be read against.
        overhead[key]["round_ratios_to_plain"] = [_median(a[times]) / _median(b[times]) for a, b in pairs
                                                  if a[times] and b[times]]
    ours_l = next((r["losses"] for r in runs["ours"] if "error" not in r), None)
    plain_l = next((r["losses"] for r in runs["plain"] if "error" not in r), None)
    if ours_l and plain_l:
        n = min(len(ours_l), len(plain_l))
        overhead["loss_parity_max_abs_diff"] = max(abs(a - b) for a, b in zip(ours_l[:n], plain_l[:n]))
        overhead["parity_steps"] = n

    # 5
    fp32, bf16 = _summ(runs["ours"], tokens_per_step, primary), _summ(runs["ours-bf16"], tokens_per_step, primary)
    for v, rs in ((fp32, runs["ours"]), (bf16, runs["ours-bf16"])):
        v["final_loss"] = next((r["losses"][-1] for r in rs if r.get("losses")), None)

    def ratio(key: str, a: dict, b: dict):
        return a[key] / b[key] if a.get(key) and b.get(key) else None

    precision = {"fp32": fp32, "bf16": bf16, "step_time_ratio": ratio("median_step_s", bf16, fp32),
                 "cpu_time_ratio": ratio("median_cpu_s", bf16, fp32),
                 "memory_ratio": ratio("peak_memory_mb", bf16, fp32),
                 "memory_note": ("Peak memory on CPU is the process's peak resident set (all of Python, torch and the "
                                 "data), so the model's share is small at this size." if s.device == "cpu"
                                 else "Peak memory is torch.cuda.max_memory_allocated.")}

    # 2 + 4
    strategy_rows, memory_rows = [], []
    for r in raw["jobs"]:
        name = r["strategy"]
        row = {"strategy": name, "median_step_s": _median(r["step_times"]),
               "tokens_per_second": _median(r["tokens_per_second"]), "peak_memory_mb": r["peak_memory_mb"],
               "marks": r["marks"], "run": _strip(r)}
        if "error" in r:
            row["error_short"] = f"failed ({r['rc']})"
        strategy_rows.append(row)
        formula = held_bytes(name, shape.params, 2, "no")
        mrow = {"strategy": name, "master_formula": formula["master"]}
        if r.get("held_bytes"):
            for cat in (PARAMS, GRADS, OPTIM):
                meas, theo = r["held_bytes"][cat], formula[cat]
                share = meas / theo if theo else None
                exempt = name == "zero1" and cat == GRADS
                mrow[cat] = {"measured": meas, "formula": theo, "ratio": share, "exempt": exempt,
                             "within": share is not None and abs(share - 1) <= TARGET_MEMORY}
        memory_rows.append(mrow)
    ddp_tps = next((r["tokens_per_second"] for r in strategy_rows if r["strategy"] == "ddp"), None)
    for r in strategy_rows:
        r["relative_to_ddp"] = r["tokens_per_second"] / ddp_tps if ddp_tps and r["tokens_per_second"] else None
    strategies = {"global_batch": 2 * s.micro_batch, "precision": "no (fp32)", "rows": strategy_rows,
                  "threads_per_rank": max(1, (os.cpu_count() or 1) // 2) if s.device == "cpu" else None,
                  "note": "" if raw["two_processes"] else "Skipped: needs 2 GPUs (or DEVICE=cpu)."}

    # 6
    startup = []
    for label, rs in (("our loop, 1 process (`train worker`, no launcher)", runs["ours"] + runs["ours-bf16"]),
                      ("plain loop (no launcher)", runs["plain"]), ("HF Trainer (no launcher)", runs["trainer"])):
        startup.append(_startup_row(label, rs))
    for row in strategy_rows:
        startup.append(_startup_row(f"{row['strategy']}, 2 processes", [row["run"]]))

    data = raw["data"]
    return {"model": {"name": s.model, "params": shape.params, "matmul_params": shape.matmul_params,
                      "flops_per_token": fpt},
            "loop_overhead": overhead, "strategies": strategies, "data": data, "memory": {"rows": memory_rows},
            "precision": precision, "startup": startup, "checkpoint_stall": _stall(raw.get("stall", []), s),
            "targets": _targets(overhead, data, memory_rows), "settings": s.to_dict(),
            "data_scale": raw.get("data_scale", {})}


def _stall(runs: list[dict], s: BenchSettings) -> dict:
    """7: median seconds the loop is blocked per checkpoint save; asynchronous / synchronous per strategy."""
    rows = []
    for v in runs:
        r = v["run"]
        stalls = r.get("checkpoint_stalls") or []
        row = {"strategy": v["strategy"], "async_save": v["async_save"], "checkpoint_every": v["checkpoint_every"],
               "storage": v.get("storage", "local"), "saves": len(stalls), "median_stall_s": _median(stalls),
               "max_stall_s": max(stalls, default=None), "stalls": stalls,
               "median_upload_s": _median(r.get("checkpoint_uploads") or []),
               "median_step_s": _median(r.get("step_times", []))}
        if "error" in r or not stalls:
            row["error_short"] = f"failed ({r.get('rc')})" if "error" in r else "no save measured"
        rows.append(row)

    def ratio(a, b):
        return a / b if a and b else None

    def stall_of(storage: str, strategy: str, async_save: bool):
        return next((x["median_stall_s"] for x in rows
                     if (x["storage"], x["strategy"], x["async_save"]) == (storage, strategy, async_save)), None)

    for r in rows:
        if r["async_save"]:
            r["ratio_to_sync"] = ratio(r["median_stall_s"], stall_of(r["storage"], r["strategy"], False))
        if r["storage"] != "local":  # the bucket's save beside the same save to the local disk
            r["ratio_to_local"] = ratio(r["median_stall_s"], stall_of("local", r["strategy"], r["async_save"]))
    every = runs[0]["checkpoint_every"] if runs else None
    how = ("each run of section 2 saves once, at its end; the asynchronous run is the same run with ASYNC_SAVE=true"
           if every == 0 else f"runs of {s.steps} steps of their own, saving every {every} steps (and at the end)")
    return {"rows": rows, "checkpoint_every": every, "how": how, "precision": "no (fp32)"}


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
    trainer = overhead["trainer"].get(rkey)  # each against its own plain runs: fair when paired
    useful = min(data["packed"]["useful_fraction"], data["packed"]["corpus_fraction"])
    checked = [(r["strategy"], cat, c) for r in memory_rows for cat in (PARAMS, GRADS, OPTIM)
               if (c := r.get(cat)) and not c["exempt"]]
    worst = max(checked, key=lambda x: abs(x[2]["ratio"] - 1), default=None)
    return [
        {"target": f"our loop <= {TARGET_OVERHEAD}x the plain loop's step time",
         "value": f"{_fmt(ratio, '.3f')}x ({name})", "met": None if ratio is None else ratio <= TARGET_OVERHEAD,
         "note": f"median step {name}, pooled post-burn-in steps; per-round ratios {_range(rr)}"
                 + (f"; wall-clock ratio {_fmt(wall_ratio, '.3f')}x" if cpu else "")},
        {"target": "our loop no slower than HF Trainer",
         "value": f"{_fmt(ratio, '.3f')}x vs {_fmt(trainer, '.3f')}x the plain loop ({name})",
         "met": None if not (ratio and trainer) else ratio <= trainer,
         "note": f"median step {name}: {_fmt(overhead['ours'][clock], '.4f')} s vs "
                 f"{_fmt(overhead['trainer'][clock], '.4f')} s"},
        {"target": f">= {TARGET_USEFUL:.1%} useful tokens (packed)", "value": _pct(useful),
         "met": useful >= TARGET_USEFUL, "note": "min of real/computed and corpus tokens kept"},
        {"target": f"per-rank bytes within {TARGET_MEMORY:.0%} of the ZeRO formulas (N=2)",
         "value": (f"worst {worst[0]} {worst[1]}: {worst[2]['ratio']:.3f}" if worst else "n/a"),
         "met": None if worst is None else all(c["within"] for _, _, c in checked),
         "note": "ZeRO-1 gradients excluded (footnote 1 of section 4)"},
    ]


# -- metadata and files --------------------------------------------------------------------
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


def git_state() -> dict:
    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    dirty = git("status", "--porcelain", "--", "train", "configs")
    return {"commit": git("rev-parse", "HEAD") or "unknown", "dirty": bool(dirty)}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "accelerate", "deepspeed", "datasets"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def out_paths(out_dir: Path, model: str, hw: str, date: str) -> tuple[Path, Path]:
    stem = f"{_slug(model)}_{hw}_{date}"
    n = 1
    while True:
        name = stem if n == 1 else f"{stem}-{n}"
        md, js = out_dir / f"{name}.md", out_dir / f"{name}.json"
        if not md.exists() and not js.exists():
            return md, js
        n += 1


# -- Markdown -------------------------------------------------------------------------------
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
    out: list[str] = [
        f"# Benchmark: {s['model']} on {m['hardware']['slug']}, {m['date']}", "",
        f"- commit `{m['git']['commit'][:12]}`{' (uncommitted changes in train/ or configs/)' if m['git']['dirty'] else ''}, "
        f"`{m['command']}`",
        f"- hardware: {m['hardware']['cpu']} ({m['hardware']['cores']} cores)"
        + (f", {m['hardware']['gpus']}x {m['hardware']['gpu']}" if m['hardware']['gpu'] else ", no GPU"),
        "- versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v),
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
    out += ["## 1. Loop overhead: our loop vs plain PyTorch vs HF Trainer", "",
          "Single process each, same model construction, packed data, micro-batch, seq_len, precision "
          f"({o['precision']}) and {s['threads']} torch thread(s); runs alternate (order reversed every other round) "
          "and the medians pool all rounds' post-burn-in steps. "
          + ("Each loop runs at the same time as a plain-loop run, each pinned to its own core (cores swapped every "
             "other round), and its ratios are to the plain runs beside it: two runs side by side see the same "
             "machine, runs minutes apart do not. " if any("partner" in r for r in o["runs"]["ours"]) else "")
          + ("The ratios that count are of process CPU time per step: on this shared CPU machine the wall clock "
             "also measures the other jobs' load (both are shown)." if cpu else ""), ""]
    rows = []
    labels = {"ours": "our loop (train/worker/loop.py, 1 process)",
              "plain-pg": "plain loop in a process group of 1",
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
    out += _md_table(["loop", "median step, wall (s)", "median step, CPU (s)", "tokens/s (wall)", "wall / plain",
                    "CPU / plain", "achieved TFLOP/s", "MFU", f"per-round medians, {clk} (s)",
                    f"per-round {clk} / plain", "steps timed", "threads"], rows)
    parity = o.get("loss_parity_max_abs_diff")
    if parity is not None:
        out += ["", f"Same work? max |our loss - plain loss| over the {o['parity_steps']} shared steps: {parity:.2e} "
                  "(same seed, initial weights, data order, optimizer, schedule and clipping)."]
    out += ["", "`plain loop in a process group of 1` is the plain loop inside the gloo group ours has in a "
              "1-process job (`python -m train NPROC=1`: torchrun, a process group of one; the model is not "
              "DDP-wrapped): the gap from `plain` is that group's cost, the gap from it to ours is the loop's own. "
              + ("Every loop ran with the malloc settings our CPU workers get (`GLIBC_TUNABLES`, "
                 "train/worker/accelerator.py's `cpu_allocator_env`)." if s["device"] == "cpu" else ""), ""]
    # 2
    st = rep["strategies"]
    out += ["## 2. Strategies: 2 processes, same global batch", "",
          f"Global batch {st['global_batch']} sequences = 2 ranks x micro_batch {s['micro_batch']} "
          f"({st['global_batch'] * s['seq_len']} tokens/step), precision {st['precision']}, "
          f"{st['threads_per_rank']} thread(s) per rank.", ""]
    rows = []
    for r in st["rows"]:
        rows.append([r["strategy"], _fmt(r.get("median_step_s"), ".4f"), _fmt(r.get("tokens_per_second"), ".1f"),
                     _fmt(r.get("relative_to_ddp"), ".2f"), _fmt(r.get("peak_memory_mb"), ".0f"),
                     r.get("error_short", "ok")])
    out += _md_table(["strategy", "median step (s)", "tokens/s (global)", "vs ddp", "peak RSS rank 0 (MB)", "status"], rows)
    if st.get("note"):
        out += ["", st["note"]]
    out += [""]
    # 3
    d = rep["data"]
    out += ["## 3. Data pipeline: useful tokens, packed vs padded", "",
          f"Corpus {s['dataset']}: {d['documents']:,} documents (lines), {d['corpus_tokens']:,} tokens with EOS, "
          f"mean {d['mean_document_tokens']:.1f} / max {d['max_document_tokens']} tokens per document; blocks of "
          f"{d['seq_len']} tokens.", ""]
    rows = []
    for key, label in (("packed", "packed (train/data/)"), ("pad_to_max_length", "pad each line to seq_len"),
                       ("pad_to_longest_in_batch", f"pad to longest in micro-batch of {s['micro_batch']}")):
        v = d[key]
        rows.append([label, f"{v['computed']:,}", f"{v['useful']:,}", _pct(v["useful_fraction"]),
                     _pct(v["corpus_fraction"])])
    out += _md_table(["layout", "tokens computed", "real tokens", "useful fraction (real / computed)",
                    "corpus tokens trained on"], rows)
    out += [""]
    # 4
    mem = rep["memory"]
    out += ["## 4. Memory per rank: measured vs ZeRO formulas (N=2)", "",
          f"P = {rep['model']['params']:,} parameters, fp32 (4 bytes), Adam moments 8 bytes/param. Measured = "
          "`held_bytes` of rank 0 right before the first optimizer step (MiB); formula = `train.memory.held_bytes`, "
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
    out += _md_table(["strategy", "params measured / formula", "ratio", "grads measured / formula", "ratio",
                    "optimizer measured / formula", "ratio", "DeepSpeed fp32 master (formula, not measured) ²"], rows)
    out += ["",
          "¹ ZeRO-1 holds full gradients (4P) through the backward pass, as the formula says; DeepSpeed partitions "
          "them right before the step, and the probe measures the gradients the optimizer steps on, so it sees 4P/N. "
          "Not counted in the ±5% target.",
          "² `optimizer` counts Adam's moments (exp_avg, exp_avg_sq). DeepSpeed also keeps an fp32 master copy of "
          "its partition (4P/N, even in fp32 training), which the planner lists as `master`; the probe does not "
          "measure it. Offload strategies hold the same bytes in CPU RAM (on these CPU runs everything is in RAM).", ""]
    # 5
    p = rep["precision"]
    out += ["## 5. Precision: fp32 vs bf16 (our loop, 1 process)", ""]
    rows = [[k, _fmt(p[k]["median_step_s"], ".4f"), _fmt(p[k]["median_cpu_s"], ".4f"),
             _fmt(p[k]["tokens_per_second"], ".1f"), _fmt(p[k]["peak_memory_mb"], ".0f"),
             _fmt(p[k]["final_loss"], ".4f")] for k in ("fp32", "bf16")]
    out += _md_table(["precision", "median step, wall (s)", "median step, CPU (s)", "tokens/s (wall)",
                    "peak memory (MB)", "loss at last step"], rows)
    out += ["", f"bf16 / fp32: step wall time {_fmt(p['step_time_ratio'], '.3f')}, CPU time "
              f"{_fmt(p['cpu_time_ratio'], '.3f')}, peak memory {_fmt(p['memory_ratio'], '.3f')}. "
              f"{p['memory_note']}", ""]
    # 6
    out += ["## 6. Launch to first completed step", "",
          "Seconds after the process starts (median over runs): `launcher` = config checked, about to exec "
          "`accelerate launch`; `engaged` = ranks started, imports done, model built, process group up (the "
          "loop's first line); `first step` = data built, `prepare` done, first optimizer step done.", ""]
    rows = [[r["run"], _fmt(r.get("launcher_s"), ".1f"), _fmt(r.get("engaged_s"), ".1f"), _fmt(r.get("first_step_s"), ".1f"),
             r["runs"]] for r in rep["startup"]]
    out += _md_table(["run", "launcher (s)", "engaged / model built (s)", "first step (s)", "runs"], rows)
    # 7
    c = rep["checkpoint_stall"]
    out += ["", "## 7. Checkpoint stall: training blocked per save", "",
            f"2 processes, global batch {st['global_batch']}, {c['precision']}: {c['how']}. Stall = wall seconds the "
            "loop spends in the save call on rank 0 (`checkpoint_stall_s` in metrics.jsonl), including the wait for "
            "the previous asynchronous save's write. Asynchronous = `ASYNC_SAVE=true` (FSDP only): the model and "
            "optimizer are copied to CPU memory and written in the background.", ""]
    rows = [[r["strategy"], r.get("storage", "local"), "asynchronous" if r["async_save"] else "synchronous", r["saves"],
             _fmt(r["median_stall_s"], ".4f"), _fmt(r["max_stall_s"], ".4f"),
             _fmt(r.get("ratio_to_sync"), ".3f") if r["async_save"] else "-",
             _fmt(r.get("ratio_to_local"), ".3f") if "ratio_to_local" in r else "-",
             _fmt(r.get("median_upload_s"), ".4f"), _fmt(r["median_step_s"], ".4f"),
             r.get("error_short", "ok")] for r in c["rows"]]
    out += _md_table(["strategy", "storage", "save", "saves measured", "median stall (s)", "max stall (s)",
                      "async / sync", "bucket / local", "median upload (s)", "median step (s)", "status"], rows)
    out += ["", "Object storage: `OUTPUT_DIR=s3://...`; a save is written to node-local scratch, then uploaded with "
            "the manifest last (docs/object-storage.md); `median upload` is `checkpoint_upload_s`, part of the "
            "stall for a synchronous save (an asynchronous save uploads when it completes, at the next save or the "
            "end). Against a local moto server the number is the protocol's cost, not a network's."]
    if st.get("note"):
        out += ["", st["note"]]
    from .data import render as render_data_scale

    out += ["", *render_data_scale(rep.get("data_scale", {}))]
    out += ["", "## Targets", ""]
    rows = [[t["target"], t["value"], "met" if t["met"] else ("not met" if t["met"] is False else "n/a"), t["note"]]
            for t in rep["targets"]]
    out += _md_table(["target", "measured", "status", "note"], rows)
    out += ["", "What is timed: wall and process CPU time between the ends of consecutive optimizer steps, with a "
              "host sync every step (LOG_EVERY=1 / `loss.item()` / `logging_steps=1`), burn-in steps excluded. "
              "See bench-results/README.md.", ""]
    return "\n".join(out)
