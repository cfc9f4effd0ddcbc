"""Preflight (train/launcher/preflight/): every launch finds the bad node, link or volume before
training starts, and names it.

Real processes throughout: machines are network namespaces on a bridge (tests/helpers/), a
slow link is a token bucket on one machine's cable, a small /dev/shm or a nearly full volume is
a tmpfs in a mount namespace. Most runs use `launch.preflight=only` (or `doctor`), which start no
training. Needs root (CI runs as root); skipped elsewhere with the reason.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, TINY, have_namespaces, in_mount_namespace, job_env, start_s3, try_network

from train.config import exitcodes
from train.launcher.preflight import FAIL, OK, link_checks

slow = pytest.mark.slow  # real processes (no training, except the `off` run)
PREFLIGHT_TIMEOUT = 240  # per node: the launcher's imports take seconds on a loaded 2-core machine
NODE_SETTINGS = {**TINY, "NPROC": "1", "MAX_STEPS": "1", "CHECKPOINT_EVERY": "0", "checkpoint.export": "false",
                 "launch.master_wait_s": "60", "DIST_TIMEOUT": "60", "preflight.bandwidth_budget_s": "0.5"}


def _args(settings: dict) -> list[str]:
    return [f"{k}={v}" for k, v in settings.items()]


def _run(cmd: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=job_env(env), capture_output=True, text=True, timeout=PREFLIGHT_TIMEOUT)


@pytest.fixture
def machines(request):
    """`request.param` machines, each a network namespace on one bridge with its own hostname."""
    if reason := have_namespaces():
        pytest.skip(reason)
    n = getattr(request, "param", 2)
    net = try_network(n, [f"node{i}.preflight" for i in range(n)])
    if net is None:
        pytest.skip("network namespaces could not be built here")
    for i in range(n):
        net.publish(i)
    yield net
    net.down()


def _start_nodes(net, outs: list, tmp: Path, envs: list[dict] | None = None, **extra) -> list[subprocess.Popen]:
    """`python -m train` on every machine with the job's node contract (NNODES/NODE_RANK/MASTER_ADDR)
    and its own environment (``envs[i]``: a node's credentials)."""
    procs = []
    for i, out in enumerate(outs):
        settings = {**NODE_SETTINGS, "NNODES": str(len(outs)), "NODE_RANK": str(i), "MASTER_ADDR": net.names[0],
                    "MASTER_PORT": "29500", "OUTPUT_DIR": str(out), **extra}
        log = open(tmp / f"node{i}.log", "w")
        procs.append(subprocess.Popen(net.wrap(i, [sys.executable, "-m", "train", *_args(settings)]), cwd=REPO,
                                      env=job_env({"GLOO_SOCKET_IFNAME": "eth0", **(envs[i] if envs else {})}),
                                      stdout=log,
                                      stderr=subprocess.STDOUT, text=True))
        procs[-1].log_path = tmp / f"node{i}.log"
    return procs


def _finish(procs: list[subprocess.Popen]) -> tuple[list[int], list[str]]:
    try:
        codes = [p.wait(timeout=PREFLIGHT_TIMEOUT) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return codes, [p.log_path.read_text() for p in procs]


# -- across machines -------------------------------------------------------------------------
@slow
def test_healthy_two_nodes_pass_write_the_json_and_only_exits_after_the_table(machines, tmp_path):
    out = tmp_path / "out"
    codes, logs = _finish(_start_nodes(machines, [out, out], tmp_path, PREFLIGHT="only"))
    assert codes == [0, 0], "\n".join(logs)
    assert "passed" in logs[0] and "verdict" in logs[0], logs[0]  # the table, on node 0
    assert "table is on node 0" in logs[1], logs[1]
    for log in logs:  # `only`: no training started
        assert "not starting training" in log and "[launch]" not in log, log
    assert not (out / "metrics.jsonl").exists()

    report = json.loads((out / "preflight.json").read_text())
    assert report["passed"] and report["nnodes"] == 2 and report["backend"] == "gloo"
    rows = report["checks"]
    assert all({"node", "host", "value", "threshold", "verdict"} <= set(r) for r in rows)
    assert {(r["node"], r["host"]) for r in rows if r["check"] == "shared-storage"} == {(0, "node0"), (1, "node1")}
    assert {r["node"] for r in rows if r["check"] == "shm"} == {0, 1}
    assert report["allreduce"] and all(r["busbw_GBps"] > 0 and r["algbw_GBps"] > 0 for r in report["allreduce"])
    assert {(p["src"], p["dst"]) for p in report["pairs"]} == {(0, 1), (1, 0)}
    assert not list(out.glob(".preflight-*")), "the shared-storage nonce files must be cleaned up"
    print(f"preflight on 2 nodes took {report['elapsed_s']:.2f} s (added start-up, imports excluded)")


@slow
def test_each_node_with_its_own_output_dir_fails_naming_node_1(machines, tmp_path):
    codes, logs = _finish(_start_nodes(machines, [tmp_path / "a", tmp_path / "b"], tmp_path, PREFLIGHT="only"))
    assert codes == [exitcodes.PREFLIGHT] * 2, "\n".join(logs)
    for log in logs:  # every node names the same culprit, so any pod's log says it
        assert "OUTPUT_DIR is not shared: node 1 (host node1) sees a different directory" in log, log
        assert "ReadWriteMany" in log, log
    report = json.loads((tmp_path / "a" / "preflight.json").read_text())
    assert [(r["node"], r["verdict"]) for r in report["checks"] if r["check"] == "shared-storage"] == [(0, OK), (1, FAIL)]


@slow
def test_a_node_that_cannot_write_the_bucket_is_named_before_training(machines, tmp_path):
    """OUTPUT_DIR in a bucket, no shared volume: node 0 has write credentials, node 1 a read-only
    role. Both nodes' preflight names node 1 and the credentials; no object is left there."""
    s3 = start_s3(tmp_path / "s3.log", host=machines.host_address())
    try:
        bucket = s3.bucket("runs")
        out = f"s3://{bucket}/job"
        codes, logs = _finish(_start_nodes(machines, [out, out], tmp_path, envs=[s3.env(), s3.env(s3.reader)],
                                           **{"checkpoint.scratch_dir": str(tmp_path / "scratch")}))
        assert codes == [exitcodes.PREFLIGHT] * 2, "\n".join(logs)
        for log in logs:
            assert re.search(r"node 1 \(host node1\): object-storage: OUTPUT_DIR='s3://runs/job': cannot write objects "
                             r"there \(access denied", log), log
            assert "node 0 (host node0): object-storage" not in log and "credentials and endpoint" in log, log
            assert "[launch]" not in log, log
            assert s3.reader["AWS_SECRET_ACCESS_KEY"] not in log and s3.admin["AWS_SECRET_ACCESS_KEY"] not in log
        assert s3.keys(bucket) == {}, s3.keys(bucket)
    finally:
        s3.stop()


@slow
@pytest.mark.parametrize("machines", [3], indirect=True)
def test_a_rate_limited_link_is_named_by_the_pairwise_test(machines, tmp_path):
    machines.limit_rate(2, "8mbit")  # everything sent to node 2 crawls at 1 MB/s
    out = tmp_path / "out"
    codes, logs = _finish(_start_nodes(machines, [out] * 3, tmp_path, PREFLIGHT="only"))
    assert codes == [exitcodes.PREFLIGHT] * 3, "\n".join(logs)
    failed = [line for line in logs[0].splitlines() if line.startswith("preflight failed:")]
    assert len(failed) == 1 and failed[0].startswith("preflight failed: node 2 (host node2): link:"), logs[0]
    assert "of the median node" in failed[0] and "fix:" in failed[0]
    report = json.loads((out / "preflight.json").read_text())
    links = {r["node"]: r["verdict"] for r in report["checks"] if r["check"] == "link"}
    assert links == {0: OK, 1: OK, 2: FAIL}, report["checks"]


# -- on one machine --------------------------------------------------------------------------
def _needs_namespaces() -> None:
    if reason := have_namespaces():
        pytest.skip(reason)


@slow
def test_a_small_dev_shm_fails_naming_size_and_fix(tmp_path):
    _needs_namespaces()
    make = ["make", "--no-print-directory", "doctor", "DEVICE=cpu", "NPROC=2", f"OUTPUT_DIR={tmp_path / 'out'}",
            "MODEL=llama-debug"]
    p = _run(in_mount_namespace([("16m", "/dev/shm")], make))
    # make exits 2 itself and names the recipe's exit code
    assert p.returncode != 0 and f"Error {exitcodes.PREFLIGHT}" in p.stderr, p.stdout + p.stderr
    line = next(x for x in p.stderr.splitlines() if x.startswith("preflight failed:"))
    assert re.search(r"node 0 \(host \S+\): shm: /dev/shm 16 MiB free of 16 MiB vs >= 64 MiB free", line), line
    assert "--shm-size" in line and "emptyDir" in line, line


@slow
def test_a_nearly_full_output_dir_fails_before_training_naming_free_and_needed_bytes(tmp_path):
    _needs_namespaces()
    out = tmp_path / "out"
    out.mkdir()
    settings = {**NODE_SETTINGS, "OUTPUT_DIR": str(out), "MASTER_PORT": "29500"}  # PREFLIGHT: auto, the default
    fill = f"head -c 3M /dev/zero > {out}/other-run.bin"
    cmd = in_mount_namespace([("4m", str(out))], ["sh", "-c", fill + ' && exec "$@"', "sh",
                                                  sys.executable, "-m", "train", *_args(settings)])
    p = _run(cmd)
    assert p.returncode == exitcodes.PREFLIGHT, p.stdout + p.stderr
    assert "[launch]" not in p.stdout, "training must not start"
    line = next(x for x in p.stderr.splitlines() if x.startswith("preflight failed:"))
    m = re.search(r"disk: .* = (\d+) bytes free vs >= .* = (\d+) bytes \(2 checkpoints x ", line)
    assert m and int(m.group(1)) < int(m.group(2)), line
    assert "OUTPUT_DIR" in line, line


@slow
def test_preflight_off_skips_every_check(tmp_path):
    """A /dev/shm that fails the check above does not stop a run with PREFLIGHT=off (gloo on CPU
    does not need it): nothing was checked, nothing written, and training ran."""
    _needs_namespaces()
    out = tmp_path / "out"
    settings = {**NODE_SETTINGS, "OUTPUT_DIR": str(out), "MASTER_PORT": "29500", "PREFLIGHT": "off"}
    p = _run(in_mount_namespace([("16m", "/dev/shm")], [sys.executable, "-m", "train", *_args(settings)]))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "[preflight] off" in p.stdout and "shm" not in p.stderr
    assert not (out / "preflight.json").exists()
    assert (out / "metrics.jsonl").exists()


# -- naming the culprit (the analysis alone, on measured-looking numbers) --------------------
def _edges(bw: dict[tuple[int, int], float]) -> list[dict]:
    return [{"src": a, "dst": b, "bytes": 2**20, "time_s": 2**20 / v} for (a, b), v in bw.items()]


HOSTS = {i: f"h{i}" for i in range(4)}


def test_a_node_whose_every_link_is_slow_is_named_not_its_links():
    fast, slow = 1e9, 1e6
    bw = {(a, b): (slow if 2 in (a, b) else fast) for a in range(3) for b in range(3) if a != b}
    checks = link_checks(_edges(bw), 3, HOSTS, 0.5, 0.0)
    assert [(c.check, c.node) for c in checks if c.verdict == FAIL] == [("link", 2)]


def test_one_slow_link_between_healthy_nodes_is_named_as_the_link():
    fast, slow = 1e9, 1e6
    bw = {(a, b): (slow if {a, b} == {1, 3} else fast) for a in range(4) for b in range(4) if a != b}
    failed = [c for c in link_checks(_edges(bw), 4, HOSTS, 0.5, 0.0) if c.verdict == FAIL]
    assert [(c.check, c.node, c.host) for c in failed] == [("link to node 1", 3, "h3")]
    assert "between node 1 (host h1) and node 3" in failed[0].value


def test_two_nodes_have_nothing_to_compare_but_an_absolute_floor_fails_a_slow_link():
    bw = {(0, 1): 1e6, (1, 0): 2e9}
    assert [c.verdict for c in link_checks(_edges(bw), 2, HOSTS, 0.5, 0.0)] == [OK]
    failed = link_checks(_edges(bw), 2, HOSTS, 0.5, 0.5)
    assert [(c.verdict, c.node, c.measured) for c in failed] == [(FAIL, 1, pytest.approx(1e6))]
