"""Gradient accumulation: the update of GRAD_ACCUM=4 x micro-batch 2 equals one micro-batch of 8,
with the loss a per-token mean over the whole effective batch (transformers#24725)."""

from __future__ import annotations

import weakref

import pytest
import torch
from helpers import losses, train

from train.config import ModelConfig
from train.worker.loop import IGNORE_INDEX, forward_backward
from train.worker.model import build_model


@pytest.fixture
def accelerator_factory():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    def make(steps: int):
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        return Accelerator(cpu=True, gradient_accumulation_steps=steps)

    yield make
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _batch(seed=0, n=8, seq=16, vocab=640):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, seq), generator=g)
    labels = ids.clone()
    for i in range(n):  # very different numbers of real tokens per sequence, as with padding
        labels[i, 2 + 2 * i:] = IGNORE_INDEX
    return ids, labels


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def _reference_grads(ids, labels):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="llama-debug"), 640)
    model(input_ids=ids, labels=labels).loss.backward()  # one batch of 8: mean over its tokens
    return _grads(model)


def test_accumulated_update_equals_the_full_batch_update(accelerator_factory):
    ids, labels = _batch()
    reference = _reference_grads(ids, labels)
    acc = accelerator_factory(4)
    torch.manual_seed(0)
    model = acc.prepare(build_model(ModelConfig(name="llama-debug"), 640))
    micro = [{"input_ids": ids[i:i + 2], "labels": labels[i:i + 2]} for i in range(0, 8, 2)]
    forward_backward(model, micro, acc)
    torch.testing.assert_close(_grads(model), reference, rtol=1e-5, atol=1e-6)


def test_the_logits_are_freed_before_the_backward_pass(accelerator_factory):
    """Only the loss outlives the forward pass: the logits (micro-batch x seq_len x vocab, the
    largest activation at a real vocabulary) are not held through the backward pass, as HF
    Trainer does not hold them."""
    acc = accelerator_factory(2)
    model = acc.prepare(build_model(ModelConfig(name="llama-debug"), 640))
    alive_at_backward = []

    def watch(module, args, kwargs, output):
        logits = weakref.ref(output.logits)
        output.loss.register_hook(lambda grad: alive_at_backward.append(logits() is not None))

    model.register_forward_hook(watch, with_kwargs=True)
    ids, labels = _batch()
    forward_backward(model, [{"input_ids": ids[:4], "labels": labels[:4]}, {"input_ids": ids[4:], "labels": labels[4:]}], acc)
    assert alive_at_backward == [False, False]


def test_averaging_micro_batch_means_would_differ(accelerator_factory):
    """The control: the naive recipe gives another update on this batch, so the test above can fail."""
    ids, labels = _batch()
    reference = _reference_grads(ids, labels)
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="llama-debug"), 640)
    for i in range(0, 8, 2):
        (model(input_ids=ids[i:i + 2], labels=labels[i:i + 2]).loss / 4).backward()
    assert not torch.allclose(_grads(model), reference, rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_accumulation_and_ranks_give_the_same_curve_as_one_big_batch(tmp_path):
    """Same 8 sequences per step, split three ways: 1 rank x 8, 1 rank x 4 x 2, 2 ranks x 2 x 2."""
    runs = {
        "one_batch": dict(NPROC=1, MICRO_BATCH=8, GRAD_ACCUM=1),
        "accumulated": dict(NPROC=1, MICRO_BATCH=2, GRAD_ACCUM=4),
        "two_ranks": dict(NPROC=2, MICRO_BATCH=2, GRAD_ACCUM=2),
    }
    curves, printed = {}, {}
    for name, settings in runs.items():
        out = tmp_path / name
        printed[name] = train(out, MAX_STEPS=4, CHECKPOINT_EVERY=0, **{"checkpoint.export": "false"}, **settings).stdout
        curves[name] = losses(out)
    # One process is not wrapped in DDP (an all-reduce with itself each step), two are.
    assert "[train] model prepared as LlamaForCausalLM" in printed["one_batch"]
    assert "[train] model prepared as DistributedDataParallel" in printed["two_ranks"]
    assert len(curves["one_batch"]) == 4
    assert curves["accumulated"] == pytest.approx(curves["one_batch"], abs=1e-5, rel=0)
    assert curves["two_ranks"] == pytest.approx(curves["one_batch"], abs=1e-5, rel=0)
