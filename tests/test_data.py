"""Data: sources prepared into token shards, read through memory maps, held out by document,
mixed by weight, and ordered by one global cursor whatever the world size."""

from __future__ import annotations

import fcntl
import json
import multiprocessing
import signal

import numpy as np
import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from torch.utils.data import BatchSampler

from helpers import dir_bytes, prepare_cli, write_docs
from train.config import ConfigError, DataConfig, ModelConfig, load_config
from train.data import GlobalCursorSampler, build_splits, check_splits, open_source, resolve_source
from train.data.loader import MixtureBlocks, TokenBlocks, apportion
from train.data.prepare import cache_entry, prepare
from train.data.shards import MANIFEST, Corpus
from train.worker.model import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelConfig(name="llama-debug"))


def data_cfg(tmp_path, **kw) -> DataConfig:
    """Caches under the test's own directory: no test sees another's prepared data."""
    return DataConfig(cache_dir=str(tmp_path / "cache"), **kw)


def ids_of(tokenizer, docs: list[str]) -> list[int]:
    """What the shards must hold: each document's ids, then EOS (the old datasets.map path)."""
    return [t for ids in tokenizer(docs, add_special_tokens=False)["input_ids"] for t in [*ids, tokenizer.eos_token_id]]


# -- prepare -----------------------------------------------------------------------------------
def test_shards_hold_the_tokenizers_ids_with_eos_after_each_document(tmp_path, tokenizer):
    docs = write_docs(tmp_path / "d.txt", 500)
    docs[7] = "   "  # a blank document carries no tokens
    (tmp_path / "d.txt").write_text("\n".join(docs) + "\n")
    corpus = prepare([str(tmp_path / "d.txt")], tmp_path / "p", tokenizer, data_cfg(tmp_path, shard_tokens=1000))
    want = ids_of(tokenizer, [d for d in docs if d.strip()])
    assert corpus.tokens(0, corpus.num_tokens).tolist() == want  # read across every shard boundary
    assert corpus.num_documents == 499 and len(corpus.shards) > 3 and corpus.dtype == "<u2"
    ends = np.cumsum(corpus.document_lengths())
    assert ends[-1] == len(want) and all(want[e - 1] == tokenizer.eos_token_id for e in ends)


def test_prepare_gives_the_same_bytes_for_1_and_2_workers_and_records_what_it_read(tmp_path, tokenizer):
    write_docs(tmp_path / "d.txt", 3000)
    cfg = data_cfg(tmp_path, shard_tokens=5000)
    a = prepare([str(tmp_path / "d.txt")], tmp_path / "a", tokenizer, cfg, workers=1)
    prepare([str(tmp_path / "d.txt")], tmp_path / "b", tokenizer, cfg, workers=2)
    assert dir_bytes(tmp_path / "a") == dir_bytes(tmp_path / "b")
    m = a.manifest
    assert m["tokenizer"]["vocab_size"] == len(tokenizer) and m["tokenizer"]["eos"] == tokenizer.eos_token_id
    assert m["sources"][0]["source"] == str(tmp_path / "d.txt") and m["documents"] == 3000 and m["rows"] == 3000
    assert m["tokens"] == sum(s["tokens"] for s in m["shards"]) == a.num_tokens
    assert set(m["arrays"]) == {"tokens", "docs"}  # one entry per array: a loss mask would be a third
    assert sorted(f.name for f in (tmp_path / "a").iterdir()) == [MANIFEST] + sorted(
        f"{s['name']}{x}" for s in m["shards"] for x in (".docs", ".tokens"))


def test_a_killed_prepare_leaves_no_manifest_and_a_rerun_continues_to_the_same_bytes(tmp_path, tokenizer):
    write_docs(tmp_path / "d.txt", 4000)
    settings = {"data.shard_tokens": 4000, "data.prepare_workers": 1}
    prepare([str(tmp_path / "d.txt")], tmp_path / "whole", tokenizer, DataConfig(shard_tokens=4000))
    out = tmp_path / "killed"
    p = prepare_cli(out, tmp_path / "d.txt", env={"TRAIN_FAILPOINTS": "prepare_kill_after=3"}, check=False, **settings)
    assert p.returncode == -signal.SIGKILL
    assert not (out / MANIFEST).exists() and (out / "shard-00002.json").exists()
    assert (out / ".tmp-shard-00003.tokens").stat().st_size > 0  # the shard being written: under a temp name
    with pytest.raises(ConfigError, match="unfinished prepare"):
        open_source(str(out), DataConfig(), load_tokenizer(ModelConfig(name="llama-debug")))
    p = prepare_cli(out, tmp_path / "d.txt", **settings)
    assert "continuing" in p.stdout and "skipping their" in p.stdout
    assert dir_bytes(out) == dir_bytes(tmp_path / "whole")


