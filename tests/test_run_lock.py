"""One gang owns an OUTPUT_DIR; rank 0 chooses the checkpoint for everyone (train/checkpoint/saver.py).

Real processes and real gloo groups: two overlapping training gangs on one directory (a
resubmitted Kubernetes Job whose old pods are still terminating), and two ranks that see
different listings of one checkpoint directory (NFS caching right after a rename).
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import LAUNCH_TIMEOUT, REPO, args_for, free_port, job_env, kill_tree

from train.checkpoint.layout import GENERATION_FILE, MANIFEST, complete_checkpoints, find_resume
from train.checkpoint.lock import claim_run, current_owner
from train.config import exitcodes, load_config

SETTINGS = {"MODEL": "llama-debug", "SEQ_LEN": "32", "DEVICE": "cpu"}


# -- the generation file ------------------------------------------------------------------------
def test_claiming_a_run_replaces_the_owner_and_a_torn_record_is_nobodys(tmp_path):
    first = claim_run(tmp_path, 2)
    assert current_owner(tmp_path)["generation"] == first
    second = claim_run(tmp_path, 2)
    assert second != first and current_owner(tmp_path)["generation"] == second
    (tmp_path / GENERATION_FILE).write_text('{"generation": "ab')  # caught mid-write by a reader
    assert current_owner(tmp_path) == {}


# -- rank 0 chooses, the others follow ------------------------------------------------------------
_RANK = r"""
import json, sys
import torch.distributed as dist
from train.checkpoint.lock import agree_resume
from train.config import ConfigError, load_config

dist.init_process_group("gloo")
cfg = load_config([f"{k}={v}" for k, v in json.loads(sys.argv[1]).items()], env={}, dotenv_path=None)
try:
    generation, path = agree_resume(cfg, 2, visible_wait_s=float(sys.argv[2]))
    print(json.dumps({"generation": generation, "path": None if path is None else str(path)}), flush=True)
except ConfigError as e:
    print(json.dumps({"error": str(e)}), flush=True)
dist.destroy_process_group()
"""


def _fake_checkpoint(out: Path, step: int) -> None:
    cfg = load_config([f"{k}={v}" for k, v in {**SETTINGS, "OUTPUT_DIR": str(out)}.items()], env={}, dotenv_path=None)
    d = out / "checkpoints" / f"step_{step:08d}"
    d.mkdir(parents=True)
    (d / MANIFEST).write_text(json.dumps({"step": step, "fingerprint": cfg.fingerprint(), "world_size": 2, "files": {}}))


def _agree(views: list[Path], wait_s: float) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for rank, view in enumerate(views):
        env = job_env({"RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "PYTHONPATH": str(REPO)})
        procs.append(subprocess.Popen([sys.executable, "-c", _RANK, json.dumps({**SETTINGS, "OUTPUT_DIR": str(view)}),
                                       str(wait_s)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    return procs


def _answers(procs: list[subprocess.Popen]) -> list[dict]:
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr[-3000:]
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


@pytest.fixture
def stale_views(tmp_path):
    """Node 0 sees step_4 and the just-renamed step_6; node 1's view still lacks step_6."""
    fresh, stale = tmp_path / "node0" / "run", tmp_path / "node1" / "run"
    for step in (2, 4, 6):
        _fake_checkpoint(fresh, step)
    shutil.copytree(fresh, stale)
    shutil.rmtree(stale / "checkpoints" / "step_00000006")
    # What each rank would resume from if it listed the directory itself.
    cfg = lambda out: load_config([f"OUTPUT_DIR={out}", *[f"{k}={v}" for k, v in SETTINGS.items()]],  # noqa: E731
                                  env={}, dotenv_path=None)
    assert find_resume(cfg(fresh), 2).name == "step_00000006" and find_resume(cfg(stale), 2).name == "step_00000004"
    return fresh, stale


@pytest.mark.slow  # real ranks in a gloo process group
def test_every_rank_resumes_the_checkpoint_rank_0_chose_once_it_can_see_it(stale_views):
    fresh, stale = stale_views
    procs = _agree([fresh, stale], wait_s=60)
    # The cache catches up a little later: rank 1 must wait for step_6, not fall back to step_4.
    timer = threading.Timer(2.0, shutil.copytree, (fresh / "checkpoints" / "step_00000006",
                                                   stale / "checkpoints" / "step_00000006"))
    timer.start()
    try:
        rank0, rank1 = _answers(procs)
    finally:
        timer.cancel()
    assert "error" not in rank0 and "error" not in rank1, (rank0, rank1)
    assert rank0["path"] == str(fresh / "checkpoints" / "step_00000006")
    assert rank1["path"] == str(stale / "checkpoints" / "step_00000006")
    assert rank0["generation"] == rank1["generation"] == current_owner(fresh)["generation"]


