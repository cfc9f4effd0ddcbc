"""A real Slurm on this host for test_slurm.py: one slurmctld, two slurmd and a munged of their
own, configured in a temporary directory (SLURM_CONF), started and stopped by the tests."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil

from helpers.jobs import LAUNCH_TIMEOUT, REPO, free_port, job_env

SLURM_SCRIPT = REPO / "slurm" / "train.sbatch"
SLURM_BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel", "sinfo")


def slurm_unavailable() -> str | None:
    """None if this process can run Slurm's daemons here, else why not (a skip reason)."""
    if os.geteuid() != 0:
        return "the Slurm and munge daemons are started as root here (CI runs as root)"
    missing = [b for b in SLURM_BINARIES if not shutil.which(b, path=os.environ.get("PATH", "") + ":/usr/sbin")]
    if missing:
        return f"{', '.join(missing)} not found: `apt-get install slurm-wlm munge` (.ci/run does)"
    return None


class SlurmCluster:
    """One slurmctld and two slurmd ("nodes" n1, n2, both at 127.0.0.1 with their own ports) and a
    munged of their own, all configured in ``root`` (SLURM_CONF) and stopped by their pid files.

    Debian's Slurm 22.05 runs several slurmd on one host when each node has its own ``Port`` and
    ``%n`` in its spool/pid/log paths. Two settings differ from a production cluster, for speed
    only: ``cred_expire=5`` (a requeued job waits cred_expire + 1 s before it may start again,
    120 s by default) and a scheduler that looks at the queue every second."""

    NODES = ("n1", "n2")

    def __init__(self, root: Path):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.pids: list[Path] = []

    def env(self, extra: dict | None = None) -> dict:
        return {**job_env(extra), "SLURM_CONF": str(self.conf)}

    def _sbin(self, name: str) -> str:
        return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin")

    def write_conf(self) -> None:
        r = self.root
        ctld, *slurmd = [free_port() for _ in range(1 + len(self.NODES))]
        host = socket.gethostname().split(".")[0]
        lines = [
            "ClusterName=traintest", f"SlurmctldHost={host}(127.0.0.1)", f"SlurmctldPort={ctld}",
            f"SlurmdPort={slurmd[0]}", "AuthType=auth/munge", "CryptoType=crypto/munge",
            f"AuthInfo=socket={r}/munge.sock,cred_expire=5", "SlurmUser=root", "SlurmdUser=root",
            "MpiDefault=none", "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "ReturnToService=2", "JobRequeue=1", "KillWait=30", "MinJobAge=600", "InactiveLimit=0",
            "SchedulerType=sched/backfill", "SchedulerParameters=sched_interval=1,bf_interval=1",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "AccountingStorageType=accounting_storage/none", "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            f"SlurmctldPidFile={r}/slurmctld.pid", f"SlurmctldLogFile={r}/slurmctld.log",
            f"StateSaveLocation={r}/state", f"SlurmdSpoolDir={r}/spool-%n",
            f"SlurmdPidFile={r}/slurmd-%n.pid", f"SlurmdLogFile={r}/slurmd-%n.log",
        ]
        lines += [f"NodeName={n} NodeAddr=127.0.0.1 NodeHostname={host} CPUs=2 Port={p} State=UNKNOWN"
                  for n, p in zip(self.NODES, slurmd)]
        lines.append(f"PartitionName=test Nodes={','.join(self.NODES)} Default=YES MaxTime=INFINITE State=UP "
                     "OverSubscribe=FORCE")
        (r / "state").mkdir(parents=True, exist_ok=True)
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self) -> "SlurmCluster":
        self.write_conf()
        r, env = self.root, self.env()
        # A munge key of its own: nothing of the host's munge is used or touched.
        key = [self._sbin("mungekey"), "--create", f"--keyfile={r}/munge.key"]
        munge = [self._sbin("munged"), "--force", f"--socket={r}/munge.sock", f"--pid-file={r}/munged.pid",
                 f"--log-file={r}/munged.log", f"--seed-file={r}/munge.seed", f"--key-file={r}/munge.key"]
        subprocess.run(key, check=True, capture_output=True, timeout=60)
        steps = [(munge, r / "munged.pid"), ([self._sbin("slurmctld"), "-i"], r / "slurmctld.pid")]
        steps += [([self._sbin("slurmd"), "-N", n], r / f"slurmd-{n}.pid") for n in self.NODES]
        for cmd, pid in steps:
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)  # each daemonizes
            if p.returncode != 0:
                self.stop()
                raise RuntimeError(f"{' '.join(cmd)} failed: {p.stderr[-2000:]}\n{self.logs()}")
            self.pids.append(pid)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            out = self.cmd("sinfo", "--noheader", "--format=%n %t", "--Node", check=False).stdout.split()
            if out.count("idle") == len(self.NODES):
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the Slurm nodes did not become idle: {out}\n{self.logs()}")

    def stop(self) -> None:
        """Cancel what is left, then stop the daemons (slurmd first) by their pid files."""
        subprocess.run(["scancel", "--full", "--partition=test"], env=self.env(), capture_output=True, timeout=60)
        pids = []
        for pid_file in reversed(self.pids):
            try:
                pids.append(int(pid_file.read_text().strip()))
                os.kill(pids[-1], signal.SIGTERM)
            except (OSError, ValueError):
                continue
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(psutil.pid_exists(p) for p in pids):
            time.sleep(0.1)
        self.pids.clear()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.root.glob("*.log")))

    def cmd(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        p = subprocess.run(list(args), env=self.env(), capture_output=True, text=True, timeout=60)
        if check and p.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {p.returncode}: {p.stderr}")
        return p

    def sbatch(self, settings: dict, out: Path, *sbatch_args: str, script: Path = SLURM_SCRIPT,
               train_args: tuple[str, ...] = ()) -> str:
        """Submit ``script`` with ``settings`` in the job's environment (what `NAME=value sbatch`
        does); its output goes to ``out``. Returns the job id."""
        env = self.env({k: str(v) for k, v in settings.items()})
        p = subprocess.run(["sbatch", "--parsable", f"--output={out}", *sbatch_args, str(script), *train_args],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        return p.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, ...)."""
        text = self.cmd("scontrol", "--oneliner", "show", "job", job_id).stdout
        return dict(kv.split("=", 1) for kv in text.split() if "=" in kv)

    def wait_job(self, job_id: str, states: tuple[str, ...] = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"),
                 timeout: float = LAUNCH_TIMEOUT) -> dict[str, str]:
        """Poll until the job is in one of ``states``; its `scontrol show job` then."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info["JobState"] in states:
                return info
            time.sleep(0.5)
        subprocess.run(["scancel", job_id], env=self.env(), capture_output=True, timeout=60)
        raise AssertionError(f"job {job_id} not in {states} after {timeout} s: {info}\n{self.logs()}")
