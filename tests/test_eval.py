"""Evaluation that can be trusted: named eval sets read whole, the same value for any world size,
labels of -100 not counted, no random numbers drawn; and the lm-eval harness on the export.

The multi-process runs (module-scoped, shared by the tests below them) train 2 steps of the same
global batch and evaluate after each: ddp on 2 ranks (with the harness hook), ddp on 1 rank and
fsdp on 2 ranks. Both eval sets have an odd number of blocks that is no multiple of
MICRO_BATCH x world size, so a rank share that dropped or repeated a block would show.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from helpers import REPO, TINY, assert_refused, command, read_metrics, snapshot, train, write_docs
from train.worker.evaluate import blocks_to_read, evaluate_sets, rank_batches

TASK = REPO / "configs" / "lm_eval" / "tiny_stories.yaml"
SETS = ("heldout", "other")


# -- how blocks are shared out (no processes) -------------------------------------------------------
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("micro_batch", [1, 3, 4])
def test_over_all_ranks_every_block_is_read_exactly_once_in_the_same_number_of_passes(world, micro_batch):
    for n in range(0, 30):
        shares = [rank_batches(n, r, world, micro_batch) for r in range(world)]
        read = sorted(i for share in shares for batch in share for i in batch if i is not None)
        assert read == list(range(n)), (n, world, micro_batch)
        assert len({len(share) for share in shares}) == 1  # a collective forward pass on every rank, each time
        assert all(len(batch) == micro_batch for share in shares for batch in share)


def test_a_token_budget_reads_the_first_whole_blocks_holding_at_least_that_many_tokens():
    assert blocks_to_read(395, 0, 32) == 395  # 0: all of it
    assert blocks_to_read(395, 64, 32) == 2
    assert blocks_to_read(395, 65, 32) == 3
    assert blocks_to_read(5, 10_000, 32) == 5


# -- one process: what the number is -----------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model():
    from train.config import load_config
    from train.worker.model import build_model, load_tokenizer

    cfg = load_config([f"MODEL={TINY['MODEL']}"])
    torch.manual_seed(0)
    return build_model(cfg.model, len(load_tokenizer(cfg.model))).eval()


def _blocks(n: int, seq_len: int = 16, masked: int = 0) -> list[dict]:
    """``n`` blocks; the first ``masked`` labels of each are -100 (a prompt: no loss, no tokens)."""
    g = torch.Generator().manual_seed(n)
    out = []
    for i in range(n):
        x = torch.randint(0, 256, (seq_len,), generator=g)  # inside any vocabulary
        y = x.clone()
        y[:masked] = -100
        out.append({"input_ids": x, "labels": y, "index": torch.tensor(i)})
    return out


def _by_hand(model, blocks) -> tuple[float, int]:
    """The token-weighted mean loss, one block at a time: summed cross entropy / counted tokens."""
    total, count = 0.0, 0
    with torch.no_grad():
        for b in blocks:
            logits = model(input_ids=b["input_ids"][None]).logits[0, :-1].double()
            target = b["labels"][1:]
            keep = target != -100
            total += torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum").item()
            count += int(keep.sum())
    return total / count, count


def test_the_eval_loss_is_the_token_weighted_mean_over_the_whole_set_and_masked_labels_are_no_tokens(tiny_model):
    """7 blocks in micro-batches of 3 (the last one short): every block counts once; the first 5
    labels of each block are -100 and count neither as loss nor as tokens."""
    blocks = _blocks(7, masked=5)
    row = evaluate_sets(tiny_model, {"s": blocks}, rank=0, world=1, micro_batch=3, seq_len=16, eval_tokens=0,
                        device=torch.device("cpu"), all_reduce_sum=lambda t: t)
    loss, tokens = _by_hand(tiny_model, blocks)
    assert row["eval/s/tokens"] == tokens == 7 * (16 - 5)  # label 0 is never predicted; 1..4 are masked
    assert row["eval/s/loss"] == pytest.approx(loss, rel=1e-6)
    assert row["eval/s/ppl"] == pytest.approx(math.exp(loss), rel=1e-6)


def test_evaluation_draws_no_random_numbers_and_restores_training_mode(tiny_model):
    """A resumed run trains the same whether or not it evaluated: the global RNG (dropout, LoRA's)
    is where it was, and the model is back in training mode."""
    tiny_model.train()
    before = torch.get_rng_state()
    evaluate_sets(tiny_model, {"s": _blocks(5)}, rank=0, world=1, micro_batch=2, seq_len=16, eval_tokens=0,
                  device=torch.device("cpu"), all_reduce_sum=lambda t: t)
    assert torch.equal(torch.get_rng_state(), before)
    assert tiny_model.training
    tiny_model.eval()


def test_eval_sets_are_a_mapping_in_a_run_file_and_name_source_pairs_on_the_command_line(tmp_path):
    from train.config import load_config
    from train.config.schema import eval_set_specs

    run_file = tmp_path / "run.yaml"
    run_file.write_text("data:\n  eval_sets:\n    stories: builtin:tiny-stories\n    web: /data/web.jsonl\n")
    expected = [("stories", "builtin:tiny-stories"), ("web", "/data/web.jsonl")]
    assert eval_set_specs(load_config([f"CONFIG={run_file}"]).data) == expected
    assert eval_set_specs(load_config(["EVAL_SETS=stories=builtin:tiny-stories,web=/data/web.jsonl"]).data) == expected


# -- bad input: one line, exit 2, before anything starts ------------------------------------------
@pytest.mark.parametrize("settings,fragments", [
    ({"EVAL_SETS": "stories=/nonexistent/stories.jsonl"}, ("eval set 'stories'", "/nonexistent/stories.jsonl", "not found")),
    ({"EVAL_SETS": "a=builtin:tiny-stories,a=builtin:tiny-stories"}, ("name 'a' is given twice",)),
    ({"EVAL_SETS": "heldout=builtin:tiny-stories"}, ("name 'heldout'", "held-out split")),
    ({"train.eval_batches": "4"}, ("train.eval_batches", "removed", "train.eval_tokens")),
    pytest.param({"HARNESS_TASKS": "no_such_task_anywhere"}, ("unknown lm-eval task 'no_such_task_anywhere'",),
                 marks=pytest.mark.slow),  # lm-eval's index of its ~15k task files: 10-35 s
    ({"HARNESS_TASKS": "configs/lm_eval/missing.yaml"}, ("task file 'configs/lm_eval/missing.yaml' not found",)),
], ids=["missing-set", "duplicate-name", "reserved-name", "eval-batches", "unknown-task", "missing-task-file"])
def test_bad_eval_settings_are_refused_in_one_line_before_anything_starts(tmp_path, settings, fragments):
    before = snapshot(tmp_path)
    p = train(tmp_path / "run", check=False, **settings)
    assert_refused(p, *fragments, out=tmp_path, before=before)


# -- real jobs: 1 and 2 ranks, ddp and fsdp ----------------------------------------------------------
RUN = {"MAX_STEPS": 2, "GLOBAL_BATCH": 8, "train.eval_every": 1, "train.eval_tokens": 0, "CHECKPOINT_EVERY": 0,
       "checkpoint.export": "false"}


@pytest.fixture(scope="module")
def other_set(tmp_path_factory):
    path = tmp_path_factory.mktemp("evalset") / "other.txt"
    write_docs(path, 40, seed=3)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, other_set):
    """name -> (output dir, stdout) of the three runs; ddp2 exports and runs the harness hook."""
    out = {}
    for name, extra in [
        ("ddp2", {"checkpoint.export": "true", "HARNESS_TASKS": str(TASK), "checkpoint.harness_limit": 8}),
        ("ddp1", {"NPROC": 1}),
        ("fsdp2", {"STRATEGY": "fsdp"}),
    ]:
        d = tmp_path_factory.mktemp(name)
        p = train(d, EVAL_SETS=f"other={other_set}", **{**RUN, **extra})
        out[name] = (d, p.stdout)
    return out


def eval_rows(out) -> list[dict]:
    return [r for r in read_metrics(out, raw=True) if any(k.startswith("eval/") for k in r)]


def set_blocks(stdout: str) -> dict[str, int]:
    """Blocks per eval set, as the run's start-up line gives them."""
    line = next(ln for ln in stdout.splitlines() if ln.startswith("[train] data:"))
    return {"heldout": int(re.search(r"([\d,]+) eval blocks", line).group(1).replace(",", "")),
            "other": int(re.search(r"eval set 'other': ([\d,]+) blocks", line).group(1).replace(",", ""))}


@pytest.mark.slow
def test_each_eval_set_is_logged_under_its_name_over_all_of_its_blocks(runs):
    out, stdout = runs["ddp2"]
    blocks = set_blocks(stdout)
    assert all(n % 2 and n % 8 for n in blocks.values()), blocks  # uneven rank shares, a short last micro-batch
    rows = eval_rows(out)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        for name in SETS:
            assert r[f"eval/{name}/tokens"] == blocks[name] * (32 - 1)  # every block once, each label but the first
            assert math.isfinite(r[f"eval/{name}/loss"])
            assert r[f"eval/{name}/ppl"] == pytest.approx(math.exp(r[f"eval/{name}/loss"]), rel=1e-9)
    assert "eval/heldout/loss=" in stdout and "eval/other/loss=" in stdout


@pytest.mark.slow
@pytest.mark.parametrize("other", ["ddp1", "fsdp2"])
def test_the_eval_value_is_the_same_for_1_and_2_ranks_and_under_fsdp(runs, other):
    """Same global batch, same samples per step: 1 rank vs 2 (ddp), and ddp vs fsdp on 2 ranks,
    log the same eval loss for each set at each step (fp32; the bound of tests/test_strategies.py)."""
    ref, got = eval_rows(runs["ddp2"][0]), eval_rows(runs[other][0])
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    for a, b in zip(ref, got):
        for name in SETS:
            assert b[f"eval/{name}/tokens"] == a[f"eval/{name}/tokens"]
            assert b[f"eval/{name}/loss"] == pytest.approx(a[f"eval/{name}/loss"], abs=1e-5, rel=0), (name, a["step"])


@pytest.mark.slow
def test_the_logged_eval_loss_is_the_exported_models_loss_over_every_block_of_the_set(runs, other_set):
    """Recomputed here, one block at a time on the export (the weights after the last step), from
    the eval set's own blocks: the same token-weighted loss as the run logged at that step."""
    from transformers import AutoModelForCausalLM

    from train.config import load_config
    from train.data.loader import TokenBlocks
    from train.data.prepare import open_source
    from train.worker.model import load_tokenizer

    out, _ = runs["ddp2"]
    cfg = load_config([f"MODEL={TINY['MODEL']}", f"SEQ_LEN={TINY['SEQ_LEN']}"])
    corpus = open_source(str(other_set), cfg.data, load_tokenizer(cfg.model))  # the run's prepared cache
    blocks = TokenBlocks(corpus, 0, corpus.num_tokens, cfg.data.seq_len)
    model = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    loss, tokens = _by_hand(model, [blocks[i] for i in range(len(blocks))])
    last = eval_rows(out)[-1]
    assert last["eval/other/tokens"] == tokens
    assert last["eval/other/loss"] == pytest.approx(loss, abs=1e-5, rel=0)


# -- the benchmark harness -------------------------------------------------------------------------
def harness_metrics(record: dict) -> dict:
    return {k: v for k, v in record["metrics"].items() if k.startswith("harness/tiny_stories/")}


@pytest.mark.slow
def test_the_harness_hook_runs_the_local_task_on_the_export_after_the_run(runs):
    out, stdout = runs["ddp2"]
    assert "[launch] benchmark harness on" in stdout
    record = json.loads((out / "final" / "harness.json").read_text())
    m = harness_metrics(record)
    assert set(m) == {f"harness/tiny_stories/{k}" for k in ("word_perplexity", "byte_perplexity", "bits_per_byte")}
    assert record["results"]["tiny_stories"]["sample_len"] == 8  # checkpoint.harness_limit
    assert 1 < m["harness/tiny_stories/byte_perplexity"] < 2048  # a model, not noise: fewer than all byte values
    logged = [r for r in read_metrics(out, raw=True) if "harness/tiny_stories/bits_per_byte" in r]
    assert [r["step"] for r in logged] == [2] and logged[0] | m == logged[0]


@pytest.mark.slow
def test_the_harness_command_exports_a_checkpoint_and_scores_it_like_the_final_export(runs):
    """`harness --model CHECKPOINT` exports it beside the run first; the last checkpoint holds the
    final weights, so it scores what the end-of-run hook scored."""
    out, _ = runs["ddp2"]
    ckpt = out / "checkpoints" / "step_00000002"
    p = command("harness", "--model", str(ckpt), "--tasks", str(TASK), "--limit", "8")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    record = json.loads((out / "harness" / "step_00000002" / "harness.json").read_text())
    final = json.loads((out / "final" / "harness.json").read_text())
    assert harness_metrics(record) == pytest.approx(harness_metrics(final), rel=1e-6)
