"""Which rank is the odd one out: the newest hang dump (``hang.dump``), merged across nodes, read
into a table and a verdict. Printed by node 0's supervisor, and by ``python -m train hang-report``.
On NCCL the flight recorder's dumps in the same folders decide (flight_recorder.py): the stacks of
ranks that wait for a collective enqueued asynchronously name no collective.
"""

from __future__ import annotations

import re
from pathlib import Path

from train.launcher import flight_recorder
from train.launcher.hang import HANGS, STACKS, newest_dump

PHASE_WORDS = {"setup": "setup", "data": "data loading", "forward": "forward/backward", "optimizer": "the optimizer step",
               "collective": "a logging collective", "checkpoint": "a checkpoint save", "eval": "evaluation"}
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "reduce_scatter",
               "reduce_scatter_tensor", "broadcast", "broadcast_object_list", "barrier", "monitored_barrier",
               "reduce", "all_to_all", "all_to_all_single", "gather", "scatter", "send", "recv"}
FRAME = re.compile(r"^\s+(?P<func>\S+) \((?P<file>[^:()]+)(?::(?P<line>\d+))?\)")


# -- the report ---------------------------------------------------------------------------
def _parse(path: Path) -> dict:
    text = path.read_text()
    head, _, body = text.partition(STACKS)
    info = dict(line.split(": ", 1) for line in head.splitlines() if ": " in line)
    frames = _main_thread(body)
    # The Python call names the collective best (all_reduce); native frames are the fallback
    # (DDP's reducer inside backward has no Python frame of its own).
    found = [c for c in map(_collective, frames) if c]
    named = [c for c in found if c in COLLECTIVES or c.startswith("all_reduce")]
    coll = (named or found or [None])[0]
    ours = next((f for f in frames if "/train/" in f"/{f['file']}" or f["file"].startswith("train/")), None)
    top = [f"{f['func']} ({Path(f['file']).name}:{f['line']})" for f in frames if f["line"]][:3]
    info.update(collective=coll, ours=f"{ours['func']} ({ours['file']}:{ours['line']})" if ours else None,
                top=top, dumped=bool(frames))
    return info


def _collective(frame: dict) -> str | None:
    """The collective a frame waits in: a torch.distributed call, or (native frames) DDP's
    reducer waiting for its gradient all_reduce, or a process group's own work."""
    func, file = frame["func"], frame["file"]
    if func in COLLECTIVES and "distributed" in file:
        return func
    if func.startswith("c10d::Reducer::"):
        return "all_reduce (DDP gradients)"
    if func.startswith(("c10d::ProcessGroup", "gloo::", "c10d::Work")) or func.startswith("nccl"):
        name = func.split("::")[-1].lower()
        return name if name in COLLECTIVES else "collective"
    return None


def _main_thread(body: str) -> list[dict]:
    """Frames of the main thread, innermost first (py-spy prints them that way)."""
    frames, inside = [], False
    for line in body.splitlines():
        if line.startswith("Thread "):
            if inside:
                break
            inside = '"MainThread"' in line
            continue
        m = FRAME.match(line) if inside else None
        if m:
            frames.append(m.groupdict())
    return frames


def _ranks(ranks: list[int]) -> str:
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    contiguous = ranks == list(range(ranks[0], ranks[-1] + 1))
    return f"ranks {ranks[0]}-{ranks[-1]}" if contiguous and len(ranks) > 2 else f"ranks {', '.join(map(str, ranks))}"


def verdict(rows: list[dict]) -> str:
    def who(r: dict) -> str:
        return f"rank {r['rank']} (node {r['node']}, host {r['host']})"

    def where(r: dict) -> str:
        phase = PHASE_WORDS.get(r.get("phase", ""), r.get("phase", "?"))
        at = r["ours"] or (r["top"][0] if r["top"] else "no Python frames")
        return f"in {phase} at {at}"

    steps = [int(r["last_step"]) for r in rows if r.get("last_step") not in (None, "None")]
    step = max(steps) + 1 if steps else "?"
    waiting = [r for r in rows if r["collective"] and r["process_state"] not in "TtZ?"]
    odd = [r for r in rows if r not in waiting]
    if waiting and odd:
        coll = waiting[0]["collective"]
        verb = "waits" if len(waiting) == 1 else "wait"
        lines = []
        for r in odd:
            state = {"T": "it is stopped (SIGSTOP)", "t": "it is stopped by a tracer", "Z": "it has exited (zombie)",
                     "?": "its process is gone"}.get(r["process_state"], "it is")
            lines.append(f"{who(r)} is not in the {coll} that {_ranks([int(w['rank']) for w in waiting])} {verb} in "
                         f"at step {step}: {state} {where(r)}")
        return "\n".join(lines)
    if waiting:
        return (f"every rank dumped ({_ranks([int(r['rank']) for r in rows])}) waits in {waiting[0]['collective']} at "
                f"step {step}: the rank holding them up is on a node whose dump is missing, or the network is stuck")
    stopped = [r for r in rows if r["process_state"] in "TtZ?"]
    if stopped:
        return "\n".join(f"{who(r)} is stopped or gone (process state {r['process_state']}) {where(r)}" for r in stopped)
    return "no rank is in a collective: " + "; ".join(f"{who(r)} {where(r)}" for r in rows)


def report(output_dir: str) -> str:
    files = newest_dump(output_dir)
    if not files:
        return f"no hang dumps under {Path(output_dir) / HANGS}"
    rows = [_parse(f) for f in files]
    # NCCL's own record of who entered which collective beats the stacks (see flight_recorder.py).
    dumps = flight_recorder.read(sorted({f.parent for f in files}))
    table = [f"hang dump: {files[0].parent} ({len(files)} rank(s))",
             f"{'rank':>4} {'node':>4} {'host':<16} {'state':<5} {'step':>6} {'phase':<10} {'collective':<26} top frames"]
    for r in rows:
        table.append(f"{r['rank']:>4} {r['node']:>4} {str(r['host'])[:16]:<16} {r['process_state']:<5} "
                     f"{r['last_step']:>6} {r['phase']:<10} {r['collective'] or '-':<26} {' < '.join(r['top']) or '(no stacks)'}")
    stacks = verdict(rows)
    named = flight_recorder.verdict(dumps)
    if not dumps:
        return "\n".join(table + ["verdict: " + stacks])
    table += [f"flight recorder: {len(dumps)} rank(s)", *flight_recorder.table(dumps)]
    if not named:
        return "\n".join(table + ["verdict: no collective is behind on any rank (flight recorder); " + stacks])
    return "\n".join(table + ["verdict (flight recorder): " + "\n".join(named), "stacks: " + stacks])
