"""NCCL's flight recorder in the hang dump and its verdict.

On NCCL a collective returns to Python when it is enqueued, not when the peers arrive: a healthy
rank that waits for a stuck one sits in ``synchronize``, ``.item()`` or the next kernel launch,
so its Python stack names the wrong phase and no collective. The flight recorder knows better:
each rank keeps its last collectives (``TORCH_NCCL_TRACE_BUFFER_SIZE`` entries) with a sequence
number per process group, and dumps them on a collective timeout (``TORCH_NCCL_DUMP_ON_TIMEOUT``)
or when the supervisor writes to the rank's debug pipe at a hang (supervisor._dump_nccl). A rank
whose last enqueued collective is behind the others' is the one holding them up.

The dumps are torch's format (torch/distributed/flight_recorder reads the same files): a pickled
dict with ``entries`` (``collective_seq_id``, ``profiling_name`` "nccl:all_reduce",
``process_group`` (name, description), ``input_sizes``, ``state``, ``frames``...), ``pg_status``
and ``pg_config``. They are read with an unpickler that accepts plain data only (dicts, lists,
strings, numbers), never a class: a file in a shared OUTPUT_DIR is not code to run.
"""

from __future__ import annotations

import ast
import io
import os
import pickle
from pathlib import Path

PREFIX = "nccl_trace_rank_"  # torch appends the global rank: nccl_trace_rank_3
TRACE_ENTRIES = "2000"  # collectives remembered per rank: a few steps of a large FSDP model


def worker_env(device: str, hangs_dir: Path, pipe_dir: Path) -> dict[str, str]:
    """What turns the flight recorder on in the workers, NCCL only (gloo's recorder has no
    timeout dump and no debug pipe). The user's own values of these variables win."""
    if device != "cuda":
        return {}
    prefix = str(hangs_dir / PREFIX)
    wanted = {"TORCH_NCCL_TRACE_BUFFER_SIZE": TRACE_ENTRIES, "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
              "TORCH_FR_DUMP_TEMP_FILE": prefix, "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": prefix,
              "TORCH_NCCL_DEBUG_INFO_PIPE_FILE": str(pipe_dir / "nccl_pipe_")}
    return {k: os.environ.get(k, v) for k, v in wanted.items()}


def collect(hangs_dir: Path, folder: Path, ranks: list[int]) -> None:
    """Move this node's ranks' dumps into the hang's folder, beside their stacks."""
    for r in ranks:
        src = hangs_dir / f"{PREFIX}{r}"
        try:
            src.replace(folder / src.name)
        except OSError:
            pass  # this rank wrote none (yet): the verdict works with the ones there are


class _PlainData(pickle.Unpickler):
    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"{module}.{name}: a flight-recorder dump holds plain data only")


def load(path: Path) -> dict | None:
    try:
        dump = _PlainData(io.BytesIO(path.read_bytes())).load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError):
        return None
    return dump if isinstance(dump, dict) and isinstance(dump.get("entries"), list) else None


def read(folders: list[Path]) -> dict[int, dict]:
    """Every rank's dump found in ``folders`` (the newest hang's, merged across nodes)."""
    dumps = {}
    for folder in folders:
        for path in folder.glob(f"{PREFIX}*"):
            suffix = path.name[len(PREFIX):]
            if suffix.isdigit() and (dump := load(path)) is not None:
                dumps[int(suffix)] = dump
    return dumps


def _op(entry: dict) -> str:
    name = str(entry.get("profiling_name", "?")).split(":", 1)[-1]
    sizes = entry.get("input_sizes")
    return f"{name} {sizes}" if sizes else name


