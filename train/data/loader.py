"""Blocks of ``seq_len`` tokens read from prepared shards, held-out splits by document,
weighted mixtures, and the one global sample order.

Data order is defined globally, not per rank: epoch e visits ``permutation(seed, e)`` and an
optimizer step consumes the next ``global_batch`` entries of it. accelerate's batch-sampler
sharding then hands micro-batch k to rank ``k % world_size``, so a step covers the same
samples whatever the world size / accumulation split, and a resume only needs
(epoch, samples consumed in the epoch) - no `skip_first_batches`, no sampler RNG state.
A mixture changes only what the permutation is (``MixtureBlocks.epoch_order``), not this contract.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from train.config import ConfigError, DataConfig
from train.config.schema import HELDOUT, eval_set_specs
from train.data import chat as chat_mod
from train.data import packing
from train.data.prepare import open_source
from train.data.shards import Corpus, tokenizer_fingerprint


class TokenBlocks(Dataset):
    """Tokens [start, stop) of a corpus as consecutive blocks of ``seq_len`` (the tail shorter than
    a block is dropped). Items carry their index so tests and the metrics ledger can audit order."""

    def __init__(self, corpus: Corpus, start: int, stop: int, seq_len: int, mode: str = "plain",
                 train_on_prompt: bool = False):
        self.corpus, self.start, self.seq_len = corpus, start, seq_len
        self.mode, self.train_on_prompt = mode, train_on_prompt  # data.packing (train/data/packing.py)
        self.n = max(0, (stop - start) // seq_len)

    def __len__(self) -> int:
        return self.n

    def block(self, i: int) -> torch.Tensor:
        a = self.start + i * self.seq_len
        return torch.from_numpy(self.corpus.tokens(a, a + self.seq_len).astype(np.int64))

    def item(self, i: int) -> dict:
        """Block i's model inputs: input_ids, labels (and position_ids when masked)."""
        return packing.block_item(self.corpus, self.start + i * self.seq_len, self.seq_len, self.mode,
                                  self.train_on_prompt)

    def __getitem__(self, i: int) -> dict:
        return {**self.item(int(i)), "index": torch.tensor(int(i))}


class ConcatBlocks(Dataset):
    """Several sources' held-out blocks, one after another (a mixture's eval set)."""

    def __init__(self, parts: list[TokenBlocks]):
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(p) for p in parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> dict:
        s = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return {**self.parts[s].item(int(i - self.offsets[s])), "index": torch.tensor(int(i))}


def apportion(total: int, weights: list[float]) -> list[int]:
    """Integer shares of ``total`` proportional to ``weights`` (largest remainder, ties to the first)."""
    exact = [total * w / sum(weights) for w in weights]
    shares = [math.floor(x) for x in exact]
    for s in sorted(range(len(weights)), key=lambda s: (-(exact[s] - shares[s]), s))[: total - sum(shares)]:
        shares[s] += 1
    return shares


class MixtureBlocks(Dataset):
    """Training blocks drawn from several sources by weight.

    A mixture epoch has as many samples as the sources' training blocks together, N; source s
    gets ``q_s`` of them (its weight's share). Its slots are spread evenly over the epoch (slot k
    of source s sits at (k + 1/2) / q_s of the way through), so any window of consecutive samples -
    any run of steps - holds each source within one sample of its weight. Which of the source's
    blocks fill its slots is a permutation of (seed, epoch, s). Epoch e reads the source's blocks
    ``e*q_s .. (e+1)*q_s - 1`` modulo its length: a source smaller than its share wraps around to
    its start within the epoch (it is repeated: ``q_s / n_s`` passes per mixture epoch), a larger
    one continues where the last epoch stopped. A sample's id is ``epoch * N + slot``: it names
    the block without any state, so the sampler contract (and the metrics ledger) are unchanged.
    """

    def __init__(self, parts: list[TokenBlocks], weights: list[float], seed: int):
        self.parts, self.weights, self.seed = parts, weights, seed
        self.sizes = [len(p) for p in parts]
        self.N = sum(self.sizes)
        self.quota = apportion(self.N, weights)
        self.offsets = np.cumsum([0] + self.quota)
        keys = np.concatenate([(np.arange(q) + 0.5) / q for q in self.quota if q])
        owner = np.concatenate([np.full(q, s) for s, q in enumerate(self.quota) if q])
        self._slots_by_time = np.lexsort((owner, keys))  # stable: ties go to the first source
        self._cached = (None, None)

    def __len__(self) -> int:
        return self.N

    def source_of(self, sample_id: int) -> int:
        return int(np.searchsorted(self.offsets, sample_id % self.N, side="right")) - 1

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """Sample ids of mixture epoch ``epoch`` in training order (8 bytes per block: kept for the
        epoch's chunks; at SEQ_LEN=4096 a 5B-token mixture's order is 10 MB)."""
        if self._cached[0] != epoch:
            self._cached = (epoch, self._epoch_order(epoch))
        return self._cached[1]

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        slots = np.empty(self.N, dtype=np.int64)
        for s, q in enumerate(self.quota):
            g = torch.Generator().manual_seed((self.seed * 100_003 + epoch) * 1_009 + s)
            slots[self.offsets[s]:self.offsets[s + 1]] = self.offsets[s] + torch.randperm(q, generator=g).numpy()
        return torch.from_numpy(epoch * self.N + slots[self._slots_by_time])

    def __getitem__(self, sample_id: int) -> dict:
        epoch, slot = divmod(int(sample_id), self.N)
        s = self.source_of(slot)
        k = slot - int(self.offsets[s])
        return {**self.parts[s].item((epoch * self.quota[s] + k) % self.sizes[s]), "index": torch.tensor(int(sample_id))}


