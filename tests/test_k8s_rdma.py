"""The rdma component (k8s/components/rdma): what NCCL needs to use InfiniBand/RoCE in a pod.

Rendered through overlays/zero2-rdma, which every test in test_k8s_manifests.py also renders,
validates against the Kubernetes schemas and holds to the same policies (non-root, Guaranteed
resources, names). Here: the parts that decide whether NCCL uses the fabric or TCP sockets.
"""

from __future__ import annotations

from test_k8s_manifests import one, pod_env, render, trainer_container

OVERLAY = "zero2-rdma"


def test_rdma_pods_request_the_device_and_only_ipc_lock_back():
    c = trainer_container(one(render(OVERLAY), "Job"))
    res = c["resources"]
    assert res["limits"]["rdma/ib"] == res["requests"]["rdma/ib"] == 1
    caps = c["securityContext"]["capabilities"]
    assert caps == {"drop": ["ALL"], "add": ["IPC_LOCK"]}


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
