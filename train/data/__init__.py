"""Data: raw sources prepared once into memory-mapped token shards, held-out splits by document,
weighted mixtures, and one global sample order (see ``loader``'s docstring for that contract).

- ``sources``: what DATASET accepts (files, directories, hub ids, the built-in corpus), streamed;
- ``prepare``: ``python -m train prepare`` and the cache a raw DATASET is prepared into;
- ``shards``: the on-disk format and the memory-mapped reader;
- ``loader``: blocks, splits, mixtures, the sampler and the DataLoaders.

Names resolve lazily, so a prepare worker process (numpy and tokenizers only) never imports torch.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "resolve_source": "sources", "iter_texts": "sources",
    "open_source": "prepare", "cache_entry": "prepare",
    "Corpus": "shards", "tokenizer_fingerprint": "shards",
    "TokenBlocks": "loader", "MixtureBlocks": "loader", "ConcatBlocks": "loader", "Splits": "loader",
    "GlobalCursorSampler": "loader", "build_splits": "loader", "check_splits": "loader", "collate": "loader",
    "train_loader": "loader", "parse_mixture": "loader", "open_corpora": "loader",
}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(_WHERE)
