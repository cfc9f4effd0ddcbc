"""Chat / instruction data: JSONL conversations rendered with a chat template into tokens and a
loss mask (1 on the assistant's tokens), prepared into shards beside the tokens (shards.MASK).

A row is ``{"messages": [{"role": ..., "content": ...}, ...]}`` (roles: ``ROLES``) or
``{"prompt": ..., "completion": ...}`` (optionally ``"system"``), which is the conversation
user -> assistant. The template is the tokenizer's own, or ``data.chat_template``: a shipped one by
name (``TEMPLATES``) or a Jinja file.

Where the assistant's tokens are is found from the template itself, for any template: turn i's
span is what rendering the first i+1 messages adds to rendering the first i with the generation
prompt (so the assistant's end-of-turn marker is learned, its header is not). That needs a template
that renders a conversation prefix by prefix; one that rewrites earlier turns is refused. Tokens
are then marked by the character offsets the tokenizer reports (a token belongs to the span its
first character is in).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from train.config import ConfigError, DataConfig
from train.corpus import TOKENIZER_DIR
from train.data.shards import looks_unfinished

ROLES = ("system", "user", "assistant", "tool")
TEMPLATES = {"plain": TOKENIZER_DIR / "chat_template.jinja"}  # the built-in tokenizer's own template
_JSON_SUFFIXES = (".jsonl", ".json")


@dataclass(frozen=True)
class Template:
    text: str
    name: str  # where it came from, for messages

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()[:16]


def resolve_template(cfg: DataConfig, tokenizer) -> Template:
    """data.chat_template, else the tokenizer's own; refused when there is none."""
    name = cfg.chat_template.strip()
    if not name:
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, dict):  # several named templates: the default one
            own = own.get("default")
        if not own:
            raise ConfigError(f"tokenizer {tokenizer.name_or_path!r} has no chat template and data.chat_template is "
                              f"not set; set CHAT_TEMPLATE to one of {', '.join(TEMPLATES)} or a Jinja file")
        return Template(own, f"tokenizer {tokenizer.name_or_path!r}'s chat template")
    path = TEMPLATES.get(name) or Path(name).expanduser()
    if not path.is_file():
        raise ConfigError(f"CHAT_TEMPLATE={name!r} is neither a shipped template ({', '.join(TEMPLATES)}) nor a file")
    return Template(path.read_text(), f"CHAT_TEMPLATE={name!r}")


# -- which sources are chat data -------------------------------------------------------------
def _local_files(name: str) -> list[Path]:
    from train.data.sources import resolve_source

    _, kwargs = resolve_source(name)
    files = kwargs.get("data_files", {}).get("train") if "data_files" in kwargs else None
    if files is None:
        return []
    return [Path(f) for f in ([files] if isinstance(files, str) else files)]


def is_chat_source(name: str, cfg: DataConfig) -> bool:
    """data.format, or for auto: a local JSON/JSONL source whose first row is a conversation."""
    if cfg.format != "auto":
        return cfg.format == "chat"
    if looks_unfinished(Path(name)):  # its shard records are not rows; opening it says what it is
        return False
    files = _local_files(name)
    if not files or any(f.suffix.lower() not in _JSON_SUFFIXES for f in files):
        return False
    for where, row in _rows_of(files[0]):
        return isinstance(row, dict) and ("messages" in row or ("prompt" in row and "completion" in row))
    return False


def _rows_of(path: Path) -> Iterator[tuple[str, object]]:
    """(file:line, row) of a JSONL file, or of a JSON file holding one list of rows (file:#i)."""
    with open(path, encoding="utf-8") as f:
        head = f.read(1 << 12).lstrip()
        f.seek(0)
        if head.startswith("["):
            try:
                rows = json.load(f)
            except ValueError as e:
                raise ConfigError(f"chat data {str(path)!r} is not valid JSON ({e})") from None
            for i, row in enumerate(rows):
                yield f"{path}:#{i + 1}", row
            return
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{n}", json.loads(line)
            except ValueError as e:
                raise ConfigError(f"chat data {path}:{n} is not a JSON object ({e.args[0][:80]})") from None