def test_a_raw_dataset_is_prepared_into_the_cache_once_and_then_only_opened(tmp_path, tokenizer):
    write_docs(tmp_path / "d.txt", 300)
    cfg, said = data_cfg(tmp_path, dataset=str(tmp_path / "d.txt")), []
    first = open_source(cfg.dataset, cfg, tokenizer, log=said.append)
    again = open_source(cfg.dataset, cfg, tokenizer, log=said.append)
    assert first.path == again.path and first.path.parent == tmp_path / "cache" / "prepared"
    assert sum(s.startswith("[data] preparing") for s in said) == 1
    write_docs(tmp_path / "d.txt", 301)  # another input: another cache entry
    assert open_source(cfg.dataset, cfg, tokenizer, log=said.append).path != first.path


def _open_in_process(path: str, cache: str, q) -> None:
    from train.config import DataConfig, ModelConfig
    from train.data import open_source
    from train.worker.model import load_tokenizer

    c = open_source(path, DataConfig(cache_dir=cache), load_tokenizer(ModelConfig(name="llama-debug")), log=q.put)
    q.put(("opened", str(c.path)))


def test_a_process_finding_the_cache_entry_being_prepared_waits_and_opens_it_without_preparing(tmp_path, tokenizer):
    """Two launchers on shared storage (or ranks without a launcher): the cache entry is
    prepared under a file lock; the other process waits for it and only opens the result."""
    write_docs(tmp_path / "d.txt", 2000)
    cfg = data_cfg(tmp_path, dataset=str(tmp_path / "d.txt"))
    entry = cache_entry(cfg.dataset, cfg, tokenizer)
    entry.parent.mkdir(parents=True)
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    with open(entry.with_name(entry.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as the process preparing it holds it
        other = ctx.Process(target=_open_in_process, args=(cfg.dataset, cfg.cache_dir, q))
        other.start()
        assert "waiting for another process preparing" in q.get(timeout=300)
        prepare([cfg.dataset], entry, tokenizer, cfg)
    assert q.get(timeout=120) == ("opened", str(entry))
    other.join(timeout=60)
    assert other.exitcode == 0


# -- reading, and the held-out split --------------------------------------------------------------
def test_eval_is_held_out_by_document_and_training_reads_only_the_rest(tmp_path, tokenizer):
    docs = write_docs(tmp_path / "d.txt", 1000)
    cfg = data_cfg(tmp_path, dataset=str(tmp_path / "d.txt"), seq_len=16, eval_fraction=0.1, shard_tokens=3000)
    splits = build_splits(cfg, tokenizer, seed=0)
    stream = ids_of(tokenizer, docs)
    cut = splits.eval.start
    assert splits.train.start == 0 and len(splits.train) == cut // 16
    assert stream[cut - 1] == tokenizer.eos_token_id  # the cut is a document end
    assert 0.08 < 1 - cut / len(stream) <= 0.1
    assert splits.eval[0]["input_ids"].tolist() == stream[cut:cut + 16]
    doc_ends = np.cumsum([len(x) + 1 for x in tokenizer(docs, add_special_tokens=False)["input_ids"]])
    assert cut in doc_ends  # no document straddles the cut
    assert splits.train[len(splits.train) - 1]["input_ids"].dtype == torch.int64


def test_a_separate_eval_dataset_is_held_out_whole_and_training_uses_all_of_dataset(tmp_path, tokenizer):
    docs = write_docs(tmp_path / "train.txt", 400)
    held = write_docs(tmp_path / "eval.txt", 100, seed=9, tag="held ")
    cfg = data_cfg(tmp_path, dataset=str(tmp_path / "train.txt"), eval_dataset=str(tmp_path / "eval.txt"), seq_len=16)
    splits = build_splits(cfg, tokenizer, seed=0)
    assert len(splits.train) == len(ids_of(tokenizer, docs)) // 16
    assert len(splits.eval) == len(ids_of(tokenizer, held)) // 16
    assert splits.eval[0]["input_ids"].tolist() == ids_of(tokenizer, held)[:16]
    assert "eval blocks from data.eval_dataset" in splits.described


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_other_local_formats_prepare_through_datasets(tmp_path, fmt, tokenizer):
    lines = [f"line {i} about a cat and a dog." for i in range(400)]
    path = tmp_path / f"data.{fmt}"
    if fmt == "jsonl":
        path.write_text("\n".join(json.dumps({"text": t}) for t in lines))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": lines}), path)
    corpus = open_source(str(path), data_cfg(tmp_path), tokenizer)
    assert corpus.tokens(0, corpus.num_tokens).tolist() == ids_of(tokenizer, lines)


# -- bad input: one line, naming the value and what is allowed ---------------------------------------
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
        resolve_source(str(path))
    assert message.format(path) in str(e.value)


def test_jsonl_without_the_text_field_is_refused(tmp_path, tokenizer):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ConfigError, match="has no column 'text'"):
        open_source(str(p), data_cfg(tmp_path), tokenizer)


@pytest.fixture
def prepared(tmp_path, tokenizer):
    write_docs(tmp_path / "d.txt", 600)
    return prepare([str(tmp_path / "d.txt")], tmp_path / "p", tokenizer, data_cfg(tmp_path, shard_tokens=2000))


def test_a_directory_prepared_with_another_tokenizer_is_refused(prepared, tmp_path, tokenizer):
    other = load_tokenizer(ModelConfig(name="llama-debug"))
    other.add_tokens(["<extra>"])
    with pytest.raises(ConfigError, match=r"was prepared with another tokenizer .* prepare it again"):
        open_source(str(prepared.path), data_cfg(tmp_path), other)


def test_a_truncated_or_missing_shard_is_named(prepared, tmp_path, tokenizer):
    f = prepared.path / "shard-00001.tokens"
    f.write_bytes(f.read_bytes()[:-2])
    with pytest.raises(ConfigError, match=r"shard file shard-00001.tokens is \d+ bytes, the manifest says \d+ \(truncated\)"):
        open_source(str(prepared.path), data_cfg(tmp_path), tokenizer)
    f.unlink()
    with pytest.raises(ConfigError, match="shard file shard-00001.tokens is missing"):
        Corpus(prepared.path)


def test_seq_len_longer_than_the_corpus_allows_is_refused_from_the_manifest(prepared, tmp_path, tokenizer):
    cfg = data_cfg(tmp_path, dataset=str(prepared.path), seq_len=40_000)
    with pytest.raises(ConfigError, match=r"gives 0 training blocks of SEQ_LEN=40000 tokens .* smaller SEQ_LEN"):
        check_splits(build_splits(cfg, tokenizer, seed=0), cfg, global_batch=8)


@pytest.mark.parametrize("mixture, message", [
    ("{p}=0.5,{tmp}/nope=0.5", "data file '{tmp}/nope' not found"),
    ("{p}=0", "data.mixture weight 0 of '{p}' must be a positive number"),
    ("{p}=-1", "must be a positive number"),
    ("{p}=x", "data.mixture weight 'x' of '{p}' is not a number"),
    ("{p}", "is not SOURCE=WEIGHT"),
])
def test_bad_mixtures_are_named(prepared, tmp_path, tokenizer, mixture, message):
    fill = {"p": prepared.path, "tmp": tmp_path}
    cfg = data_cfg(tmp_path, mixture=mixture.format(**fill))
    with pytest.raises(ConfigError) as e:
        build_splits(cfg, tokenizer, seed=0)
    assert message.format(**fill) in str(e.value)


def test_mixture_sources_that_disagree_on_dtype_are_refused(prepared, tmp_path, tokenizer):
    import shutil

    other = tmp_path / "wide"
    shutil.copytree(prepared.path, other)
    m = json.loads((other / MANIFEST).read_text())
    m["arrays"]["tokens"]["dtype"] = m["dtype"] = "<u4"
    for s in m["shards"]:  # a consistent uint32 copy: each id widened
        f = other / f"{s['name']}.tokens"
        f.write_bytes(np.fromfile(f, "<u2").astype("<u4").tobytes())
    (other / MANIFEST).write_text(json.dumps(m))
    cfg = data_cfg(tmp_path, mixture=f"{prepared.path}=1,{other}=1")
    with pytest.raises(ConfigError, match="disagree on dtype or tokenizer"):
        build_splits(cfg, tokenizer, seed=0)


def test_mixture_in_yaml_is_a_list_of_datasets_and_weights(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("data:\n  mixture:\n    - {dataset: data/web, weight: 0.7}\n    - {dataset: data/code, weight: 0.3}\n")
    assert load_config([f"CONFIG={run}"], env={}, dotenv_path=None).data.mixture == "data/web=0.7,data/code=0.3"


# -- one global order ---------------------------------------------------------------------------------
def test_permutation_depends_only_on_seed_and_epoch():
    a, b = GlobalCursorSampler(100, 8, seed=3), GlobalCursorSampler(100, 8, seed=3)
    assert torch.equal(a.permutation(2), b.permutation(2))
    assert not torch.equal(a.permutation(0), a.permutation(1))
    assert len(a.permutation(0)) == 96  # whole global batches only


def test_the_order_is_a_permutation_and_a_billion_blocks_cost_a_rank_no_memory():
    import itertools
    import tracemalloc

    from train.data.loader import KeyedPermutation

    for n in (1, 2, 3, 96, 1001, 65_537):
        assert sorted(KeyedPermutation(n, seed=7)(np.arange(n, dtype=np.uint64)).tolist()) == list(range(n))
    sampler = GlobalCursorSampler(10**9, 8, seed=3)
    sampler.set_position(2, 8 * 10**6)  # a resume deep into epoch 2: no skipping, nothing materialized
    tracemalloc.start()
    first = list(itertools.islice(iter(sampler), 100_000))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(set(first)) == 100_000 and 0 <= min(first) and max(first) < 10**9
    assert peak < 50e6, peak  # randperm would hold 8 GB, its tolist ~40 GB


def _steps(world: int, accum: int, micro: int, start: int = 0, epoch: int = 0, dataset=None, n: int = 96):
    """Which samples each optimizer step consumes, using accelerate's own rank sharding."""
    sampler = GlobalCursorSampler(n, micro * accum * world, seed=5, dataset=dataset)
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


# -- mixtures -----------------------------------------------------------------------------------------
class _Blocks(TokenBlocks):
    """A source of ``n`` blocks, no files: the mixture's arithmetic is what is under test here."""

    def __init__(self, n: int):
        self.n = n


def test_apportion_gives_every_sample_to_a_source_by_weight():
    assert apportion(10, [0.7, 0.3]) == [7, 3] and apportion(10, [1, 1, 1]) == [4, 3, 3]
    assert sum(apportion(997, [0.2, 0.5, 0.3])) == 997


TOLERANCE = 1  # samples per source in any window of consecutive samples, whatever its length


def test_mixture_proportions_hold_in_every_window_of_steps_and_the_order_is_the_same_on_1_and_2_ranks():
    """70/30 over sources of 300 and 500 blocks (the small one repeats, the large one is read in
    part each epoch): every window of consecutive steps holds each source's share within one
    sample, and 1 rank x 4 micro-batches consumes what 2 ranks x 2 do, step by step."""
    mix = MixtureBlocks([_Blocks(300), _Blocks(500)], [0.7, 0.3], seed=5)
    assert mix.quota == [560, 240] and len(mix) == 800
    one = _steps(world=1, accum=4, micro=2, dataset=mix, n=len(mix))
    assert _steps(world=2, accum=2, micro=2, dataset=mix, n=len(mix)) == one
    sources = [mix.source_of(i) for step in one for i in step]  # the training order, step after step
    for window in (8, 24, 80, 400):
        for a in range(0, len(sources) - window + 1, 8):
            web = sources[a:a + window].count(0)
            assert abs(web - 0.7 * window) <= TOLERANCE + 1e-9, (window, a, web)
    # Epoch 1 continues each source where epoch 0 stopped, and the ids name epoch and slot.
    e0, e1 = mix.epoch_order(0), mix.epoch_order(1)
    assert set(e0.tolist()) == set(range(800)) and set(e1.tolist()) == set(range(800, 1600))
    assert _steps(world=2, accum=1, micro=4, dataset=mix, n=800, start=5 * 8) == \
        _steps(world=1, accum=2, micro=4, dataset=mix, n=800)[5:]


def test_a_mixture_reads_each_sources_blocks_and_wraps_a_source_that_runs_out(tmp_path, tokenizer):
    write_docs(tmp_path / "web.txt", 400, tag="web ")
    write_docs(tmp_path / "code.txt", 100, seed=1, tag="code ")
    cfg = data_cfg(tmp_path, mixture=f"{tmp_path / 'web.txt'}=0.5,{tmp_path / 'code.txt'}=0.5", seq_len=16)
    splits = build_splits(cfg, tokenizer, seed=0)
    mix = splits.train
    web, code = mix.parts
    assert len(code) < mix.quota[1]  # the small source must repeat within one epoch
    got = [mix[int(i)]["input_ids"].tolist() for i in mix.epoch_order(0)[:200]]
    from_code = [x for x in got if x in [code.block(k).tolist() for k in range(len(code))]]
    assert abs(len(from_code) - 100) <= TOLERANCE
    assert len(splits.eval) == sum(len(p) for p in splits.eval.parts) > 0  # each source's held-out documents