@dataclass
class Splits:
    train: Dataset
    eval: Dataset
    raw_tokens: int  # tokens the sources offer (what the pipeline had to pack)
    described: str  # one line for the log: sizes and where eval comes from
    # every eval set by name, the held-out split (``eval``) first as "heldout", then data.eval_sets
    eval_sets: dict[str, Dataset] = field(default_factory=dict)
    packing: str = "plain"  # data.packing resolved (train/data/packing.py)
    packing_line: str = ""  # one line for the log: what a sequence is, where the loss is taken
    chat_template: str | None = None  # chat data: the template (the export's tokenizer carries it)


def parse_mixture(spec: str) -> list[tuple[str, float]]:
    """``SOURCE=WEIGHT,SOURCE=WEIGHT`` (the YAML list form is joined into this by the config)."""
    out = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        name, sep, w = part.rpartition("=")
        if not sep or not name:
            raise ConfigError(f"data.mixture entry {part!r} is not SOURCE=WEIGHT (e.g. data/web=0.7,data/code=0.3)")
        try:
            weight = float(w)
        except ValueError:
            raise ConfigError(f"data.mixture weight {w!r} of {name!r} is not a number") from None
        if not weight > 0 or not math.isfinite(weight):
            raise ConfigError(f"data.mixture weight {w} of {name!r} must be a positive number")
        out.append((name, weight))
    if not out:
        raise ConfigError("data.mixture is empty; use SOURCE=WEIGHT,SOURCE=WEIGHT or leave it unset for DATASET")
    return out


def _blocks(corpus: Corpus, start: int, stop: int, cfg: DataConfig, mode: str):
    if mode == "padded":
        return packing.PaddedDocs(corpus, start, stop, cfg.seq_len, cfg.train_on_prompt)
    return TokenBlocks(corpus, start, stop, cfg.seq_len, mode, cfg.train_on_prompt)


def _held_out(corpus: Corpus, cfg: DataConfig, mode: str = "plain") -> tuple[TokenBlocks, TokenBlocks]:
    """Train on the corpus up to a document boundary, hold out the documents after it (the last
    ``eval_fraction`` of its tokens, rounded to whole documents): no document is in both."""
    t = corpus.num_tokens
    if cfg.eval_dataset:
        return _blocks(corpus, 0, t, cfg, mode), None
    cut = corpus.document_end_at_or_after(math.ceil(t * (1 - cfg.eval_fraction)))
    return _blocks(corpus, 0, cut, cfg, mode), _blocks(corpus, cut, t, cfg, mode)


