"""CUDA work the launcher needs done, run in a child process that exits.

The launcher becomes the node's supervisor and lives as long as the job. A CUDA call in it
(``torch.cuda.is_bf16_supported``, a tensor on a GPU, an NCCL communicator) would create a
context on every GPU it touched that stays for the whole run: ~0.5 GB of each GPU's memory, and
under the EXCLUSIVE_PROCESS compute mode no worker could open that GPU at all. So the launcher
only asks torch questions that need no context (``is_available``, ``device_count``) and hands
everything else to ``call``: a spawned interpreter (not a fork: CUDA cannot start in a fork of a
process that used it, and a fresh one inherits nothing) that runs one function and exits.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from train.config import exitcodes


class ChildFailed(Exception):
    """The child raised something other than ``exitcodes.Exit``, or died; the message says what."""


def call(fn, *args):
    """``fn(*args)`` in a fresh process; its result (picklable), or its ``Exit`` raised here again."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            kind, value = pool.submit(_run, fn, *args).result()
        except BrokenProcessPool:
            raise ChildFailed("the process died (killed, or a crash in native code)") from None
    if kind == "exit":
        code, message = value
        raise exitcodes.Exit(message, code)
    if kind == "error":
        raise ChildFailed(value)
    return value


def _run(fn, *args) -> tuple[str, object]:
    # Exceptions are sent back as text: an Exit's code would not survive pickling (its args hold
    # only the message), and a library's own exception class may not unpickle at all.
    try:
        return "ok", fn(*args)
    except exitcodes.Exit as e:
        return "exit", (e.code, str(e))
    except Exception as e:  # noqa: BLE001 - anything the GPU throws is the answer, said in one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return "error", f"{type(e).__name__}: {first}" if first else type(e).__name__
