"""Packing without cross-document attention, proven exact under ddp, zero3 and fsdp (2 real ranks each).

The corpus is written token by token: 8 blocks of SEQ_LEN=32, each tiled by 3 whole documents.
One optimizer step covers all of it twice over: as the 8 packed blocks with document masking
(PACKING=masked, under each strategy), and as the 24 documents alone, one per padded sequence
(PACKING=padded: the documents run one by one, the reference). The step's loss must be the same
token-weighted mean, and its gradient the same. The gradient is read off the weights: with AdamW's
eps and LR both E, the first update is g / (1 + |g| / E), the gradient itself to ~1e-6 (and the
same function of it in every run), so equal exported weights mean equal gradients.
"""

from __future__ import annotations

import random

import pytest
import torch
from helpers import read_metrics, train, write_prepared

from train.config import ModelConfig
from train.worker.model import build_model, load_tokenizer

pytestmark = pytest.mark.slow

SEQ, BLOCKS, PER_BLOCK, SEED = 32, 8, 3, 7
E = 1000.0
STEP = {"MAX_STEPS": 1, "SEQ_LEN": SEQ, "SEED": SEED, "LR": E, "optim.eps": E, "optim.weight_decay": 0,
        "optim.grad_clip": 1e9, "optim.warmup_steps": 0, "optim.schedule": "constant", "CHECKPOINT_EVERY": 0}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ModelConfig(name="llama-debug"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tok):
    rng = random.Random(0)
    docs = []
    for _ in range(BLOCKS):
        a, b = sorted(rng.sample(range(4, SEQ - 3), 2))  # three documents of >= 4 tokens, summing to SEQ
        for n in (a, b - a, SEQ - b):
            docs.append([rng.randrange(1, len(tok)) for _ in range(n - 1)] + [tok.eos_token_id])
    return write_prepared(tmp_path_factory.mktemp("packing") / "docs", docs, tok)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus):
    done = {}

    def get(name: str):
        if name not in done:
            strategy, packing = name.split("-")
            # global batch = the whole corpus: 8 blocks (4 per rank), or 24 documents (4 x 3 accumulated per rank)
            batch = {"MICRO_BATCH": 4, "GLOBAL_BATCH": BLOCKS if packing == "masked" else BLOCKS * PER_BLOCK}
            out = tmp_path_factory.mktemp(name)
            done[name] = (out, train(out, STRATEGY=strategy, PACKING=packing, DATASET=corpus, EVAL_DATASET=corpus,
                                     **batch, **STEP))
        return done[name]

    return get


def _weights(out):
    from safetensors.torch import load_file

    return load_file(str(out / "final" / "model.safetensors"))


def _update(out, tok) -> torch.Tensor:
    """The step's update (exported weights minus the seeded initial ones): the gradient, here."""
    from accelerate.utils import set_seed

    set_seed(SEED)
    start = build_model(ModelConfig(name="llama-debug"), len(tok)).state_dict()
    after = _weights(out)
    return torch.cat([(after[k] - start[k]).flatten() for k in sorted(after)])


def test_the_reference_runs_each_document_alone(runs):
    out, p = runs("ddp-padded")
    assert "[train] sequences: padded (one document per sequence" in p.stdout
    assert f"{BLOCKS * PER_BLOCK} training blocks" in p.stdout or "24 training" in p.stdout


@pytest.mark.parametrize("strategy", ["ddp", "zero3", "fsdp"])
def test_packed_blocks_equal_their_documents_run_one_by_one(strategy, runs, tok):
    ref_out, _ = runs("ddp-padded")
    out, p = runs(f"{strategy}-masked")
    assert f"strategy={strategy} engaged as" in p.stdout and "world_size=2" in p.stdout
    assert "[train] sequences: packed with document masking" in p.stdout
    loss, ref_loss = read_metrics(out)[0]["loss"], read_metrics(ref_out)[0]["loss"]
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    update, ref_update = _update(out, tok), _update(ref_out, tok)
    assert ref_update.norm() > 1e-3  # a real step was taken
    assert (update - ref_update).norm() <= 1e-5 * ref_update.norm()