def iter_conversations(name: str, cfg: DataConfig) -> Iterator[tuple[str, list[dict]]]:
    """(where, messages) of every row of a chat source, checked; ``where`` names file and line."""
    files = _local_files(name)
    if files:
        bad = [f for f in files if f.suffix.lower() not in _JSON_SUFFIXES]
        if bad:
            raise ConfigError(f"chat data must be JSON Lines (.jsonl/.json); {str(bad[0])!r} is not (data.format=chat)")
        rows = (r for f in files for r in _rows_of(f))
    else:  # a hub dataset: rows through `datasets`, numbered
        import datasets

        from train.data.sources import cannot_load, resolve_source

        builder, kwargs = resolve_source(name, cfg.dataset_config)
        try:
            stream = datasets.load_dataset(builder, split=cfg.split, streaming=True, cache_dir=cfg.cache_dir or None,
                                           **kwargs)
        except Exception as e:  # noqa: BLE001 - a user-facing config problem
            raise cannot_load(name, False, e) from None
        rows = ((f"{name} row {i + 1}", r) for i, r in enumerate(stream))
    for where, row in rows:
        yield where, conversation(row, where)


def conversation(row, where: str) -> list[dict]:
    """The row's messages, checked: a list of {role in ROLES, content: str}."""
    if isinstance(row, dict) and "messages" not in row and "prompt" in row and "completion" in row:
        msgs = ([{"role": "system", "content": row["system"]}] if row.get("system") else []) + [
            {"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
    elif isinstance(row, dict) and isinstance(row.get("messages"), list):
        msgs = row["messages"]
    else:
        keys = list(row) if isinstance(row, dict) else type(row).__name__
        raise ConfigError(f"chat data {where}: the row has no `messages` list (nor `prompt` and `completion`); "
                          f"it has {keys}")
    for k, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise ConfigError(f"chat data {where}: message {k + 1} is not {{role, content}} with text content")
        if m.get("role") not in ROLES:
            raise ConfigError(f"chat data {where}: message {k + 1} has role {m.get('role')!r}; allowed: "
                              f"{', '.join(ROLES)}")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


# -- rendering -------------------------------------------------------------------------------------
def render(messages: list[dict], tokenizer, template: Template, where: str = "") -> tuple[np.ndarray, np.ndarray]:
    """(token ids, loss mask) of one conversation; mask 1 on each assistant turn and its end marker."""
    def text_of(msgs, gen=False) -> str:
        if not msgs:
            return ""
        return tokenizer.apply_chat_template(msgs, chat_template=template.text, tokenize=False,
                                             add_generation_prompt=gen)

    text = text_of(messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, upto = text_of(messages[:i], gen=True), text_of(messages[: i + 1])
        if not (upto.startswith(before) and text.startswith(upto)):
            raise ConfigError(f"chat data {where}: {template.name} does not render the conversation prefix by prefix "
                              "(it changes earlier turns), so the assistant's tokens cannot be located; use another "
                              "data.chat_template")
        if m["content"] and len(upto) == len(before):
            raise ConfigError(f"chat data {where}: {template.name} renders no text for the assistant's turn "
                              f"{i + 1}: nothing to learn; use a template that renders assistant messages")
        spans.append((len(before), len(upto)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    starts = np.asarray([s for s, _ in enc["offset_mapping"]], dtype=np.int64)
    mask = np.zeros(len(ids), dtype=np.uint8)
    for a, b in spans:
        mask[(starts >= a) & (starts < b)] = 1
    if spans and not mask.any():
        raise ConfigError(f"chat data {where}: {template.name} produces no assistant tokens: nothing to learn")
    return ids, mask


def encode_rows(rows: list[tuple[str, list[dict]]], tokenizer, template: Template,
                eos: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, tokens per row, mask) of a chunk of conversations, EOS ending each one: appended
    when the template did not end it so (it then ends the last turn, with that turn's mask)."""
    ids, lengths, masks = [], np.zeros(len(rows), dtype=np.int64), []
    for r, (where, msgs) in enumerate(rows):
        t, m = render(msgs, tokenizer, template, where)
        if len(t) == 0 or t[-1] != eos:
            t, m = np.append(t, eos), np.append(m, m[-1] if len(m) else 0).astype(np.uint8)
        ids.append(t)
        masks.append(m)
        lengths[r] = len(t)
    if not ids:
        return np.zeros(0, np.int64), lengths, np.zeros(0, np.uint8)
    return np.concatenate(ids), lengths, np.concatenate(masks)
