"""Data: loading local files through `datasets`, packing, and one global sample order."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from torch.utils.data import BatchSampler

from train.config import ConfigError, DataConfig, ModelConfig
from train.data import GlobalCursorSampler, build_splits, load_text, resolve_source, tokenize_and_pack
from train.worker.model import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelConfig(name="llama-tiny"))


def test_packing_wastes_under_a_tenth_of_a_percent_and_pads_nothing(tokenizer):
    cfg = DataConfig(seq_len=128)
    tokenized, packed = tokenize_and_pack(load_text(cfg), tokenizer, cfg)
    raw = sum(len(x) for x in tokenized["input_ids"])
    blocks = packed["input_ids"]
    assert all(len(b) == 128 for b in blocks)
    assert len(blocks) * 128 / raw >= 0.999
    assert tokenizer.pad_token_id not in {t for b in blocks[:50] for t in b if t != tokenizer.eos_token_id}


def test_eval_split_is_held_out_and_deterministic(tokenizer):
    a = build_splits(DataConfig(seq_len=64), tokenizer, seed=1)
    b = build_splits(DataConfig(seq_len=64), tokenizer, seed=1)
    assert torch.equal(a.eval.blocks, b.eval.blocks) and torch.equal(a.train.blocks, b.train.blocks)
    train_rows = {tuple(r.tolist()) for r in a.train.blocks}
    assert not any(tuple(r.tolist()) in train_rows for r in a.eval.blocks)


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "parquet"])
def test_local_files_load_through_datasets(tmp_path, fmt, tokenizer):
    lines = [f"line {i} about a cat and a dog." for i in range(400)]
    path = tmp_path / f"data.{fmt}"
    if fmt == "txt":
        path.write_text("\n".join(lines))
    elif fmt == "jsonl":
        path.write_text("\n".join(json.dumps({"text": t}) for t in lines))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": lines}), path)
    splits = build_splits(DataConfig(dataset=str(path), seq_len=16), tokenizer, seed=0)
    assert len(splits.train) > 50


def test_a_directory_of_files_is_one_dataset(tmp_path, tokenizer):
    for i in range(3):
        (tmp_path / f"part{i}.txt").write_text("\n".join(f"doc {i} {j} text" for j in range(200)))
    assert len(load_text(DataConfig(dataset=str(tmp_path)))) == 600


@pytest.mark.parametrize("name, content, message", [
    ("missing.txt", None, "data file '{}' not found"),
    ("empty.txt", "", "data file '{}' is empty"),
    ("x.xyz", "a", "data file '{}': unknown extension; allowed: .csv"),
    ("", None, "data directory '{}' holds no non-empty"),
])
def test_bad_data_sources_are_named(tmp_path, name, content, message):
    path = tmp_path / name if name else tmp_path
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as e:
        resolve_source(DataConfig(dataset=str(path)))
    assert message.format(path) in str(e.value)


def test_jsonl_without_the_text_field_is_refused(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ConfigError, match="has no column 'text'"):
        load_text(DataConfig(dataset=str(p)))


def test_permutation_depends_only_on_seed_and_epoch():
    a, b = GlobalCursorSampler(100, 8, seed=3), GlobalCursorSampler(100, 8, seed=3)
    assert torch.equal(a.permutation(2), b.permutation(2))
    assert not torch.equal(a.permutation(0), a.permutation(1))
    assert len(a.permutation(0)) == 96  # whole global batches only


def _steps(world: int, accum: int, micro: int, start: int = 0, epoch: int = 0):
    """Which samples each optimizer step consumes, using accelerate's own rank sharding."""
    sampler = GlobalCursorSampler(96, micro * accum * world, seed=5)
    sampler.set_position(epoch, start)
    per_rank = [list(BatchSamplerShard(BatchSampler(sampler, micro, drop_last=True), world, r)) for r in range(world)]
    n_steps = len(per_rank[0]) // accum
    return [sorted(i for r in range(world) for b in per_rank[r][s * accum:(s + 1) * accum] for i in b)
            for s in range(n_steps)]


def test_a_step_consumes_the_same_samples_whatever_the_world_size():
    reference = _steps(world=1, accum=4, micro=2)
    assert _steps(world=2, accum=2, micro=2) == reference
    assert _steps(world=4, accum=1, micro=2) == reference


def test_resume_cursor_continues_the_same_sequence_on_another_world_size():
    full = _steps(world=2, accum=1, micro=4)
    assert _steps(world=4, accum=1, micro=2, start=3 * 8) == full[3:]
    with pytest.raises(ValueError):
        GlobalCursorSampler(96, 8, seed=5).set_position(0, 5)


def _accepted(check, *args) -> bool:
    try:
        check(*args)
        return True
    except ConfigError:
        return False


def test_the_launchers_sample_check_accepts_exactly_what_the_workers_can_train_on(tmp_path, tokenizer):
    """check_sample (launcher, streamed, no Arrow cache) and build_splits + the sampler (workers)
    agree on the boundary: the launcher refuses precisely the datasets a worker would fail on."""
    from train.data import check_sample

    global_batch, verdicts = 8, set()
    for n_docs in range(4, 40, 3):
        path = tmp_path / f"d{n_docs}.txt"
        path.write_text("\n".join(f"doc {i}: the cat sat on the mat and looked at a bird." for i in range(n_docs)))
        cfg = DataConfig(dataset=str(path), seq_len=32, eval_fraction=0.1)
        launcher = _accepted(check_sample, cfg, tokenizer, global_batch)

        def workers():
            splits = build_splits(cfg, tokenizer, seed=0)
            GlobalCursorSampler(len(splits.train), global_batch, seed=0)

        assert launcher == _accepted(workers), n_docs
        verdicts.add(launcher)
    assert verdicts == {True, False}  # the range crosses the boundary


def test_sample_check_reads_at_most_max_rows_and_leaves_larger_datasets_to_the_workers(tmp_path, tokenizer):
    """Reading to the end of a hub-sized dataset would cost what the workers pay once: the
    launcher judges "too little data" only for a dataset that ends within its sample."""
    from train.data import check_sample

    path = tmp_path / "big.txt"
    path.write_text("\n".join(f"line {i} of a long corpus." for i in range(6_000)))
    cfg = DataConfig(dataset=str(path), seq_len=32)
    check_sample(cfg, tokenizer, global_batch=100_000, max_rows=2_000)  # not read to the end: no verdict
    with pytest.raises(ConfigError, match="needs"):
        check_sample(cfg, tokenizer, global_batch=100_000, max_rows=10_000)  # read to the end: too little


def test_data_cache_dir_is_where_datasets_caches(tmp_path, tokenizer):
    path = tmp_path / "d.txt"
    path.write_text("\n".join(f"doc {i} text" for i in range(100)))
    cache = tmp_path / "cache"
    load_text(DataConfig(dataset=str(path), cache_dir=str(cache)))
    assert any(cache.rglob("*.arrow"))
