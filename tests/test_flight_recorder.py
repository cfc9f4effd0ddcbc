"""Hang verdicts on NCCL read its flight recorder (issue 25, item 9).

On NCCL a collective returns when it is enqueued, so the healthy ranks of a hang wait in
`synchronize` or `.item()` and their stacks name no collective; the flight recorder's sequence
numbers name the rank that never entered the collective the others did. The dumps here are real
(torch's recorder under gloo, tests/helpers/flight.py), in the format NCCL's timeout dump writes.
The supervisor turns the recorder on for NCCL workers only.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
import time

import pytest
from helpers import REPO, record_flight_dumps

from train.launcher import flight_recorder
from train.launcher.hang import STACKS


@pytest.fixture(scope="module")
def hang_dir(tmp_path_factory):
    """OUTPUT_DIR with one hang: three ranks' headers (their stacks, as on NCCL, in no collective)
    and their flight-recorder dumps, where rank 1 never entered the fourth all_reduce."""
    out = tmp_path_factory.mktemp("out")
    folder = out / "hangs" / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    record_flight_dumps(folder, world=3, stuck=1)
    for r in range(3):
        header = {"rank": r, "local_rank": r, "node": 0, "host": "node0", "pid": 1000 + r, "process_state": "S",
                  "attempt": 0, "last_step": 7, "phase": "forward" if r == 1 else "optimizer"}
        (folder / f"node0-rank{r}.txt").write_text("".join(f"{k}: {v}\n" for k, v in header.items()) + STACKS + "\n")
    return out


@pytest.mark.slow  # three gloo processes
def test_the_verdict_names_the_rank_that_never_entered_the_collective(hang_dir):
    p = subprocess.run([sys.executable, "-m", "train", "hang-report", str(hang_dir)], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    verdict = p.stdout[p.stdout.index("verdict"):]
    assert verdict.startswith("verdict (flight recorder): rank 1 never entered collective #4 of the default group "
                              "(all_reduce [[1024]]) that ranks 0, 2 entered; rank 1's last was #3 (all_reduce [[4]])"), p.stdout
    assert "stacks: no rank is in a collective" in verdict  # what the stacks alone would have said


@pytest.mark.slow
def test_a_dump_that_holds_anything_but_plain_data_is_not_unpickled(hang_dir, tmp_path):
    """A file in a shared OUTPUT_DIR is not code to run: an object would need a class to build."""
    evil = tmp_path / f"{flight_recorder.PREFIX}0"
    evil.write_bytes(pickle.dumps({"entries": [], "x": time.struct_time((0,) * 9)}))
    assert flight_recorder.load(evil) is None
    (real,) = (hang_dir / "hangs").glob(f"*/{flight_recorder.PREFIX}0")
    assert flight_recorder.load(real)["entries"]


def test_the_recorder_is_on_for_nccl_workers_and_off_for_gloo(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCH_NCCL_TRACE_BUFFER_SIZE", raising=False)
    assert flight_recorder.worker_env("cpu", tmp_path / "hangs", tmp_path) == {}
    env = flight_recorder.worker_env("cuda", tmp_path / "hangs", tmp_path)
    assert env["TORCH_NCCL_TRACE_BUFFER_SIZE"] == flight_recorder.TRACE_ENTRIES
    assert env["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
    assert env["TORCH_FR_DUMP_TEMP_FILE"] == str(tmp_path / "hangs" / "nccl_trace_rank_")
    monkeypatch.setenv("TORCH_NCCL_TRACE_BUFFER_SIZE", "50")  # the user's own value wins
    assert flight_recorder.worker_env("cuda", tmp_path / "hangs", tmp_path)["TORCH_NCCL_TRACE_BUFFER_SIZE"] == "50"


@pytest.mark.slow
def test_a_member_that_left_no_dump_is_named_when_the_others_wait(hang_dir, tmp_path):
    """A stopped rank cannot answer the dump request: only the others' dumps exist."""
    dumps = flight_recorder.read(sorted((hang_dir / "hangs").glob("*")))
    del dumps[1]
    dumps[0]["pg_config"] = {"0": {"ranks": "[0, 1, 2]"}}  # NCCL's dumps name the group's members
    for r in (0, 2):  # both entered #4 and saw #3 complete
        dumps[r]["pg_status"] = {"0": {"last_completed_collective": 3}}
    (line,) = flight_recorder.verdict(dumps)
    assert line.startswith("rank 1 of the default group left no flight-recorder dump while ranks 0, 2"), line
