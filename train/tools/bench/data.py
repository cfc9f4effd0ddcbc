"""Section 8 of the bench: data at scale.

- Prepare throughput: ``train.data.prepare`` on a generated text corpus, against the limit - the
  `tokenizers` library's own ``encode_batch`` on the same texts (already in memory) and the same
  cores - and against the path it replaced: one process running ``datasets.map`` with the HF
  tokenizer (what every rank used to do before its first step).
- Memory and start-up flat in corpus size: the same 2-rank job trained from a small prepared
  corpus and from a generated multi-GB one (random ids: the reader does not care what they
  mean); peak RSS of rank 0 and the time from launch to the first step.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np

from train.config import DataConfig, RunConfig


def generate_text(path: Path, mb: float, seed: int = 0) -> int:
    """A text file of ``mb`` MB: the built-in corpus's grammar, one story per line."""
    from train.corpus import generate

    size, chunk = 0, 0
    with open(path, "w") as f:
        while size < mb * 1e6:
            text = "\n".join(generate(5000, seed=seed * 1_000_003 + chunk)) + "\n"
            f.write(text)
            size += len(text)
            chunk += 1
    return size


def synthetic_prepared(out: Path, n_tokens: int, tokenizer, doc_tokens: int = 1000, seed: int = 0) -> Path:
    """A prepared directory of ``n_tokens`` random ids (EOS every ``doc_tokens``), written straight in
    the shard format: gigabytes in seconds, without tokenizing gigabytes of text."""
    from train.data.shards import FORMAT, MANIFEST, arrays_spec, shard_name, token_dtype, tokenizer_fingerprint, write_json

    out.mkdir(parents=True, exist_ok=True)
    fp = tokenizer_fingerprint(tokenizer)
    dtype = token_dtype(fp["vocab_size"])
    rng = np.random.default_rng(seed)
    per_shard = (1 << 27) // doc_tokens * doc_tokens
    shards, left, k = [], n_tokens // doc_tokens * doc_tokens, 0
    while left:
        n = min(per_shard, left)
        toks = rng.integers(1, fp["vocab_size"], n, dtype=np.uint32).astype(dtype)
        toks[doc_tokens - 1::doc_tokens] = fp["eos"]
        toks.tofile(out / f"{shard_name(k)}.tokens")
        np.arange(doc_tokens, n + 1, doc_tokens, dtype="<i8").tofile(out / f"{shard_name(k)}.docs")
        shards.append({"name": shard_name(k), "tokens": n, "documents": n // doc_tokens, "rows_end": 0, "sha256": {}})
        left -= n
        k += 1
    write_json(out / MANIFEST, {"format": FORMAT, "sources": [{"source": "synthetic", "seed": seed}], "tokenizer": fp,
                                "text_field": "text", "shard_tokens": per_shard, "dtype": dtype,
                                "arrays": arrays_spec(dtype), "tokens": n_tokens // doc_tokens * doc_tokens,
                                "documents": sum(s["documents"] for s in shards), "rows": 0, "shards": shards})
    return out


def _encode_batch_child(tokenizer_json: str, path: str, threads: int, q) -> None:
    # rayon sizes its pool once, on first use: set before the first encode in a fresh process
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    texts = [t for t in Path(path).read_text().splitlines() if t.strip()]
    t0 = time.perf_counter()
    n = 0
    for i in range(0, len(texts), 10_000):  # batches as large as prepare's, all cores inside each
        n += sum(len(e.ids) + 1 for e in tok.encode_batch(texts[i:i + 10_000], add_special_tokens=False))
    q.put((n, time.perf_counter() - t0))


def encode_batch_limit(tokenizer, path: Path, threads: int) -> dict:
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_encode_batch_child, args=(tokenizer.backend_tokenizer.to_str(), str(path), threads, q))
    p.start()
    n, took = q.get(timeout=3600)
    p.join()
    return {"tokens": n, "seconds": took, "tokens_per_s": n / took, "threads": threads}


def datasets_map_single(tokenizer, path: Path, workdir: Path) -> dict:
    """The replaced path: one process, ``datasets.map`` with the HF tokenizer, EOS appended."""
    import datasets

    datasets.disable_progress_bars()
    ds = datasets.load_dataset("text", data_files={"train": str(path)}, split="train", cache_dir=str(workdir / "hf"))
    eos = tokenizer.eos_token_id
    t0 = time.perf_counter()
    tok = ds.map(lambda b: {"input_ids": [x + [eos] for x in tokenizer([t for t in b["text"] if t and t.strip()],
                                                                      add_special_tokens=False)["input_ids"]]},
                 batched=True, remove_columns=ds.column_names, load_from_cache_file=False)
    took = time.perf_counter() - t0
    n = sum(len(x) for x in tok["input_ids"])
    return {"tokens": n, "seconds": took, "tokens_per_s": n / took}


def prepare_speed(tokenizer, path: Path, workdir: Path, workers: int) -> dict:
    from train.data.prepare import prepare

    t0 = time.perf_counter()
    c = prepare([str(path)], workdir / "prepared-text", tokenizer, DataConfig(), workers=workers, log=lambda m: None)
    took = time.perf_counter() - t0
    disk = sum(f.stat().st_size for f in c.path.iterdir())
    return {"tokens": c.num_tokens, "documents": c.num_documents, "seconds": took, "tokens_per_s": c.num_tokens / took,
            "workers": workers, "disk_bytes": disk, "mb_per_million_tokens": disk / c.num_tokens,
            "seconds_per_million_tokens": took / c.num_tokens * 1e6, "dtype": c.dtype, "path": str(c.path)}


def data_scale(s, cfg: RunConfig, workdir: Path, log, text_mb: float, large_gb: float) -> dict:
    """Everything section 8 reports (see the module docstring)."""
    from train.launcher.cpus import available_cpus
    from train.worker.model import load_tokenizer
    from .measure import run_job

    tok = load_tokenizer(cfg.model)
    cores = available_cpus()
    text = workdir / "generated.txt"
    size = generate_text(text, text_mb)
    log(f"data: prepare {size / 1e6:.0f} MB of generated text with {cores} worker(s)")
    ours = prepare_speed(tok, text, workdir, cores)
    log("data: the tokenizer's own encode_batch on the same texts and cores")
    limit = encode_batch_limit(tok, text, cores)
    log("data: the replaced path, one process with datasets.map")
    old = datasets_map_single(tok, text, workdir)
    result = {"text_bytes": size, "cores": cores, "prepare": ours, "encode_batch": limit, "datasets_map": old,
              "limit_ratio": limit["tokens_per_s"] / ours["tokens_per_s"],
              "speedup_vs_datasets_map": ours["tokens_per_s"] / old["tokens_per_s"]}
    if large_gb <= 0:
        return result
    small = Path(ours["path"])
    itemsize = 2 if ours["dtype"] == "<u2" else 4
    log(f"data: a generated {large_gb:g} GB prepared corpus")
    large = synthetic_prepared(workdir / "large", int(large_gb * 1e9 / itemsize), tok)
    runs = {}
    for name, path in (("small", small), ("large", large)):
        log(f"data: 2-rank ddp job from the {name} corpus")
        r = run_job(s, workdir, strategy="ddp", DATASET=str(path))
        runs[name] = {"corpus_bytes": sum(f.stat().st_size for f in path.iterdir()),
                      "peak_rss_mb": r.get("peak_memory_mb"), "marks": r.get("marks"),
                      "median_step_s": float(np.median(r["step_times"])) if r.get("step_times") else None,
                      "error": r.get("error")}
    result["jobs"] = runs
    a, b = runs["small"]["peak_rss_mb"], runs["large"]["peak_rss_mb"]
    result["rss_delta_mb"] = (b - a) if a is not None and b is not None else None
    return result


def render(d: dict) -> list[str]:
    if not d:
        return []
    p, lim, old = d["prepare"], d["encode_batch"], d["datasets_map"]
    out = ["## 8. Data at scale: prepare throughput, memory per rank flat in corpus size", "",
           f"Generated text: {d['text_bytes'] / 1e6:,.0f} MB, {p['tokens']:,} tokens, {p['documents']:,} documents; "
           f"{d['cores']} core(s).", ""]
    rows = [["`prepare` (train/data/prepare.py)", f"{p['tokens_per_s']:,.0f}", f"{p['workers']} processes", "1.00"],
            ["`tokenizers` encode_batch (the limit)", f"{lim['tokens_per_s']:,.0f}", f"{lim['threads']} threads",
             f"{lim['tokens_per_s'] / p['tokens_per_s']:.2f}"],
            ["one process, `datasets.map` (the replaced path)", f"{old['tokens_per_s']:,.0f}", "1 process",
             f"{old['tokens_per_s'] / p['tokens_per_s']:.2f}"]]
    out += _table(["tokenizing", "tokens/s", "cores used", "vs prepare"], rows)
    out += ["", f"Prepared: {p['mb_per_million_tokens']:.2f} MB on disk and {p['seconds_per_million_tokens']:.2f} s per "
            f"million tokens ({p['dtype'][1:]}). Goal: prepare within 1.25x of encode_batch "
            f"({'met' if d['limit_ratio'] <= 1.25 else 'NOT met'}: {d['limit_ratio']:.2f}x).", ""]
    if "jobs" in d:
        rows = [[name, f"{j['corpus_bytes'] / 1e9:,.3f} GB", _f(j["peak_rss_mb"], ".0f"),
                 _f(j["median_step_s"], ".3f"), _f(_first_step(j), ".1f"), "ok" if not j["error"] else "FAILED"]
                for name, j in d["jobs"].items()]
        out += _table(["corpus", "on disk", "peak RSS rank 0 (MB)", "median step (s)", "launch to first step (s)",
                       "status"], rows)
        delta = d.get("rss_delta_mb")
        out += ["", f"RSS large - small: {_f(delta, '+.0f')} MB (goal: under 50 MB; "
                f"{'met' if delta is not None and abs(delta) < 50 else 'NOT met'}).", ""]
    else:
        out += ["RSS per rank small vs large: not measured in this run (`--data-gb 0`, or `--quick`).", ""]
    return out


def _first_step(j: dict):
    m = j.get("marks") or {}
    return m.get("first_step")


def _f(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


if __name__ == "__main__":  # python -m train.tools.bench.data: the section alone, printed
    import sys
    import tempfile

    from train.config import load_config

    cfg = load_config(sys.argv[1:])
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(data_scale(None, cfg, Path(tmp), print, float(os.environ.get("TEXT_MB", 20)), 0), indent=1))
