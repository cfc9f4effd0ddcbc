"""Instruction tuning end to end: a LoRA run on a local chat JSONL under fsdp (2 real ranks) exports
an adapter and a merged model; both load (peft, transformers), their tokenizers carry the chat template
the data was rendered with, the merge is the adapter's model, and the merged model answers a
templated prompt in the chat format: a reply that ends its turn with EOS."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import losses, train

from train.corpus import generate_chats
from train.data.chat import TEMPLATES

pytestmark = pytest.mark.slow

STEPS, PRETRAIN_STEPS = 60, 100
RUN = {"STRATEGY": "fsdp", "LORA_R": 8, "model.lora_alpha": 16, "model.lora_dropout": 0,
       "model.lora_target_modules": "all-linear", "LR": 0.02, "MAX_STEPS": STEPS, "SEQ_LEN": 64,
       "CHECKPOINT_EVERY": 0, "optim.warmup_steps": 4}
QUESTION = [{"role": "user", "content": "Say hello to Mia."}]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chat-lora")
    # The "pretrained" model: llama-debug trained on the built-in stories, as docs/instruction-tuning.md does.
    pretrain = tmp / "pretrain"
    train(pretrain, MAX_STEPS=PRETRAIN_STEPS, SEQ_LEN=64, CHECKPOINT_EVERY=0, LR=0.01)
    base = pretrain / "final"
    data = tmp / "conversations.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in generate_chats(600, seed=1)))
    out = tmp / "run"
    return base, out, train(out, MODEL=base, DATASET=data, **RUN)


def test_the_run_trains_on_the_assistants_tokens_of_packed_conversations(run):
    _, out, p = run
    assert "strategy=fsdp engaged as" in p.stdout and "world_size=2" in p.stdout
    assert ("[train] sequences: packed with document masking" in p.stdout
            and "chat data, loss on the assistant's tokens only" in p.stdout)
    curve = losses(out)
    assert len(curve) == STEPS and curve[-1] < curve[0] - 0.5, curve


def test_adapter_and_merged_model_load_with_the_chat_template(run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, out, _ = run
    final = out / "final"
    merged = AutoModelForCausalLM.from_pretrained(final).eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), final / "adapter").eval()
    plain = TEMPLATES["plain"].read_text()
    for where in (final, final / "adapter"):
        assert AutoTokenizer.from_pretrained(where).chat_template == plain
    tok = AutoTokenizer.from_pretrained(final)
    prompt = tok.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = prompt["input_ids"]
    assert tok.decode(ids[0]) == "<|user|>\nSay hello to Mia.\n<|assistant|>\n"
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, rtol=1e-4, atol=1e-4)


def test_the_merged_model_answers_in_the_chat_format(run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, out, _ = run
    tok = AutoTokenizer.from_pretrained(out / "final")
    model = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    ids = tok.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    new = model.generate(ids, max_new_tokens=40, do_sample=False, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
    reply = tok.decode(new)
    # The turn ends with EOS (learned: it is an assistant token), and no other role's header is invented.
    assert tok.eos_token_id in new, reply
    assert "<|user|>" not in reply and "<|assistant|>" not in reply, reply
