"""Chat / instruction data: the assistant-only loss mask, the labels and positions a packed block
carries, a packed block's loss and gradients against its documents run one by one (one process),
and each refusal of bad chat input. Fast: no process group starts here (tests/test_packing.py runs
the strategies)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import TINY, assert_refused, launch_in_process, snapshot

from train.config import DataConfig, ModelConfig
from train.data.chat import TEMPLATES, Template, render
from train.data.loader import TokenBlocks
from train.data.packing import PaddedDocs, model_inputs
from train.data.prepare import prepare
from train.worker.model import build_model, load_tokenizer

CONVERSATION = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Bye!"}]
ROWS = [{"messages": CONVERSATION},
        {"prompt": "What is 2 plus 3?", "completion": "2 plus 3 is 5."},
        {"messages": [{"role": "user", "content": "Say hello to Mia."}, {"role": "assistant", "content": "Hello, Mia!"}]},
        {"messages": [{"role": "user", "content": "Where is Tom?"}, {"role": "assistant", "content": "In the park."},
                      {"role": "user", "content": "And Ben?"}, {"role": "assistant", "content": "At the lake."}]}]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ModelConfig(name="llama-debug"))


@pytest.fixture(scope="module")
def plain():
    return Template(TEMPLATES["plain"].read_text(), "plain")


def test_assistant_only_mask_on_a_rendered_conversation(tok, plain):
    ids, mask = render(CONVERSATION, tok, plain)
    # The rendering, piece by piece: headers and the other roles' turns are not learned; each
    # assistant reply and the EOS that ends it are.
    pieces = [("<|system|>\nBe kind.\n<|user|>\nHi\n<|assistant|>\n", 0), ("Hello.<|endoftext|>", 1),
              ("<|user|>\nBye\n<|assistant|>\n", 0), ("Bye!<|endoftext|>", 1)]
    want_ids, want_mask = [], []
    for text, m in pieces:
        part = tok(text, add_special_tokens=False)["input_ids"]
        want_ids += part
        want_mask += [m] * len(part)
    assert ids.tolist() == want_ids
    assert mask.tolist() == want_mask
    assert tok.decode(ids[mask == 1].tolist()) == "Hello.<|endoftext|>Bye!<|endoftext|>"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("chat")
    (d / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return prepare([str(d / "chat.jsonl")], d / "prepared", tok, DataConfig(format="chat"), workers=1, log=lambda *_: None)


def test_prepared_shards_hold_the_mask_beside_the_tokens(corpus, tok, plain):
    assert corpus.has_mask and corpus.num_documents == len(ROWS)
    assert corpus.manifest["arrays"]["mask"] == {"suffix": ".mask", "dtype": "|u1", "per": "token"}
    assert set(corpus.shards[0]["sha256"]) == {"tokens", "docs", "mask"}
    ids, mask = render(CONVERSATION, tok, plain)  # the first row, as rendered alone
    assert corpus.tokens(0, len(ids)).tolist() == ids.tolist()
    assert corpus.mask(0, len(ids)).tolist() == mask.tolist()


def _documents(corpus, a, b):
    """The pieces of global tokens [a, b) that lie in one document each."""
    cuts = [a, *corpus.document_starts_in(a, b).tolist(), b]
    return list(zip(cuts, cuts[1:]))


def test_packed_labels_and_positions(corpus):
    seq = 48
    blocks = TokenBlocks(corpus, 0, corpus.num_tokens, seq, "masked")
    for i in range(len(blocks)):
        item, a = blocks.item(i), i * seq
        mask = torch.from_numpy(corpus.mask(a, a + seq).astype(bool))
        docs = _documents(corpus, a, a + seq)
        starts = [s - a for s, _ in docs]
        want_pos = torch.cat([torch.arange(e - s) for s, e in docs])
        assert item["position_ids"].tolist() == want_pos.tolist()  # positions restart per document
        want = torch.where(mask, item["input_ids"], -100)
        want[starts] = -100  # a document's first token is never predicted from the previous one
        assert item["labels"].tolist() == want.tolist()
    assert len(blocks) > 2 and any(len(_documents(corpus, i * seq, (i + 1) * seq)) > 1 for i in range(len(blocks)))
    # train_on_prompt: every token but the documents' first ones
    item = TokenBlocks(corpus, 0, corpus.num_tokens, seq, "masked", train_on_prompt=True).item(1)
    starts = [s - seq for s, _ in _documents(corpus, seq, 2 * seq)][1:]
    assert [i for i, v in enumerate(item["labels"].tolist()) if v == -100] == starts


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_packed_block_equals_its_documents_run_one_by_one(corpus, attn):
    """Loss (summed over tokens) and gradients of one masked block vs each document alone, fp32."""
    seq = 64
    blocks = TokenBlocks(corpus, 0, corpus.num_tokens, seq, "masked", train_on_prompt=True)
    i = max(range(len(blocks)), key=lambda i: len(_documents(corpus, i * seq, (i + 1) * seq)))
    item = blocks.item(i)
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="llama-debug", attn_implementation=attn), 640).float()

    def loss_and_grads(batches) -> tuple[torch.Tensor, torch.Tensor]:
        model.zero_grad()
        total = sum(model(**model_inputs(b), num_items_in_batch=1).loss for b in batches)  # sums, not means
        total.backward()
        return total.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])

    packed = loss_and_grads([{k: v[None] for k, v in item.items()}])
    alone = []
    for s, e in _documents(corpus, i * seq, (i + 1) * seq):
        x = torch.from_numpy(corpus.tokens(s, e).astype("int64"))[None]
        alone.append({"input_ids": x, "labels": x})
    assert len(alone) >= 3
    one_by_one = loss_and_grads(alone)
    torch.testing.assert_close(packed[0], one_by_one[0], rtol=1e-6, atol=1e-5)
    # fp32: the same sums in another order differ in the last bits; a leak moves them at the 1e-2 level
    assert (packed[1] - one_by_one[1]).norm() <= 1e-6 * one_by_one[1].norm()
    torch.testing.assert_close(packed[1], one_by_one[1], rtol=1e-4, atol=1e-6 * one_by_one[1].abs().max().item())
    # The same block packed without masking is not the per-document sum: the test can tell.
    plain = TokenBlocks(corpus, 0, corpus.num_tokens, seq, "plain", train_on_prompt=True).item(i)
    plain["labels"] = item["labels"]
    assert not torch.allclose(loss_and_grads([{k: v[None] for k, v in plain.items()}])[0], one_by_one[0], rtol=1e-4)


def test_padded_sequences_hold_one_document_each(corpus):
    docs = PaddedDocs(corpus, 0, corpus.num_tokens, 64, train_on_prompt=False)
    assert len(docs) == len(ROWS)
    item = docs.item(1)  # prompt/completion: user then assistant
    n = int(item["attention_mask"].sum())
    assert n == corpus.document_lengths()[1]
    learned = item["labels"][item["labels"] != -100]
    assert learned.tolist() == load_tokenizer(ModelConfig(name="llama-debug"))(
        "2 plus 3 is 5.<|endoftext|>", add_special_tokens=False)["input_ids"]
    assert (item["input_ids"][n:] == corpus.tokenizer["eos"]).all()


# -- refusals: one line, exit 2, before any process starts -------------------------------------------
@pytest.fixture
def refuse(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')

    def run(*args, fragments):
        before = snapshot(out)
        settings = {**TINY, "OUTPUT_DIR": str(out), "DATA_CACHE": str(tmp_path / "cache")}
        p = launch_in_process(monkeypatch, capsys, *(f"{k}={v}" for k, v in settings.items()), *args)
        return assert_refused(p, *fragments, out=out, before=before)

    return run


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_row_without_messages_is_refused_with_file_and_line(tmp_path, refuse):
    data = _jsonl(tmp_path / "chat.jsonl", [*ROWS, {"conversation": []}])
    refuse(f"DATASET={data}", "DATA_FORMAT=chat",
           fragments=[f"{data}:{len(ROWS) + 1}", "no `messages` list", "['conversation']"])


def test_an_unknown_role_is_refused(tmp_path, refuse):
    data = _jsonl(tmp_path / "chat.jsonl", [*ROWS, {"messages": [{"role": "narrator", "content": "x"}]}])
    refuse(f"DATASET={data}", fragments=[f"{data}:{len(ROWS) + 1}", "role 'narrator'",
                                         "allowed: system, user, assistant, tool"])


def test_a_tokenizer_without_a_chat_template_is_refused(tmp_path, tok, refuse):
    bare = tmp_path / "tokenizer"
    tok.save_pretrained(bare)
    for f in bare.glob("chat_template*"):
        f.unlink()
    data = _jsonl(tmp_path / "chat.jsonl", ROWS)
    refuse(f"DATASET={data}", f"TOKENIZER={bare}", fragments=["has no chat template", "CHAT_TEMPLATE", "plain"])


def test_a_template_that_renders_no_assistant_tokens_is_refused(tmp_path, refuse):
    silent = tmp_path / "silent.jinja"
    silent.write_text("{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}\n{% endif %}"
                      "{% endfor %}")
    data = _jsonl(tmp_path / "chat.jsonl", ROWS)
    refuse(f"DATASET={data}", f"CHAT_TEMPLATE={silent}", fragments=[f"{data}:1", "nothing to learn"])


def test_document_masking_with_an_attention_that_cannot_is_refused(tmp_path, refuse):
    data = _jsonl(tmp_path / "chat.jsonl", ROWS)
    refuse(f"DATASET={data}", "model.attn_implementation=paged|eager",
           fragments=["PACKING=masked", "'paged|eager'", "sdpa"])
