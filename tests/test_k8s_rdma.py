"""The rdma component (k8s/components/rdma): what NCCL needs to use InfiniBand in a pod.

Rendered through overlays/zero2-rdma, which every test in test_k8s_manifests.py also renders,
validates against the Kubernetes schemas and holds to the same policies (non-root, Guaranteed
resources, names, Pod Security restricted). Here: the parts that decide whether NCCL uses the
fabric or TCP sockets, and the preflight that refuses a node whose memlock would break it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from helpers import REPO, TINY, pod_security_violations

from test_k8s_manifests import one, pod_env, render, trainer_container

OVERLAY = "zero2-rdma"


def test_rdma_pods_request_the_device_and_add_no_capability():
    # IPC_LOCK is refused by Pod Security baseline and restricted, and does nothing for uid 1000:
    # what RDMA needs from the node is an unlimited memlock (checked by the preflight below).
    pod = one(render(OVERLAY), "Job")["spec"]["template"]["spec"]
    c = trainer_container({"spec": {"template": {"spec": pod}}})
    res = c["resources"]
    assert res["limits"]["rdma/ib"] == res["requests"]["rdma/ib"] == 1
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod_security_violations(pod, "restricted") == []


@pytest.mark.skipif(not shutil.which("prlimit"), reason="needs prlimit (util-linux)")
@pytest.mark.parametrize("nccl_net", ["IB", None], ids=["NCCL_NET=IB", "no-NCCL_NET"])
def test_preflight_fails_a_small_memlock_when_nccl_must_use_infiniband(tmp_path, nccl_net):
    """With the rdma component's NCCL_NET=IB, a node whose memlock limit is not unlimited fails
    the preflight (exit 3, one line naming the limit and the runtime fix), before any process
    group; without NCCL_NET=IB and without InfiniBand devices the same limit is fine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NCCL_", "PET_"))}
    env.update(MODEL=TINY["MODEL"], SEQ_LEN=TINY["SEQ_LEN"], OUTPUT_DIR=str(tmp_path / "out"), DEVICE="cpu", NPROC="1",
               NNODES="1", HF_HUB_OFFLINE="1")
    env.pop("CONFIG", None)
    if nccl_net:
        env["NCCL_NET"] = pod_env(one(render(OVERLAY), "Job"), 0)["NCCL_NET"]
        assert env["NCCL_NET"] == nccl_net
    p = subprocess.run(["prlimit", "--memlock=65536:65536", sys.executable, "-m", "train", "doctor"], env=env,
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    out = p.stdout + p.stderr
    if nccl_net:
        assert p.returncode == 3, out
        (line,) = [x for x in out.splitlines() if x.startswith("preflight failed:")]
        assert "memlock: 64 KiB vs unlimited (NCCL_NET=IB)" in line and "LimitMEMLOCK=infinity" in line, line
    else:
        assert p.returncode == 0, out


def test_rdma_pods_use_nccls_ib_transport_without_an_interface_pin():
    job = one(render(OVERLAY), "Job")
    env = pod_env(job, 0)
    assert env["NCCL_NET"] == "IB", "fail at start rather than fall back to sockets silently"
    assert env["NCCL_IB_DISABLE"] == "0"
    assert env["NCCL_SOCKET_IFNAME"].startswith("^"), "exclude lo/docker, pin nothing: NCCL picks its bootstrap interface"
    assert env["NCCL_DEBUG"] == "INFO" and "NET" in env["NCCL_DEBUG_SUBSYS"], "the log says which transport ran"
    names = [e["name"] for e in trainer_container(job)["env"]]
    assert len(names) == len(set(names)), "an env name set twice"


def test_rdma_changes_nothing_else_of_the_zero2_job():
    base, rdma = one(render("zero2"), "Job"), one(render(OVERLAY), "Job")
    env_b, env_r = pod_env(base, 0), pod_env(rdma, 0)
    changed = {k for k in env_b.keys() | env_r.keys() if env_b.get(k) != env_r.get(k)}
    nccl = {"NCCL_SOCKET_IFNAME", "NCCL_IB_DISABLE", "NCCL_NET", "NCCL_DEBUG", "NCCL_DEBUG_SUBSYS"}
    follows_the_job_name = {"JOB_NAME", "MASTER_ADDR", "OUTPUT_DIR"}
    assert changed - nccl <= follows_the_job_name, f"rdma changed more than NCCL's transport: {sorted(changed)}"
    assert base["spec"]["completions"] == rdma["spec"]["completions"]
