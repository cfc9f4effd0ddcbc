"""Slurm (issue 28): slurm/train.sbatch, submitted with sbatch to a real slurmctld with two slurmd
("nodes" n1 and n2 on this host, started by the module's fixture and stopped after it).

Jobs are submitted as a user would (`NAME=value sbatch slurm/train.sbatch [key=value ...]`); only
the output file and, for the two-node job, `--nodes=2` are given on sbatch's command line. The
jobs that need nothing from the test while they run (or only a signal, sent by a thread) are
submitted together when the module starts and share the cluster (Slurm runs them side by side),
so the module's time is about its longest job's. Under CI=true a host where the daemons cannot run FAILS this module (.ci/run
installs slurm-wlm and munge as root).
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import REPO, SLURM_SCRIPT, TINY, SlurmCluster, losses, read_metrics, slurm_unavailable
from train.config import exitcodes
from train.launcher.slurm import master_port

# PYTHON: the script's interpreter (it defaults to the clone's .venv); the test's own here.
RUN = {**TINY, "MAX_STEPS": 8, "CHECKPOINT_EVERY": 0, "PYTHON": sys.executable}


@dataclass
class Job:
    id: str
    out: Path  # its OUTPUT_DIR
    log: Path  # its Slurm output file

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = slurm_unavailable()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}. CI must run the Slurm tests")
        pytest.skip(reason)
    c = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield c
    c.stop()


def submit(cluster, root: Path, name: str, *sbatch_args: str, train_args: tuple[str, ...] = (), **settings) -> Job:
    """`OUTPUT_DIR=... NAME=value sbatch slurm/train.sbatch [key=value ...]`."""
    job = Job("", root / name, root / f"{name}.out")
    job.id = cluster.sbatch({**RUN, "OUTPUT_DIR": job.out, **settings}, job.log, *sbatch_args, train_args=train_args)
    return job


@pytest.fixture(scope="module")
def submitted(cluster, tmp_path_factory) -> dict[str, Job]:
    """Every job that runs to its end without the test's help, submitted at once."""
    root = tmp_path_factory.mktemp("jobs")
    return {
        # One node, two processes, 8 steps: the curve the other jobs are held to.
        "reference": submit(cluster, root, "reference"),
        "two-nodes": submit(cluster, root, "two-nodes", "--nodes=2", NPROC=1, **{"checkpoint.export": "false"}),
        "bad-setting": submit(cluster, root, "bad-setting", STRATEGY="zero9"),
        "preflight": submit(cluster, root, "preflight", train_args=("preflight.disk_checkpoints=1000000000",)),
        # Stopped (by a thread) as soon as its launcher runs: long before the first checkpoint.
        "early-stop": signal_once_started(cluster, submit(cluster, root, "early-stop", MAX_REQUEUES=0)),
    }


def signal_once_started(cluster, job: Job) -> Job:
    """USR1 to the batch shell as soon as the launcher's "[launch]" line is in the job's output."""
    def watch():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and "[launch]" not in job.text():
            time.sleep(0.1)
        cluster.cmd("scancel", "--batch", "--signal=USR1", job.id, check=False)

    threading.Thread(target=watch, daemon=True).start()
    return job


