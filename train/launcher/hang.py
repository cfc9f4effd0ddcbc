"""Hung ranks: dump every local rank's stacks from outside, and say which rank is the odd one out.

``dump()`` runs on each node's supervisor when its watchdog fires. py-spy reads the Python
stacks (and native frames where it can pause the process) from outside, so it works when a
rank is stuck in C code or stopped. One file per rank: ``OUTPUT_DIR/hangs/<time>/node<N>-rank<R>.txt``,
a header of ``key: value`` lines (what the rank last reported) and then py-spy's output.

``report()`` (``python -m train hang-report OUTPUT_DIR``, printed by node 0 too) reads the
newest dump, merged across nodes, into a table and a verdict.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from train.config import ConfigError

HANGS = "hangs"
STACKS = "--- stacks (py-spy) ---"
MERGE_WINDOW_S = 120  # nodes detect the same hang within a timeout of each other
PHASE_WORDS = {"setup": "setup", "data": "data loading", "forward": "forward/backward", "optimizer": "the optimizer step",
               "collective": "a logging collective", "checkpoint": "a checkpoint save", "eval": "evaluation"}
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "reduce_scatter",
               "reduce_scatter_tensor", "broadcast", "broadcast_object_list", "barrier", "monitored_barrier",
               "reduce", "all_to_all", "all_to_all_single", "gather", "scatter", "send", "recv"}
FRAME = re.compile(r"^\s+(?P<func>\S+) \((?P<file>[^:()]+)(?::(?P<line>\d+))?\)")


def py_spy() -> str | None:
    here = Path(sys.executable).with_name("py-spy")  # the venv's bin is often not on PATH
    return str(here) if here.is_file() else shutil.which("py-spy")


def process_state(pid: int) -> str:
    """One letter from /proc: R running, S sleeping, D disk wait, T stopped, Z zombie, ? gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "?"


def stacks(pid: int, state: str) -> str:
    """py-spy's dump: with native frames if it can pause the process, else without pausing
    (a stopped process cannot be paused again)."""
    exe = py_spy()
    if exe is None:
        return "(py-spy is not installed: pip install py-spy)"
    tries = [["--nonblocking"]] if state in "Tt" else [["--native"], [], ["--nonblocking"]]
    errors = []
    for extra in tries:
        try:
            p = subprocess.run([exe, "dump", "--pid", str(pid), *extra], capture_output=True, text=True, timeout=20)
        except subprocess.TimeoutExpired:
            errors.append(f"py-spy dump {' '.join(extra)}: timed out")
            continue
        if p.returncode == 0 and "Thread" in p.stdout:
            return p.stdout
        errors.append(f"py-spy dump {' '.join(extra)}: exit {p.returncode}: {(p.stderr or p.stdout).strip()[-300:]}")
    return "(no stacks)\n" + "\n".join(errors)


def dump(records: list[dict], output_dir: str, node: int, idle_s: float) -> Path:
    """Write one file per local rank; returns the folder."""
    folder = Path(output_dir) / HANGS / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    folder.mkdir(parents=True, exist_ok=True)

    def one(rec: dict) -> None:
        state = process_state(rec["pid"])
        header = {"rank": rec["rank"], "local_rank": rec.get("local_rank"), "node": node, "host": rec.get("host"),
                  "pid": rec["pid"], "process_state": state, "attempt": rec.get("attempt"),
                  "last_step": rec.get("step"), "phase": rec.get("phase"),
                  "seconds_since_progress": round(time.time() - rec.get("t", time.time()), 1),
                  "node_idle_s": round(idle_s, 1)}
        text = "".join(f"{k}: {v}\n" for k, v in header.items()) + STACKS + "\n" + stacks(rec["pid"], state)
        (folder / f"node{node}-rank{rec['rank']}.txt").write_text(text)

    with ThreadPoolExecutor(max_workers=max(1, len(records))) as pool:
        list(pool.map(one, records))
    return folder


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


def newest_dump(output_dir: str) -> list[Path]:
    """The files of the newest hang, merged over nodes (each node names its folder by its own clock)."""
    root = Path(output_dir) / HANGS
    folders = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not folders:
        return []
    stamp = lambda p: time.mktime(time.strptime(p.name, "%Y%m%dT%H%M%SZ"))  # noqa: E731
    last = stamp(folders[-1])
    return sorted((f for p in folders if last - stamp(p) <= MERGE_WINDOW_S for f in p.glob("node*-rank*.txt")),
                  key=lambda f: int(f.stem.split("-rank")[1]))


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
    table = [f"hang dump: {files[0].parent} ({len(files)} rank(s))",
             f"{'rank':>4} {'node':>4} {'host':<16} {'state':<5} {'step':>6} {'phase':<10} {'collective':<26} top frames"]
    for r in rows:
        table.append(f"{r['rank']:>4} {r['node']:>4} {str(r['host'])[:16]:<16} {r['process_state']:<5} "
                     f"{r['last_step']:>6} {r['phase']:<10} {r['collective'] or '-':<26} {' < '.join(r['top']) or '(no stacks)'}")
    return "\n".join(table + ["verdict: " + verdict(rows)])


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise ConfigError("usage: python -m train hang-report OUTPUT_DIR")
    print(report(argv[0]))


def wait_for_dumps(output_dir: str, expected: int, timeout_s: float) -> None:
    """Node 0 waits (bounded) for the other nodes' files before printing the report."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and len(newest_dump(output_dir)) < expected:
        time.sleep(0.5)


__all__ = ["dump", "report", "main", "wait_for_dumps", "process_state"]
