"""How documents become sequences (data.packing), and the labels the model sees.

- ``plain``: documents back to back in blocks of SEQ_LEN, attending across their boundaries
  (pretraining as it always was here: labels are the input ids);
- ``masked``: the same blocks, but each document attends only to itself: ``position_ids`` restart
  at every document start, and transformers turns restarting positions into a block-diagonal
  causal mask (masking_utils.find_packed_sequence_indices for sdpa/eager/flex; the varlen kernel
  for flash attention). The first token of each document inside a block gets label -100 too:
  predicting it from the previous document is what a document run alone never does. A block so
  computes exactly the sum of its documents' (segments') losses run one by one (tests/test_packing.py);
- ``padded``: one document per sequence, right-padded with EOS under ``attention_mask`` 0 and label
  -100; a document longer than SEQ_LEN is cut to its first SEQ_LEN tokens.

Chat data's loss mask (shards.MASK) sets label -100 on every token outside the assistant's turns,
unless data.train_on_prompt. The loss normalisation counts labels != -100 (worker/loop.py), so
masked prompt tokens change neither the loss nor its denominator.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from train.config import ConfigError, DataConfig, ModelConfig

IGNORE_INDEX = -100
MODES = ("masked", "plain", "padded")
# attn_implementation values whose masks transformers builds from restarting position_ids
DOCUMENT_MASKING = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")
MODEL_INPUTS = ("input_ids", "labels", "position_ids", "attention_mask")


def resolve(cfg: DataConfig, chat: bool) -> str:
    """data.packing with auto decided: masked for chat data, plain for text."""
    if cfg.packing != "auto":
        return cfg.packing
    return "masked" if chat else "plain"


def planned(cfg: DataConfig) -> str:
    """data.packing as the run will resolve it, from the sources' names and first rows (before any
    prepare): what the launcher checks the model's attention against."""
    from pathlib import Path

    from train.data.chat import is_chat_source
    from train.data.loader import parse_mixture
    from train.data.shards import MASK, Corpus, is_prepared

    if cfg.packing != "auto":
        return cfg.packing
    names = [n for n, _ in parse_mixture(cfg.mixture)] if cfg.mixture else [cfg.dataset]
    chat = any(MASK in Corpus(n).arrays if is_prepared(Path(n)) else is_chat_source(n, cfg) for n in names)
    return resolve(cfg, chat)


def describe(mode: str, chat: bool, cfg: DataConfig) -> str:
    """The one line a run prints at start about what a sequence is."""
    what = {"masked": f"packed with document masking (documents back to back in blocks of {cfg.seq_len} tokens, "
                      "each attending only to itself; positions restart per document)",
            "plain": f"packed without document masking (blocks of {cfg.seq_len} tokens attend across documents)",
            "padded": f"padded (one document per sequence of {cfg.seq_len} tokens; longer ones cut)"}[mode]
    loss = ("chat data, loss on every token (data.train_on_prompt)" if cfg.train_on_prompt else
            "chat data, loss on the assistant's tokens only") if chat else "text, loss on every token"
    return f"{what}; {loss}"


def check_attention(mode: str, model: ModelConfig) -> None:
    """Refuse document masking where the model's attention cannot be told where documents end."""
    if mode != "masked":
        return
    if model.attn_implementation not in DOCUMENT_MASKING:
        raise ConfigError(f"PACKING=masked needs an attention that masks per document ({', '.join(DOCUMENT_MASKING)}); "
                          f"model.attn_implementation={model.attn_implementation!r} cannot: use one of those, or "
                          "PACKING=padded")
    if model.trust_remote_code:
        raise ConfigError("PACKING=masked with model.trust_remote_code: the repository's own attention code may ignore "
                          "restarting position_ids and attend across documents; use PACKING=padded")


def block_item(corpus, a: int, seq_len: int, mode: str, train_on_prompt: bool) -> dict:
    """The sequence of global tokens [a, a + seq_len) in ``plain`` or ``masked`` mode."""
    x = torch.from_numpy(corpus.tokens(a, a + seq_len).astype(np.int64))
    if mode == "plain" and (train_on_prompt or not corpus.has_mask):
        return {"input_ids": x, "labels": x}  # today's pretraining batches, unchanged
    labels = x.clone()
    if corpus.has_mask and not train_on_prompt:
        labels[torch.from_numpy(corpus.mask(a, a + seq_len) == 0)] = IGNORE_INDEX
    if mode == "plain":
        return {"input_ids": x, "labels": labels}
    starts = corpus.document_starts_in(a, a + seq_len) - a
    labels[torch.from_numpy(starts)] = IGNORE_INDEX
    pos = np.arange(seq_len, dtype=np.int64)
    seg_start = np.zeros(seq_len, dtype=np.int64)
    seg_start[starts] = starts
    pos -= np.maximum.accumulate(seg_start)
    return {"input_ids": x, "labels": labels, "position_ids": torch.from_numpy(pos)}


class PaddedDocs(Dataset):
    """The documents wholly inside tokens [start, stop) of a corpus, one per sequence (``padded``)."""

    def __init__(self, corpus, start: int, stop: int, seq_len: int, train_on_prompt: bool):
        self.corpus, self.seq_len, self.train_on_prompt = corpus, seq_len, train_on_prompt
        ends = np.cumsum(corpus.document_lengths())  # O(documents): fine-tuning sets are small
        begins = np.concatenate([[0], ends[:-1]]).astype(np.int64)
        keep = (begins >= start) & (ends <= stop)
        self.begins, self.ends = begins[keep], ends[keep]
        self.pad = int(corpus.tokenizer["eos"])

    def __len__(self) -> int:
        return len(self.begins)

    def item(self, i: int) -> dict:
        a = int(self.begins[i])
        n = min(int(self.ends[i]) - a, self.seq_len)
        ids = torch.full((self.seq_len,), self.pad, dtype=torch.int64)
        ids[:n] = torch.from_numpy(self.corpus.tokens(a, a + n).astype(np.int64))
        labels = torch.full((self.seq_len,), IGNORE_INDEX, dtype=torch.int64)
        labels[:n] = ids[:n]
        if self.corpus.has_mask and not self.train_on_prompt:
            labels[:n][torch.from_numpy(self.corpus.mask(a, a + n) == 0)] = IGNORE_INDEX
        attn = torch.zeros(self.seq_len, dtype=torch.int64)
        attn[:n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": attn}

    def __getitem__(self, i: int) -> dict:
        return {**self.item(int(i)), "index": torch.tensor(int(i))}


def model_inputs(batch: dict) -> dict:
    """What of a batch the model takes (not the sample index)."""
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}