def open_corpora(cfg: DataConfig, tokenizer, workers: int = 0, log=print) -> tuple[list, list[float], Corpus | None]:
    """(training corpora, their weights, the eval corpus if data.eval_dataset is set): prepared on
    first use, checked against the run's tokenizer and each other."""
    spec = parse_mixture(cfg.mixture) if cfg.mixture else [(cfg.dataset, 1.0)]
    what = "data.mixture source" if cfg.mixture else "DATASET"
    corpora = [open_source(name, cfg, tokenizer, what, workers, log) for name, _ in spec]
    for c, (name, _) in zip(corpora[1:], spec[1:]):
        if c.dtype != corpora[0].dtype or c.tokenizer != corpora[0].tokenizer:
            raise ConfigError(f"data.mixture sources {spec[0][0]!r} and {name!r} disagree on dtype or tokenizer "
                              f"({corpora[0].dtype} vs {c.dtype}); prepare both with the run's tokenizer")
    ev = open_source(cfg.eval_dataset, cfg, tokenizer, "data.eval_dataset", workers, log) if cfg.eval_dataset else None
    return corpora, [w for _, w in spec], ev


def build_splits(cfg: DataConfig, tokenizer, seed: int, workers: int = 0, log=print) -> Splits:
    corpora, weights, ev = open_corpora(cfg, tokenizer, workers, log)
    chat = any(c.has_mask for c in corpora)
    mode = packing.resolve(cfg, chat)
    parts = [_held_out(c, cfg, mode) for c in corpora]
    train = MixtureBlocks([p[0] for p in parts], weights, seed) if cfg.mixture else parts[0][0]
    if ev is not None:
        evals = _blocks(ev, 0, ev.num_tokens, cfg, mode)
        where = f"data.eval_dataset {cfg.eval_dataset!r}"
    else:
        evals = ConcatBlocks([p[1] for p in parts]) if cfg.mixture else parts[0][1]
        where = f"the last {cfg.eval_fraction:g} of the documents"
    named = {HELDOUT: evals}
    for name, source in eval_set_specs(cfg):  # prepared through the same cache as DATASET
        try:
            c = open_source(source, cfg, tokenizer, f"data.eval_sets {name}", workers, log)
        except ConfigError as e:  # say which eval set: the source's own message names only the path
            raise ConfigError(f"eval set {name!r} (data.eval_sets): {e}") from None
        named[name] = _blocks(c, 0, c.num_tokens, cfg, mode)
    described = (f"{len(train):,} training blocks of {cfg.seq_len} tokens from {sum(c.num_tokens for c in corpora):,} "
                 f"tokens; {len(evals):,} eval blocks from {where}"
                 + "".join(f"; eval set {n!r}: {len(d):,} blocks" for n, d in list(named.items())[1:]))
    template = chat_mod.resolve_template(cfg, tokenizer) if chat else None
    for c in corpora if chat else []:  # the export's tokenizer must carry the template the data was rendered with
        if c.has_mask and c.manifest.get("chat_template") != template.sha256:
            raise ConfigError(f"DATASET {str(c.path)!r} was prepared with another chat template than this run's "
                              f"{template.name}; set CHAT_TEMPLATE to the one it was prepared with, or prepare it again")
    return Splits(train, evals, sum(c.num_tokens for c in corpora), described, named, mode,
                  packing.describe(mode, chat, cfg), template.text if template else None)


def check_splits(splits: Splits, cfg: DataConfig, global_batch: int) -> None:
    """SEQ_LEN and batch against what the corpus allows (the launcher's check, from manifests)."""
    parts = splits.train.parts if isinstance(splits.train, MixtureBlocks) else [splits.train]
    for p in parts:
        if len(p) < global_batch or len(splits.eval) < 1:
            name = str(p.corpus.path) if cfg.mixture else cfg.dataset
            raise ConfigError(
                f"dataset {name!r} gives {len(p)} training blocks of SEQ_LEN={cfg.seq_len} tokens ({p.corpus.num_tokens} "
                f"tokens, {p.corpus.num_documents} documents) and {len(splits.eval)} held-out blocks; one global "
                f"batch of {global_batch} and one held-out block (data.eval_fraction={cfg.eval_fraction} of the "
                f"documents, or data.eval_dataset) are needed; use more text, a smaller SEQ_LEN, or a smaller "
                "MICRO_BATCH/GLOBAL_BATCH")

    for name, ds in list(splits.eval_sets.items())[1:]:
        if len(ds) < 1:
            raise ConfigError(f"eval set {name!r} gives no block of SEQ_LEN={cfg.seq_len} tokens ({ds.corpus.num_tokens} "
                              "tokens); give it more text or use a smaller SEQ_LEN")


_M1, _M2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9)


