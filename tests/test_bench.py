"""`make bench` (python -m train bench): it runs in one go on the tiniest setting and writes a
well-formed Markdown table and JSON with every section. Benchmarks are not timed tests: no
number is asserted here beyond being measured (the targets live in the report itself)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, job_env

SECTIONS = ("## 1. Loop overhead", "## 2. Strategies", "## 3. Data pipeline", "## 4. Memory per rank",
            "## 5. Precision", "## 6. Launch to first completed step", "## 7. Checkpoint stall",
            "## 8. Data at scale", "## Targets")


def _tables(md: str) -> list[list[str]]:
    tables, current = [], []
    for line in md.splitlines():
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    return tables + ([current] if current else [])


@pytest.mark.slow
def test_quick_bench_writes_a_well_formed_table_and_json(tmp_path):
    # two strategies keep it short: one that replicates, one that shards (and saves asynchronously)
    cmd = [sys.executable, "-m", "train", "bench", "--quick", "--strategies", "ddp,fsdp", "--out", str(tmp_path)]
    p = subprocess.run(cmd, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    mds, jsons = sorted(tmp_path.glob("*.md")), sorted(tmp_path.glob("*.json"))
    assert len(mds) == 1 and len(jsons) == 1 and mds[0].stem == jsons[0].stem
    assert re.fullmatch(r"llama-debug_[a-z0-9-]+_\d{4}-\d{2}-\d{2}", mds[0].stem), mds[0].stem

    md = mds[0].read_text()
    positions = [md.find(s) for s in SECTIONS]
    assert all(i >= 0 for i in positions) and positions == sorted(positions), positions
    tables = _tables(md)
    assert len(tables) == 9  # one per section, targets included (--quick: section 8 runs no RSS jobs)
    for t in tables:
        widths = {line.count("|") for line in t}
        assert len(widths) == 1, t  # every row has the header's number of cells
        assert set(t[1].replace("|", "")) == {"-"} and len(t) >= 3, t

    rep = json.loads(jsons[0].read_text())
    meta = rep["meta"]
    assert re.fullmatch(r"[0-9a-f]{40}", meta["git"]["commit"]) and meta["git"]["commit"][:12] in md
    assert meta["versions"]["torch"] and meta["hardware"]["cores"] >= 1
    assert rep["settings"]["model"] == "llama-debug" and rep["settings"]["quick"] is True
    runs = rep["loop_overhead"]["runs"]
    for key in ("ours", "plain-pg", "plain", "trainer"):  # "plain" holds the partner runs too
        v = rep["loop_overhead"][key]
        why = [r["error"][-2000:] for r in runs.get(key, []) if "error" in r]  # a failed run says why
        assert v["failed"] == 0 and v["median_step_s"] > 0 and v["median_cpu_s"] > 0, (key, v, why)
    assert rep["loop_overhead"]["loss_parity_max_abs_diff"] is not None
    if len(os.sched_getaffinity(0)) >= 2:  # on CPU each loop runs beside a plain-loop run, on the other core
        for key in ("ours", "plain-pg", "trainer", "ours-bf16"):
            for r in runs[key]:
                p = runs["plain"][r["partner"]]
                assert r["core"] != p["core"] and r["started"] < p["ended"] and p["started"] < r["ended"], (key, r, p)
                # both take their first step together: the partner waits until the run reaches its loop
                run_loop, partner_step1 = r["started"] + r["marks"]["stepping"], p["started"] + p["marks"]["first_step"]
                assert run_loop <= partner_step1 < run_loop + 30, (key, run_loop, partner_step1)
    rows = rep["strategies"]["rows"]
    assert [r["strategy"] for r in rows] == ["ddp", "fsdp"]
    assert all(r["tokens_per_second"] > 0 and "error_short" not in r for r in rows), rows
    assert rep["data"]["packed"]["useful_fraction"] == 1.0
    assert [r["strategy"] for r in rep["memory"]["rows"]] == ["ddp", "fsdp"]
    for r in rep["memory"]["rows"]:
        assert all(r[cat]["measured"] > 0 and r[cat]["formula"] > 0 for cat in ("parameters", "gradients", "optimizer"))
    assert rep["precision"]["fp32"]["median_step_s"] > 0 and rep["precision"]["bf16"]["median_step_s"] > 0
    assert {r["run"].split(",")[0] for r in rep["startup"]} >= {"ddp", "fsdp"}
    assert all(r["first_step_s"] > 0 for r in rep["startup"])
    stall = rep["checkpoint_stall"]["rows"]
    bucket = "s3 (moto_server on this machine)"  # no --s3: a local S3 API server
    assert [(r["strategy"], r["async_save"], r["storage"]) for r in stall] == [
        ("ddp", False, "local"), ("fsdp", False, "local"), ("fsdp", True, "local"), ("fsdp", False, bucket)]
    for r in stall:
        assert "error_short" not in r and r["saves"] >= 1 and 0 < r["median_stall_s"] <= r["max_stall_s"], r
    assert stall[2]["ratio_to_sync"] == pytest.approx(stall[2]["median_stall_s"] / stall[1]["median_stall_s"])
    # the bucket's save beside the local one; its upload is part of a synchronous save's stall
    assert stall[3]["ratio_to_local"] == pytest.approx(stall[3]["median_stall_s"] / stall[1]["median_stall_s"])
    assert 0 < stall[3]["median_upload_s"] < stall[3]["median_stall_s"], stall[3]
    assert stall[1]["median_upload_s"] is None and "bucket / local" in md
    scale = rep["data_scale"]  # prepare, the tokenizer's own encode_batch, and the replaced datasets.map
    assert all(scale[k]["tokens_per_s"] > 0 for k in ("prepare", "encode_batch", "datasets_map")), scale
    assert scale["prepare"]["tokens"] == scale["encode_batch"]["tokens"] == scale["datasets_map"]["tokens"]
    assert len(rep["targets"]) == 4 and all(t["met"] is not None for t in rep["targets"])


def test_results_are_named_model_hardware_date_and_never_overwritten(tmp_path):
    from train.tools.bench.report import out_paths

    md, js = out_paths(tmp_path, "llama-tiny", "cpu2-amd-epyc", "2026-01-02")
    assert (md.name, js.name) == ("llama-tiny_cpu2-amd-epyc_2026-01-02.md", "llama-tiny_cpu2-amd-epyc_2026-01-02.json")
    md.write_text("taken")
    md2, js2 = out_paths(tmp_path, "llama-tiny", "cpu2-amd-epyc", "2026-01-02")
    assert md2.name == "llama-tiny_cpu2-amd-epyc_2026-01-02-2.md" and js2.stem == md2.stem


def test_packed_pipeline_keeps_at_least_999_per_mille_of_the_corpus():
    from train.config import load_config
    from train.tools.bench.measure import data_efficiency

    d = data_efficiency(load_config(["SEQ_LEN=128", "MODEL=llama-debug"]))
    assert d["packed"]["useful_fraction"] == 1.0 and d["packed"]["corpus_fraction"] >= 0.999
    assert d["pad_to_max_length"]["useful_fraction"] < 0.9  # the built-in corpus's lines are ~60 tokens
    assert d["packed"]["computed"] <= d["corpus_tokens"]


def test_bench_rejects_unknown_strategies():
    p = subprocess.run([sys.executable, "-m", "train", "bench", "--strategies", "ddp,zero9"], cwd=REPO,
                       env=job_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "zero9" in p.stderr and "allowed" in p.stderr
    assert not list(Path(REPO / "bench-results").glob("*zero9*"))
