"""The built-in offline corpus and tokenizer (regenerate with ``python -m train.corpus``).

No model or dataset hub is reachable on the machines this must run on, so the default run
trains on a small corpus generated here from a seeded grammar (our own text, MIT licensed,
like the rest of the repo) with a byte-level BPE tokenizer trained on it by `tokenizers`.
Both are committed under ``train/assets`` so every machine trains on identical bytes.
"""

from __future__ import annotations

import random
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
CORPUS_FILE = ASSETS / "tiny-stories" / "train.txt"
TOKENIZER_DIR = ASSETS / "tokenizer"
VOCAB_SIZE = 2048
CHAT_FILE = ASSETS / "tiny-chat" / "train.jsonl"  # conversations for instruction tuning (docs/instruction-tuning.md)
BUILTIN_DATASETS = {"tiny-stories": CORPUS_FILE, "tiny-chat": CHAT_FILE}

_NAMES = ["Mia", "Tom", "Lily", "Ben", "Sara", "Max", "Nora", "Leo", "Ava", "Sam", "Ella", "Finn", "Zoe", "Jack"]
_ANIMALS = ["cat", "dog", "bird", "fox", "rabbit", "duck", "frog", "bear", "mouse", "horse", "owl", "fish"]
_PLACES = ["park", "forest", "garden", "river", "beach", "hill", "farm", "school", "kitchen", "town", "lake"]
_THINGS = ["ball", "kite", "box", "hat", "book", "cake", "boat", "drum", "lamp", "key", "map", "shell", "apple"]
_ADJ = ["big", "small", "red", "blue", "happy", "sleepy", "shiny", "old", "new", "funny", "quiet", "brave"]
_FEEL = ["happy", "sad", "scared", "proud", "tired", "excited", "calm", "surprised"]
_VERB_PAST = ["found", "lost", "saw", "made", "wanted", "painted", "carried", "shared", "hid", "fixed"]
_WEATHER = ["sunny", "rainy", "windy", "cold", "warm", "cloudy"]


def _story(rng: random.Random) -> str:
    a, b = rng.sample(_NAMES, 2)
    animal, place, thing = rng.choice(_ANIMALS), rng.choice(_PLACES), rng.choice(_THINGS)
    adj, adj2 = rng.sample(_ADJ, 2)
    s = [
        rng.choice([
            f"Once upon a time, there was a {adj} {animal} named {a}.",
            f"One {rng.choice(_WEATHER)} day, {a} went to the {place}.",
            f"{a} lived near a {adj} {place} with a {animal}.",
        ]),
        f"{a} {rng.choice(_VERB_PAST)} a {adj2} {thing} in the {place}.",
        rng.choice([
            f"{b} came to play, and they were {rng.choice(_FEEL)}.",
            f"The {animal} looked at the {thing} and felt {rng.choice(_FEEL)}.",
            f"{b} said, \"Can I see your {thing}?\"",
        ]),
    ]
    for _ in range(rng.randint(1, 4)):
        s.append(rng.choice([
            f"They {rng.choice(_VERB_PAST)} the {thing} together.",
            f"Then the {rng.choice(_ANIMALS)} ran to the {rng.choice(_PLACES)}.",
            f"{rng.choice([a, b])} was {rng.choice(_FEEL)} because the {thing} was {rng.choice(_ADJ)}.",
            f"It was {rng.choice(_WEATHER)}, so they stayed in the {rng.choice(_PLACES)}.",
            f"\"Let us {rng.choice(['play', 'sing', 'dance', 'read', 'run'])}!\" said {rng.choice([a, b])}.",
        ]))
    s.append(rng.choice([
        f"At the end of the day, {a} and {b} went home {rng.choice(_FEEL)}.",
        f"From that day on, {a} always kept the {thing} safe.",
        f"The {animal} and {a} became best friends.",
    ]))
    return " ".join(s)


def generate(n_stories: int = 4000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [_story(rng) for _ in range(n_stories)]


_SYSTEM = ["You are a helpful assistant.", "Answer in one short sentence.", "You are a friendly storyteller."]


def _turn(rng: random.Random) -> tuple[str, str]:
    """One question and its answer; the answer follows from the question (learnable by a tiny model)."""
    a, b = rng.sample(_NAMES, 2)
    thing, adj, place, animal = rng.choice(_THINGS), rng.choice(_ADJ), rng.choice(_PLACES), rng.choice(_ANIMALS)
    x, y = rng.randint(1, 9), rng.randint(1, 9)
    return rng.choice([
        (f"{a} has a {adj} {thing}. What does {a} have?", f"{a} has a {adj} {thing}."),
        (f"Where did {a} go? {a} went to the {place}.", f"{a} went to the {place}."),
        (f"Say hello to {a}.", f"Hello, {a}!"),
        (f"What is {x} plus {y}?", f"{x} plus {y} is {x + y}."),
        (f"Tell me a story about a {animal}.", _story(rng)),
        (f"Who is the friend of {a}? The friend of {a} is {b}.", f"The friend of {a} is {b}."),
        (f"Is the {thing} {adj}? Yes, the {thing} is {adj}.", f"Yes, the {thing} is {adj}."),
    ])


def generate_chats(n: int = 1000, seed: int = 0) -> list[dict]:
    """Conversations (one to three turns, some with a system message) and prompt/completion pairs."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        if rng.random() < 0.15:
            q, r = _turn(rng)
            rows.append({"prompt": q, "completion": r})
            continue
        msgs = [{"role": "system", "content": rng.choice(_SYSTEM)}] if rng.random() < 0.3 else []
        for _ in range(rng.choice([1, 1, 2, 3])):
            q, r = _turn(rng)
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": r}]
        rows.append({"messages": msgs})
    return rows


def train_tokenizer(lines: list[str], out_dir: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(lines, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(out_dir)


def main() -> None:
    import json

    CHAT_FILE.parent.mkdir(parents=True, exist_ok=True)
    CHAT_FILE.write_text("".join(json.dumps(r) + "\n" for r in generate_chats()))
    if "--chat-only" in __import__("sys").argv:  # the chat file alone: the tokenizer and stories stay
        print(f"wrote {CHAT_FILE}")
        return
    lines = generate()
    CORPUS_FILE.parent.mkdir(parents=True, exist_ok=True)
    CORPUS_FILE.write_text("\n".join(lines) + "\n")
    train_tokenizer(lines, TOKENIZER_DIR)  # (chat_template.jinja in that directory is kept: save_pretrained adds files)
    print(f"wrote {len(lines)} stories to {CORPUS_FILE} and a {VOCAB_SIZE}-token BPE tokenizer to {TOKENIZER_DIR}")


if __name__ == "__main__":
    main()
