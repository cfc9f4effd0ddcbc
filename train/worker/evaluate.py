"""Evaluation on named eval sets: the same number for any world size.

Each set is read whole (or its first ``train.eval_tokens``, in whole blocks, the same blocks for
any world size). Rank r takes blocks r, r + W, r + 2W, ...; every rank runs the same number of
forward passes (ZeRO-3 and FSDP gather weights inside each one, DDP broadcasts buffers: a rank
that ran fewer would leave the others waiting), so a rank whose share is short fills its last
micro-batch with a stand-in block whose labels are all ignored. The loss is summed per token and
the token count kept beside it, both all-reduced, then divided: no block is dropped, none counted
twice, and labels of -100 (prompt tokens, padding) are no tokens. A distributed sampler would pad
an uneven share by repeating blocks (counted twice) or drop the tail (``drop_last``).

It draws no random numbers and leaves the training sampler alone: a resumed run's training is
the same whether or not it evaluated.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from train.data import collate
from train.data.packing import IGNORE_INDEX, model_inputs


def blocks_to_read(n_blocks: int, eval_tokens: int, seq_len: int) -> int:
    """All of a set, or its first blocks holding at least ``eval_tokens`` tokens."""
    return n_blocks if eval_tokens <= 0 else min(n_blocks, math.ceil(eval_tokens / seq_len))


def rank_batches(n_blocks: int, rank: int, world: int, micro_batch: int) -> list[list[int | None]]:
    """The micro-batches of block indices rank ``rank`` evaluates, ``None`` for a stand-in.
    Every rank gets the same number of micro-batches; over all ranks each block appears once."""
    mine: list[int | None] = list(range(rank, n_blocks, world))
    passes = math.ceil(math.ceil(n_blocks / world) / micro_batch)
    mine += [None] * (passes * micro_batch - len(mine))
    return [mine[k * micro_batch:(k + 1) * micro_batch] for k in range(passes)]


def _batch(ds, ids: list[int | None], device) -> dict:
    items = []
    for i in ids:
        it = dict(ds[0 if i is None else i])
        if i is None:  # a stand-in keeps the shapes; it adds no loss and no tokens
            it["labels"] = torch.full_like(it["labels"], IGNORE_INDEX)
        items.append(model_inputs(it))
    return {k: v.to(device) for k, v in collate(items).items()}


@torch.no_grad()
def evaluate_sets(model, sets: dict, *, rank: int, world: int, micro_batch: int, seq_len: int, eval_tokens: int,
                  device, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> dict:
    """``{"eval/NAME/loss", "eval/NAME/ppl", "eval/NAME/tokens"}`` for every set; ``all_reduce_sum``
    sums a tensor over the ranks (the identity for one rank). One collective for all sets."""
    was_training = model.training
    model.eval()
    one = torch.ones((), device=device)
    totals = torch.zeros(len(sets), 2, dtype=torch.float64, device=device)  # (summed loss, tokens) per set
    for s, ds in enumerate(sets.values()):
        n = blocks_to_read(len(ds), eval_tokens, seq_len)
        for ids in rank_batches(n, rank, world, micro_batch):
            b = _batch(ds, ids, device)
            # num_items_in_batch=1: transformers divides the summed token loss by it, so this is the sum.
            loss_sum = model(**b, num_items_in_batch=one).loss
            totals[s, 0] += loss_sum.double()
            totals[s, 1] += (b["labels"][:, 1:] != IGNORE_INDEX).sum()
    if was_training:
        model.train()
    totals = all_reduce_sum(totals).cpu()
    out = {}
    for (name, _), (loss_sum, tokens) in zip(sets.items(), totals.tolist()):
        loss = loss_sum / tokens if tokens else float("nan")
        out |= {f"eval/{name}/loss": loss, f"eval/{name}/ppl": math.exp(min(loss, 50.0)) if tokens else float("nan"),
                f"eval/{name}/tokens": int(tokens)}
    return out


def evaluate(model, sets: dict, acc, micro_batch: int, seq_len: int, eval_tokens: int) -> dict:
    """``evaluate_sets`` on this rank of an accelerate job."""
    world = acc.num_processes
    return evaluate_sets(model, sets, rank=acc.process_index, world=world, micro_batch=micro_batch, seq_len=seq_len,
                         eval_tokens=eval_tokens, device=acc.device,
                         all_reduce_sum=(lambda t: acc.reduce(t, "sum")) if world > 1 else (lambda t: t))
