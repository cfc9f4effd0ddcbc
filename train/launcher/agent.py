"""The agent the supervisor starts on each node: accelerate's launcher (torchrun inside), quiet
when a stop signal ends it.

On Ctrl-C or SIGTERM the supervisor forwards the signal; the workers agree on a step, save and
say so. torchrun then raises ``SignalException`` out of its main, and Python would print a
30-line traceback after the save message that reads as a crash. Here it is one line instead, and
the exit status is the signal's, as if the signal had ended the process.
"""

from __future__ import annotations

import sys


def main() -> None:
    from accelerate.commands.launch import main as accelerate_launch
    from torch.distributed.elastic.multiprocessing.api import SignalException

    try:
        accelerate_launch()
    except SignalException as e:
        print(f"[agent] stopped by {e.sigval.name}: the workers were told to save and exit", file=sys.stderr, flush=True)
        sys.exit(128 + int(e.sigval))


if __name__ == "__main__":
    main()