class KeyedPermutation:
    """A permutation of [0, n) computed per index, O(1) memory: a 4-round Feistel network over the
    next even power of two, walked until the value falls below n (a bijection of [0, n), as the
    walk stays on the network's cycles). An epoch of a billion blocks so costs a rank nothing to
    hold; ``torch.randperm`` would hold 8 bytes per block and its ``tolist`` ~40 more."""

    def __init__(self, n: int, seed: int):
        bits = max(2, (max(n, 2) - 1).bit_length())
        self.n, self.half = n, np.uint64((bits + 1) // 2)
        self.mask = np.uint64((1 << int(self.half)) - 1)
        self.keys = [np.uint64(k) for k in np.random.default_rng(seed).integers(0, 2**63, 4, dtype=np.int64)]

    def _round_trip(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self.half, x & self.mask
        for k in self.keys:
            f = (right ^ k) * _M1
            f = ((f ^ (f >> np.uint64(29))) * _M2) >> np.uint64(32)
            left, right = right, left ^ (f & self.mask)
        return (left << self.half) | right

    def __call__(self, idx: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):  # the multiplications wrap modulo 2^64 on purpose
            y = self._round_trip(idx.astype(np.uint64))
            over = y >= self.n
            while over.any():
                y[over] = self._round_trip(y[over])
                over = y >= self.n
        return y.astype(np.int64)


class GlobalCursorSampler(Sampler[int]):
    """Yields ``permutation(seed, epoch)[start:]``, truncated to whole global batches.

    The permutation depends only on (seed, epoch), so the position (epoch, start) is the
    whole sampler state: resuming on any world size continues the same sample sequence.
    It is computed a chunk at a time (``KeyedPermutation``): memory does not grow with the corpus.
    A dataset with an ``epoch_order`` (a mixture) supplies that permutation itself.
    """

    CHUNK = 1 << 16

    def __init__(self, num_samples: int, global_batch: int, seed: int, dataset=None):
        if num_samples < global_batch:
            raise ConfigError(f"the training split has {num_samples} blocks, fewer than one global batch "
                              f"({global_batch}); use more data or a smaller batch")
        self.num_samples, self.global_batch, self.seed = num_samples, global_batch, seed
        self.order = getattr(dataset, "epoch_order", None)
        self.epoch, self.start = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    def set_position(self, epoch: int, start: int) -> None:
        if start % self.global_batch or start > self.steps_per_epoch * self.global_batch:
            raise ValueError(f"sampler start {start} is not a global-batch boundary")
        self.epoch, self.start = epoch, start

    def _ids(self, epoch: int, a: int, b: int) -> np.ndarray:
        """Entries [a, b) of epoch ``epoch``'s order."""
        if self.order is not None:
            return self.order(epoch)[a:b].numpy()
        return KeyedPermutation(self.num_samples, self.seed * 100_003 + epoch)(np.arange(a, b, dtype=np.uint64))

    def permutation(self, epoch: int) -> torch.Tensor:
        return torch.from_numpy(self._ids(epoch, 0, self.steps_per_epoch * self.global_batch))

    def __iter__(self):
        end = self.steps_per_epoch * self.global_batch
        for a in range(self.start, end, self.CHUNK):
            yield from self._ids(self.epoch, a, min(a + self.CHUNK, end)).tolist()

    def __len__(self) -> int:
        return self.steps_per_epoch * self.global_batch - self.start

    def steps_left(self) -> int:
        """Optimizer steps left in this epoch from the position set last."""
        return len(self) // self.global_batch


def collate(items: list[dict]) -> dict:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def train_loader(ds: Dataset, sampler: GlobalCursorSampler, micro_batch: int, cfg: DataConfig) -> DataLoader:
    # Its own generator: each iter() draws a worker base seed, and from the global torch RNG that
    # draw would shift dropout (e.g. LoRA's) after a resume, which calls iter() mid-epoch.
    return DataLoader(ds, batch_size=micro_batch, sampler=sampler, drop_last=True, collate_fn=collate,
                      num_workers=cfg.num_workers, pin_memory=torch.cuda.is_available(),
                      persistent_workers=cfg.num_workers > 0, generator=torch.Generator())


__all__ = ["TokenBlocks", "MixtureBlocks", "ConcatBlocks", "Splits", "GlobalCursorSampler", "build_splits",
           "check_splits", "collate", "train_loader", "parse_mixture", "apportion",
           "tokenizer_fingerprint"]
