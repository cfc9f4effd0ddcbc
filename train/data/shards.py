"""The on-disk format of a prepared corpus, and reading it without holding it in memory.

A prepared directory holds, for shard k (``shard-00000`` ...):

- ``shard-K.tokens``: the documents' token ids back to back, EOS after each document, as a flat
  little-endian array of ``uint16`` (vocabulary <= 65,536) or ``uint32``;
- ``shard-K.docs``: the end offset of each document within the shard (``int64``), so document
  boundaries survive packing: held-out splits by document, and later attention masks that stop at
  a document's end;
- ``shard-K.json``: the shard's counts and the input rows consumed up to its end, written after
  the two arrays are in place (a shard without it is unfinished);

and ``manifest.json``, written last: the format, dtype, tokenizer fingerprint, source
fingerprints, token and document counts and each shard's sizes. Each array is one entry of the
manifest's ``arrays`` (file suffix, dtype, items per token or per document), so another array
beside the tokens (a loss mask, one ``uint8`` per token) is one more entry, not a new format.

Nothing is held in RAM: a rank reads the blocks it is handed (``pread``) and maps only the document
index (``numpy.memmap``), where a split point is found by binary search.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from train.config import ConfigError

FORMAT = "train-tokens/1"
MANIFEST = "manifest.json"
TOKENS, DOCS, MASK = "tokens", "docs", "mask"


def token_dtype(vocab_size: int) -> str:
    """The narrowest unsigned dtype that holds every id: half the disk and page cache of uint32."""
    return "<u2" if vocab_size <= 1 << 16 else "<u4"


def arrays_spec(dtype: str, mask: bool = False) -> dict:
    """The arrays of each shard; chat data adds its loss mask (1 = a token to learn, train/data/chat.py)."""
    spec = {TOKENS: {"suffix": ".tokens", "dtype": dtype, "per": "token"},
            DOCS: {"suffix": ".docs", "dtype": "<i8", "per": "document"}}
    if mask:
        spec[MASK] = {"suffix": ".mask", "dtype": "|u1", "per": "token"}
    return spec


def shard_name(k: int) -> str:
    return f"shard-{k:05d}"


def tokenizer_fingerprint(tokenizer) -> dict:
    """What decides the ids: the tokenizer's full definition (vocabulary, merges, normalizer,
    added tokens) and the EOS id appended to each document."""
    blob = tokenizer.backend_tokenizer.to_str()
    return {"sha256": hashlib.sha256(blob.encode()).hexdigest()[:16], "vocab_size": len(tokenizer),
            "eos": int(tokenizer.eos_token_id)}


def write_json(path: Path, obj) -> None:
    """Atomically: a reader sees the whole file or none (temporary name, fsync, rename)."""
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def is_prepared(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def looks_unfinished(path: Path) -> bool:
    """A directory a prepare was writing into and did not finish."""
    return path.is_dir() and not is_prepared(path) and any(path.glob("shard-*.json"))


class Corpus:
    """A prepared directory, checked against its manifest, read block by block.

    Opening reads only the manifest and stats each shard (O(shards), never O(tokens)): the
    launch-time check and every rank use it. Files open on first read in each process, so a
    Corpus pickles to DataLoader workers as a path.
    """

    def __init__(self, path: str | Path, what: str = "DATASET"):
        self.path = Path(path)
        self.what = what
        m = self.path / MANIFEST
        try:
            self.manifest = json.loads(m.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"{what}={str(self.path)!r}: {MANIFEST} cannot be read ({e}); prepare the directory "
                              "again with `python -m train prepare`") from None
        if self.manifest.get("format") != FORMAT:
            raise ConfigError(f"{what}={str(self.path)!r} has format {self.manifest.get('format')!r}; this version "
                              f"reads {FORMAT!r}: prepare it again with `python -m train prepare`")
        self.arrays = self.manifest["arrays"]
        self.shards = self.manifest["shards"]
        self.starts = [0]  # first global token of each shard, then the total
        for s in self.shards:
            self.starts.append(self.starts[-1] + s["tokens"])
        self._maps: dict = {}
        self._fds: dict = {}
        self._check_sizes()

    # -- counts and checks -----------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return self.starts[-1]

    @property
    def num_documents(self) -> int:
        return int(self.manifest["documents"])

    @property
    def dtype(self) -> str:
        return self.arrays[TOKENS]["dtype"]

    @property
    def tokenizer(self) -> dict:
        return self.manifest["tokenizer"]

    def _check_sizes(self) -> None:
        """Each array file is exactly as long as the manifest says: a truncated copy, a shard from
        another prepare or a missing file is named here, not found as garbage in a batch."""
        for s in self.shards:
            for key, spec in self.arrays.items():
                f = self.path / (s["name"] + spec["suffix"])
                count = s["tokens"] if spec["per"] == "token" else s["documents"]
                want = count * np.dtype(spec["dtype"]).itemsize
                try:
                    have = f.stat().st_size
                except OSError:
                    raise ConfigError(f"{self.what}={str(self.path)!r}: shard file {f.name} is missing; the manifest "
                                      f"lists it: copy the whole directory, or prepare it again") from None
                if have != want:
                    raise ConfigError(f"{self.what}={str(self.path)!r}: shard file {f.name} is {have} bytes, the "
                                      f"manifest says {want} ({'truncated' if have < want else 'too long'}); copy "
                                      "the whole directory again, or prepare it again")

    def check_tokenizer(self, expected: dict, run: str) -> None:
        have = self.tokenizer
        if have["sha256"] != expected["sha256"] or have["eos"] != expected["eos"]:
            raise ConfigError(
                f"{self.what}={str(self.path)!r} was prepared with another tokenizer (fingerprint {have['sha256']}, "
                f"vocab {have['vocab_size']}) than this run's {run} (fingerprint {expected['sha256']}, vocab "
                f"{expected['vocab_size']}); prepare it again with this run's MODEL/TOKENIZER")

    # -- reading ------------------------------------------------------------------------------
    def _map(self, k: int, key: str) -> np.ndarray:
        m = self._maps.get((k, key))
        if m is None:
            spec, s = self.arrays[key], self.shards[k]
            count = s["tokens"] if spec["per"] == "token" else s["documents"]
            f = self.path / (s["name"] + spec["suffix"])
            # An empty file cannot be mapped; a zero-length array reads the same.
            m = np.memmap(f, dtype=spec["dtype"], mode="r", shape=(count,)) if count else np.zeros(0, spec["dtype"])
            self._maps[(k, key)] = m
        return m

    def __getstate__(self):  # DataLoader workers open the files themselves
        return {**self.__dict__, "_maps": {}, "_fds": {}}

    @property
    def has_mask(self) -> bool:
        return MASK in self.arrays

    def _fd(self, k: int, key: str = TOKENS) -> int:
        fd = self._fds.get((k, key))
        if fd is None:
            fd = self._fds[(k, key)] = os.open(self.path / (self.shards[k]["name"] + self.arrays[key]["suffix"]),
                                               os.O_RDONLY)
        return fd

    def tokens(self, start: int, stop: int, key: str = TOKENS) -> np.ndarray:
        """Global tokens [start, stop), across shard boundaries.

        Read with pread, not through a map: the page cache may hold a file in folios of up to
        2 MB, and a mapped read brings the whole folio into this process's RSS (measured: ~2 MB
        per random block from a 2 GB corpus). Read, only the block is copied into the process."""
        out = []
        dtype = np.dtype(self.arrays[key]["dtype"])
        k = bisect.bisect_right(self.starts, start) - 1
        while start < stop:
            lo = start - self.starts[k]
            hi = min(stop, self.starts[k + 1]) - self.starts[k]
            buf = os.pread(self._fd(k, key), (hi - lo) * dtype.itemsize, lo * dtype.itemsize)
            if len(buf) != (hi - lo) * dtype.itemsize:  # the file shrank after the launch-time check
                raise ConfigError(f"{self.what}={str(self.path)!r}: shard {self.shards[k]['name']} ends early; "
                                  "it was changed while training read it")
            out.append(np.frombuffer(buf, dtype))
            start = self.starts[k] + hi
            k += 1
        return out[0] if len(out) == 1 else np.concatenate(out)

    def document_end_at_or_after(self, t: int) -> int:
        """The first document boundary (global token offset) at or after token ``t``: a binary
        search in one shard's document index, a few pages read."""
        if t <= 0:
            return 0
        if t >= self.num_tokens:
            return self.num_tokens
        k = bisect.bisect_right(self.starts, t - 1) - 1  # the shard holding token t-1
        ends = self._map(k, DOCS)
        i = int(np.searchsorted(ends, t - self.starts[k], side="left"))
        return self.starts[k] + int(ends[i])

    def mask(self, start: int, stop: int) -> np.ndarray:
        """The loss mask of global tokens [start, stop) (chat data; all ones for text)."""
        if not self.has_mask:
            return np.ones(stop - start, np.uint8)
        return self.tokens(start, stop, MASK)

    def document_starts_in(self, start: int, stop: int) -> np.ndarray:
        """Global offsets of the documents that begin inside (start, stop): where a block's
        positions restart and its attention stops. Shard ends are document ends."""
        out = []
        k = bisect.bisect_right(self.starts, start) - 1
        while k < len(self.shards) and self.starts[k] < stop:
            base = self.starts[k]
            if start < base:
                out.append(np.array([base], np.int64))
            ends = self._map(k, DOCS)
            lo, hi = np.searchsorted(ends, [start - base + 1, stop - base], side="left")
            out.append(base + np.asarray(ends[lo:hi], np.int64))
            k += 1
        found = np.concatenate(out) if out else np.zeros(0, np.int64)
        return np.unique(found[(found > start) & (found < stop)])

    def document_lengths(self) -> np.ndarray:
        """Tokens of every document (EOS included), from the index: O(documents) memory."""
        return np.concatenate([np.diff(self._map(k, DOCS), prepend=0) for k in range(len(self.shards))])
