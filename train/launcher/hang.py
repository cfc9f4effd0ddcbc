"""Hung ranks, captured: dump every local rank's stacks from outside the process.

``dump()`` runs on each node's supervisor when its watchdog fires. py-spy reads the Python
stacks (and native frames where it can pause the process) from outside, so it works when a
rank is stuck in C code or stopped. One file per rank: ``OUTPUT_DIR/hangs/<time>/node<N>-rank<R>.txt``,
a header of ``key: value`` lines (what the rank last reported) and then py-spy's output.
What the dump means is ``hang_verdict``'s job.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HANGS = "hangs"
STACKS = "--- stacks (py-spy) ---"
MERGE_WINDOW_S = 120  # nodes detect the same hang within a timeout of each other


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


def wait_for_dumps(output_dir: str, expected: int, timeout_s: float) -> None:
    """Node 0 waits (bounded) for the other nodes' files before printing the report."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and len(newest_dump(output_dir)) < expected:
        time.sleep(0.5)
