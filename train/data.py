"""Data: load with `datasets`, tokenize with a cached `map`, pack into fixed-length blocks,
split off a held-out eval set, and order samples by one global cursor.

Data order is defined globally, not per rank: epoch e visits ``permutation(seed, e)`` and an
optimizer step consumes the next ``global_batch`` entries of it. accelerate's batch-sampler
sharding then hands micro-batch k to rank ``k % world_size``, so a step covers the same
samples whatever the world size / accumulation split, and a resume only needs
(epoch, samples consumed in the epoch) - no `skip_first_batches`, no sampler RNG state.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .config import ConfigError, DataConfig
from .corpus import BUILTIN_DATASETS

_FILE_BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json", ".json": "json",
                  ".parquet": "parquet", ".csv": "csv"}


def resolve_source(cfg: DataConfig) -> tuple[str, dict]:
    """(builder or hub id, load_dataset kwargs) for the configured dataset, checked for existence."""
    name = cfg.dataset
    if name.startswith("builtin:"):
        key = name.split(":", 1)[1]
        if key not in BUILTIN_DATASETS:
            raise ConfigError(f"unknown built-in dataset {name!r}; allowed: {', '.join('builtin:' + k for k in BUILTIN_DATASETS)}")
        return "text", {"data_files": {"train": str(BUILTIN_DATASETS[key])}}
    p = Path(name)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix.lower() in _FILE_BUILDERS and f.stat().st_size > 0)
        if not files:
            raise ConfigError(f"data directory {name!r} holds no non-empty {'/'.join(sorted(_FILE_BUILDERS))} files")
        exts = {_FILE_BUILDERS[f.suffix.lower()] for f in files}
        if len(exts) > 1:
            raise ConfigError(f"data directory {name!r} mixes formats {sorted(exts)}; keep one format per directory")
        return exts.pop(), {"data_files": {"train": [str(f) for f in files]}}
    if p.is_file():
        if p.stat().st_size == 0:
            raise ConfigError(f"data file {name!r} is empty")
        builder = _FILE_BUILDERS.get(p.suffix.lower())
        if builder is None:
            raise ConfigError(f"data file {name!r}: unknown extension; allowed: {', '.join(sorted(_FILE_BUILDERS))}")
        return builder, {"data_files": {"train": str(p)}}
    if p.suffix.lower() in _FILE_BUILDERS or name.startswith((".", "/", "~")):
        raise ConfigError(f"data file {name!r} not found")
    return name, {"name": cfg.dataset_config or None}  # a hub dataset id


def load_text(cfg: DataConfig):
    import datasets

    builder, kwargs = resolve_source(cfg)
    split = "train" if "data_files" in kwargs else cfg.split
    try:
        ds = datasets.load_dataset(builder, split=split, **kwargs)
    except Exception as e:  # noqa: BLE001 - any loader failure is a user-facing config problem
        raise ConfigError(f"dataset {cfg.dataset!r} cannot be loaded ({type(e).__name__}: "
                          f"{(str(e).splitlines() or [''])[0][:200]})") from None
    if cfg.text_field not in ds.column_names:
        raise ConfigError(f"dataset {cfg.dataset!r} has no column {cfg.text_field!r}; columns: {ds.column_names}")
    if len(ds) == 0:
        raise ConfigError(f"dataset {cfg.dataset!r} is empty")
    return ds


def tokenize_and_pack(ds, tokenizer, cfg: DataConfig, pack_batch: int = 10_000):
    """Tokenize (EOS after each document) and pack into blocks of ``seq_len`` tokens.

    Both steps are `datasets.map` calls, so they are cached on disk keyed by their inputs.
    Packing concatenates ``pack_batch`` documents at a time and drops only the tail shorter
    than one block per batch, so useful tokens stay >= 99.9% (measured by `make bench`).
    """
    eos, field, block = tokenizer.eos_token_id, cfg.text_field, cfg.seq_len

    def tokenize(batch):
        texts = [t for t in batch[field] if t and t.strip()]
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        return {"input_ids": [x + [eos] for x in ids]}

    def pack(batch):
        flat = list(chain.from_iterable(batch["input_ids"]))
        n = len(flat) // block * block
        return {"input_ids": [flat[i:i + block] for i in range(0, n, block)]}

    tokenized = ds.map(tokenize, batched=True, remove_columns=ds.column_names, desc="tokenize")
    packed = tokenized.map(pack, batched=True, batch_size=pack_batch, desc=f"pack into {block}-token blocks")
    return tokenized, packed


@dataclass
class Splits:
    train: "BlockDataset"
    eval: "BlockDataset"
    raw_tokens: int  # tokens before packing (what the pipeline had to offer)


class BlockDataset(Dataset):
    """Packed blocks as one int64 tensor; items carry their index so tests can audit data order."""

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict:
        x = self.blocks[i]
        return {"input_ids": x, "labels": x, "index": torch.tensor(i)}


def build_splits(cfg: DataConfig, tokenizer, seed: int) -> Splits:
    tokenized, packed = tokenize_and_pack(load_text(cfg), tokenizer, cfg)
    if len(packed) < 4:
        raise ConfigError(f"dataset {cfg.dataset!r} gives only {len(packed)} blocks of {cfg.seq_len} tokens; "
                          "use more text or a smaller data.seq_len")
    parts = packed.train_test_split(test_size=cfg.eval_fraction, seed=seed, shuffle=True)
    as_tensor = lambda d: torch.tensor(d["input_ids"], dtype=torch.long)  # noqa: E731
    raw = sum(len(x) for x in tokenized["input_ids"])
    return Splits(BlockDataset(as_tensor(parts["train"])), BlockDataset(as_tensor(parts["test"])), raw)


class GlobalCursorSampler(Sampler[int]):
    """Yields ``permutation(seed, epoch)[start:]``, truncated to whole global batches.

    The permutation depends only on (seed, epoch), so the position (epoch, start) is the
    whole sampler state: resuming on any world size continues the same sample sequence.
    """

    def __init__(self, num_samples: int, global_batch: int, seed: int):
        if num_samples < global_batch:
            raise ConfigError(f"the training split has {num_samples} blocks, fewer than one global batch "
                              f"({global_batch}); use more data or a smaller batch")
        self.num_samples, self.global_batch, self.seed = num_samples, global_batch, seed
        self.epoch, self.start = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    def set_position(self, epoch: int, start: int) -> None:
        if start % self.global_batch or start > self.steps_per_epoch * self.global_batch:
            raise ValueError(f"sampler start {start} is not a global-batch boundary")
        self.epoch, self.start = epoch, start

    def permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.num_samples, generator=g)[: self.steps_per_epoch * self.global_batch]

    def __iter__(self):
        return iter(self.permutation(self.epoch)[self.start:].tolist())

    def __len__(self) -> int:
        return self.steps_per_epoch * self.global_batch - self.start


def collate(items: list[dict]) -> dict:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def train_loader(ds: BlockDataset, sampler: GlobalCursorSampler, micro_batch: int, cfg: DataConfig) -> DataLoader:
    return DataLoader(ds, batch_size=micro_batch, sampler=sampler, drop_last=True, collate_fn=collate,
                      num_workers=cfg.num_workers, pin_memory=torch.cuda.is_available(),
                      persistent_workers=cfg.num_workers > 0)


def eval_loader(ds: BlockDataset, micro_batch: int) -> DataLoader:
    return DataLoader(ds, batch_size=micro_batch, shuffle=False, drop_last=True, collate_fn=collate)