def finished(cluster, job: Job) -> dict:
    return cluster.wait_job(job.id, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"))


def wait_for(cluster, job: Job, predicate, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if cluster.job(job.id)["JobState"] not in ("PENDING", "RUNNING", "CONFIGURING"):
            break
        time.sleep(0.1)
    raise AssertionError(f"{what}: not seen; job {cluster.job(job.id)}\n{job.text()[-4000:]}")


def state(info: dict) -> tuple[str, str, str]:
    return info["JobState"], info["ExitCode"], info["Restarts"]


@pytest.mark.slow
def test_a_signal_mid_run_stops_saves_requeues_and_resumes_bitwise(cluster, submitted, tmp_path):
    """`scancel --batch --signal=USR1` is what `#SBATCH --signal=B:USR1@90` sends before the time
    limit. (First in the module: it needs the test while it runs.)"""
    job = submit(cluster, tmp_path, "run", TRAIN_FAILPOINTS="step_sleep=0.5")  # room to signal mid-run
    wait_for(cluster, job, lambda: any(r["step"] >= 3 for r in read_metrics(job.out)), "step 3")
    cluster.cmd("scancel", "--batch", "--signal=USR1", job.id)
    info = finished(cluster, job)  # a requeued job is PENDING in between, never in a final state
    text = job.text()
    assert state(info) == ("COMPLETED", "0:0", "1"), text[-6000:]
    saved = int(re.search(r"stop signal received: saved step (\d+)", text).group(1))
    assert 3 <= saved < 8
    assert f"[slurm] exit {exitcodes.PREEMPTED}: retryable; requeueing" in text
    assert f"[slurm] job {job.id} attempt 2" in text
    assert re.search(rf"resumed from \S+ at step {saved}\b", text), text[-6000:]
    ref = submitted["reference"]
    finished(cluster, ref)
    assert losses(job.out) == losses(ref.out)  # bitwise: fp32 on CPU, the same data cursor across the requeue
    assert [r["sample_hash"] for r in read_metrics(job.out)] == [r["sample_hash"] for r in read_metrics(ref.out)]


@pytest.mark.slow
def test_a_stop_before_the_first_checkpoint_is_said_in_one_line(cluster, submitted):
    job = submitted["early-stop"]
    info = finished(cluster, job)
    text = job.text()
    assert info["ExitCode"] == f"{exitcodes.PREEMPTED}:0", text[-4000:]
    lines = [ln for ln in text.splitlines() if "before the first checkpoint was saved" in ln]
    assert len(lines) == 1 and "sbatch --time" in lines[0], text[-4000:]
    assert "(MAX_REQUEUES=0): not requeued again" in text


@pytest.mark.slow
def test_a_job_through_sbatch_trains_and_exports(cluster, submitted):
    job = submitted["reference"]
    info = finished(cluster, job)
    text = job.text()
    assert state(info) == ("COMPLETED", "0:0", "0"), text[-4000:]
    assert re.search(r"\[launch\] ddp: node 0/1 \(slurm\), 2 process\(es\) per node, world size 2", text), text
    assert [r["step"] for r in read_metrics(job.out)] == list(range(1, 9))
    final = job.out / "final"
    assert (final / "model.safetensors").stat().st_size > 0 and (final / "config.json").exists()
    assert text.rstrip().endswith("[slurm] finished")


@pytest.mark.slow
def test_two_nodes_equal_the_one_node_curve(cluster, submitted):
    """`sbatch --nodes=2`: two slurmd on this host, one task each, one process per node; the
    master is n1's NodeAddr, 127.0.0.1 (the name n1 does not resolve here)."""
    job, ref = submitted["two-nodes"], submitted["reference"]
    info = finished(cluster, job)
    text = job.text()
    assert (*state(info), info["NodeList"]) == ("COMPLETED", "0:0", "0", "n[1-2]"), text[-6000:]
    for rank in (0, 1):
        assert f"node {rank}/2 (slurm), 1 process(es) per node, world size 2" in text, text[-6000:]
    assert f"master 127.0.0.1:{master_port(job.id)}" in text
    finished(cluster, ref)
    assert losses(job.out) == pytest.approx(losses(ref.out), abs=1e-5, rel=0)


@pytest.mark.slow
@pytest.mark.parametrize("name, code, says", [
    ("bad-setting", exitcodes.CONFIG, "error: unknown strategy 'zero9'; allowed: ddp"),
    ("preflight", exitcodes.PREFLIGHT, "preflight failed: node 0"),
])
def test_a_final_failure_ends_the_job_once_without_a_requeue(cluster, submitted, name, code, says):
    """Bad input (exit 2) and a failed preflight (exit 3, the node named) are final in
    train/config/exitcodes.py: a requeue would fail the same way."""
    job = submitted[name]
    info = finished(cluster, job)
    text = job.text()
    assert state(info) == ("FAILED", f"{code}:0", "0"), text[-4000:]
    assert says in text and "Traceback" not in text, text[-4000:]
    assert f"[slurm] exit {code}: a retry cannot help (train/config/exitcodes.py); not requeued" in text
    assert not (job.out / "checkpoints").exists()
    if code == exitcodes.CONFIG:  # one line naming the value, before any process group
        errors = [ln for ln in text.splitlines() if ln.startswith("error: ")]
        assert len(errors) == 1 and "zero9" in errors[0], text
        assert "[launch]" not in text and not job.out.exists()  # nothing started, OUTPUT_DIR untouched


def test_the_script_requeues_exactly_the_retryable_codes():
    """The script's list of final codes is train/config/exitcodes.py's (the table cannot drift from it)."""
    text = SLURM_SCRIPT.read_text()
    listed = re.search(r'^FINAL_CODES=" ([\d ]+) "$', text, re.M).group(1).split()
    assert sorted(map(int, listed)) == sorted(exitcodes.FINAL_CODES)
    assert "#SBATCH --signal=B:USR1@" in text and "#SBATCH --requeue" in text
    assert "srun --ntasks-per-node=1" in text and "-m train launch" in text
    assert "slurm/train.sbatch" in (REPO / "docs" / "slurm.md").read_text()