@pytest.mark.slow  # real ranks in a gloo process group
def test_a_rank_that_never_sees_the_chosen_checkpoint_stops_every_rank_with_one_message(stale_views):
    fresh, stale = stale_views
    answers = _answers(_agree([fresh, stale], wait_s=2))
    assert [a.get("error") for a in answers] == [answers[0].get("error")] * 2
    assert re.search(r"rank 0 chose checkpoint step_00000006 but rank\(s\) \[1\] cannot see it after 2 s",
                     answers[0]["error"]), answers


# -- a newer gang supersedes an older one -----------------------------------------------------------
def _gang(out: Path, log: Path, env: dict, **overrides) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "train", *args_for(out, **overrides)]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=job_env(env), stdout=f, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    proc.log_path = log
    return proc


def _wait(pred, proc: subprocess.Popen, what: str, timeout: float = LAUNCH_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert proc.poll() is None, f"exited {proc.returncode} before {what}:\n{proc.log_path.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.2)


@pytest.mark.slow  # real ranks in a gloo process group
def test_an_older_gang_writes_nothing_once_a_newer_gang_took_the_run_over(tmp_path):
    out = tmp_path / "run"
    # Neither gang can finish during the test (MAX_STEPS is not part of a run's identity); each
    # step sleeps, so the old gang is still training when the new one takes over.
    run = dict(MAX_STEPS=100000, CHECKPOINT_EVERY=2, KEEP_CHECKPOINTS=1000, **{"checkpoint.export": "false"})
    old = _gang(out, tmp_path / "old.log", {"TRAIN_FAILPOINTS": "step_sleep=1.0"}, **run)
    new = None
    try:
        _wait(lambda: complete_checkpoints(out / "checkpoints"), old, "first checkpoint of the old gang")
        old_generation = current_owner(out)["generation"]
        new = _gang(out, tmp_path / "new.log", {"TRAIN_FAILPOINTS": "step_sleep=0.2"}, **run)
        _wait(lambda: current_owner(out).get("generation") not in (None, old_generation), new, "takeover")
        new_generation = current_owner(out)["generation"]
        old.wait(timeout=120)  # its next save sees the takeover
        print(f"old gang exited {old.returncode} after the takeover")
        old_log = old.log_path.read_text()
        assert "superseded: OUTPUT_DIR" in old_log and f"generation {new_generation[:8]}" in old_log, old_log[-3000:]
        # The launcher passes the workers' code on; a launcher that reports torchrun's failure
        # summary instead still names exit 8 as the workers' code.
        assert old.returncode == exitcodes.SUPERSEDED, old_log[-3000:]  # final: the supervisor does not restart it
        resumed_at = int(re.search(r"at step (\d+)", new.log_path.read_text()).group(1))
        ours = lambda: [c for c in complete_checkpoints(out / "checkpoints")  # noqa: E731
                        if int(c.name.split("_")[1]) > resumed_at + 2]
        _wait(ours, new, "a checkpoint of the new gang")
        assert new.poll() is None, "the new gang keeps training"
        new.send_signal(signal.SIGTERM)  # stop it the clean way: it saves and exits
        new.wait(timeout=120)
    finally:
        for p in (old, new):
            if p is not None:
                kill_tree(p)
    for ckpt in complete_checkpoints(out / "checkpoints"):
        step, generation = (json.loads((ckpt / MANIFEST).read_text())[k] for k in ("step", "generation"))
        if step > resumed_at:
            assert generation == new_generation, f"{ckpt.name} was renamed by the superseded gang"
    assert not list((out / "checkpoints").glob(".tmp-*")), "a half-written checkpoint was left behind"

@pytest.mark.slow  # real ranks in a gloo process group
def test_an_output_dir_the_run_cannot_write_is_one_config_error_on_every_rank(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")  # OUTPUT_DIR below a file: mkdir fails, as on a volume uid 1000 may not write
    answers = _answers(_agree([blocker / "run", blocker / "run"], wait_s=2))
    assert answers[0] == answers[1] and answers[0]["error"].startswith(
        f"cannot write generation.json in OUTPUT_DIR '{blocker / 'run'}'"), answers
