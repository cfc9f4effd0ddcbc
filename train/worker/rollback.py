"""Numerical faults: a non-finite loss, or a spike above ``train.spike_factor`` x the median of the
last ``train.spike_window`` logged losses, rolls the run back to the newest checkpoint and skips
the global batches between it and the spike (prior art: llm-foundry's kill_loss_spike, Megatron's
rerun machine).

Skipping is done by keeping the data cursor where the spike left it while model, optimizer,
scheduler and RNG states come from the checkpoint. The skipped range goes into the train state,
so it is in every later checkpoint's manifest: a resume from one of them continues the same
curve, and a rerun with the same config meets the same spike at the same step and skips the same
batches. The check runs on log steps only, on the loss already reduced over all ranks, so every
rank decides alike and no collective is added.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import deque

from train.config.exitcodes import DIVERGED, Exit

MIN_HISTORY = 5  # logged losses needed before a spike can be judged


class Diverged(Exit):
    """Out of rollbacks (or nothing to roll back to): ends the run with exit code DIVERGED."""

    code = DIVERGED


class SpikeGuard:
    def __init__(self, factor: float, window: int):
        self.factor = factor
        self.losses: deque[float] = deque(maxlen=window)

    def check(self, loss: float) -> str | None:
        """Why this logged loss calls for a rollback, or None (then it joins the history)."""
        if not math.isfinite(loss):
            return f"loss is {loss}"
        if self.factor and len(self.losses) >= MIN_HISTORY:
            median = statistics.median(self.losses)
            if loss > self.factor * median:
                return (f"loss {loss:.4f} is above {self.factor:g} x the median {median:.4f} "
                        f"of the last {len(self.losses)} logged losses")
        self.losses.append(loss)
        return None

    def reset(self) -> None:
        self.losses.clear()


def roll_back(ckpt, root, state, reason: str, max_rollbacks: int, log):
    """Load the newest complete checkpoint, keep the data cursor past the spike; returns the new
    TrainState. ``log`` (rank 0's MetricsLog, or None) gets the event; the curve is cut back."""
    from train.checkpoint.layout import complete_checkpoints

    done = len(state.skipped)
    if done >= max_rollbacks:
        raise Diverged(f"{reason} at step {state.step}, after {done} rollback(s) (train.max_rollbacks={max_rollbacks}); "
                       "lower optim.lr, raise train.spike_factor, or check the data")
    ckpt.finalize()  # a checkpoint still being written (checkpoint.async_save) counts from here
    found = complete_checkpoints(root)
    if not found:
        raise Diverged(f"{reason} at step {state.step} and no checkpoint to roll back to; lower optim.lr or check the data")
    new = ckpt.load(found[-1])
    skipped = {"from_step": new.step + 1, "to_step": state.step, "reason": reason,
               "from_cursor": [new.epoch, new.samples_in_epoch], "to_cursor": [state.epoch, state.samples_in_epoch]}
    new.epoch, new.samples_in_epoch = state.epoch, state.samples_in_epoch  # skip the batches that led here
    new.skipped = [*state.skipped, skipped]
    if log is not None:
        log._truncate_after(new.step)
        event = {"event": "rollback", "reason": reason, "from_step": state.step, "to_step": new.step,
                 "attempt": len(new.skipped), "skipped_samples": skipped, "step": new.step}
        with log.path.open("a") as f:
            f.write(json.dumps(event) + "\n")
        print(f"[event] {json.dumps(event)}", flush=True)
    return new