def frontier(dumps: dict[int, dict]) -> dict[str, dict[int, dict]]:
    """Per process group, per rank: its last enqueued collective (sequence number and entry) and
    the last one it saw complete. Point-to-point operations count separately and are left out."""
    groups: dict[str, dict[int, dict]] = {}
    for rank, dump in dumps.items():
        status = dump.get("pg_status") or {}
        for e in dump["entries"]:
            if e.get("is_p2p") or not isinstance(e.get("collective_seq_id"), int):
                continue
            pg = e.get("process_group") or (str(e.get("pg_id", "?")), "")
            name = str(pg[0])
            mine = groups.setdefault(name, {}).setdefault(rank, {"enqueued": 0, "entry": None, "completed": None})
            if e["collective_seq_id"] >= mine["enqueued"]:
                mine["enqueued"], mine["entry"] = e["collective_seq_id"], e
            if e.get("state") == "completed":
                mine["completed"] = max(mine["completed"] or 0, e["collective_seq_id"])
            done = (status.get(name) or status.get(str(e.get("pg_id"))) or {}).get("last_completed_collective")
            if isinstance(done, int) and done >= 0:
                mine["completed"] = max(mine["completed"] or 0, done)
    return groups


def _members(dumps: dict[int, dict], name: str, seen: set[int]) -> list[int]:
    """The group's ranks from a dump's pg_config ("[0, 1, 2]"), else the ranks that recorded it."""
    for dump in dumps.values():
        ranks = ((dump.get("pg_config") or {}).get(name) or {}).get("ranks")
        try:
            found = ast.literal_eval(ranks) if isinstance(ranks, str) else ranks
        except (ValueError, SyntaxError):
            found = None
        if isinstance(found, list) and found:
            return sorted(int(r) for r in found)
    return sorted(seen)


def _ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))


def verdict(dumps: dict[int, dict]) -> list[str]:
    """One line per process group that explains a hang; empty when the dumps show none."""
    lines = []
    for name, ranks in sorted(frontier(dumps).items()):
        group = "the default group" if name in ("0", "default_pg") else f"process group {name}"
        members = _members(dumps, name, set(ranks))
        missing = [r for r in members if r not in ranks and r in dumps]  # dumped, but never joined this group
        last = {r: ranks[r]["enqueued"] for r in ranks}
        ahead = max(last.values())
        behind = sorted([r for r, n in last.items() if n < ahead] + missing)
        lead = next(ranks[r]["entry"] for r in sorted(ranks) if last[r] == ahead)
        if behind:
            was = "; ".join(f"rank {r}'s last was #{last[r]} ({_op(ranks[r]['entry'])})" for r in behind if r in ranks)
            lines.append(f"{_ranks(behind)} never entered collective #{ahead} of {group} ({_op(lead)}) that "
                         f"{_ranks(sorted(r for r in last if last[r] == ahead))} entered" + (f"; {was}" if was else ""))
            continue
        stuck = [r for r in sorted(ranks) if ranks[r]["completed"] is not None and ranks[r]["completed"] < ahead]
        silent = [r for r in members if r not in dumps]  # a stopped rank cannot answer the dump request
        if stuck and silent:
            lines.append(f"{_ranks(silent)} of {group} left no flight-recorder dump while {_ranks(stuck)} wait(s) "
                         f"in collective #{ahead} ({_op(lead)}): {_ranks(silent)} is the likely one holding them up "
                         "(stopped or dead; its stacks say which)")
        elif stuck:
            lines.append(f"every rank of {group} entered collective #{ahead} ({_op(lead)}) and {_ranks(stuck)} never "
                         "saw it complete: a rank outside these dumps, or the network, holds it up")
    return lines


def table(dumps: dict[int, dict]) -> list[str]:
    rows = [f"{'rank':>4} {'group':<12} {'last enqueued':>13} {'completed':>9}  collective"]
    for name, ranks in sorted(frontier(dumps).items()):
        for r, f in sorted(ranks.items()):
            done = "-" if f["completed"] is None else str(f["completed"])
            rows.append(f"{r:>4} {name[:12]:<12} {f['enqueued']:>13} {done:>9}  {_op(f['entry'])}")
    return rows
