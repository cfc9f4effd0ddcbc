"""Does one pod of the rendered Job fit on a node of this cluster? Run by `make k8s-apply` before it
applies anything, so a shape the cluster cannot hold is one line, not pods Pending forever.

    python k8s/node_fit.py RENDERED.yaml NODES.json     # NODES.json: `kubectl get nodes -o json`

Candidates are the nodes the pod may land on: labels matching its nodeSelector, every
NoSchedule/NoExecute taint tolerated. Exit 2 with one line when candidates exist and none has the
allocatable cpu, memory and extended resources (GPUs, RDMA) one pod requests. No candidate at all
is only a note (exit 0): an autoscaled pool at zero nodes is invisible here.
"""

from __future__ import annotations

import json
import sys

import yaml

_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "k": 1e3, "M": 1e6, "G": 1e9,
          "T": 1e12, "m": 1e-3}


def quantity(q) -> float:
    s = str(q)
    for unit, factor in _UNITS.items():
        if s.endswith(unit) and s[: -len(unit)].replace(".", "", 1).isdigit():
            return float(s[: -len(unit)]) * factor
    return float(s)


def tolerated(taint: dict, tolerations: list[dict]) -> bool:
    """Kubernetes' toleration matching (k8s.io/api/core/v1 toleration.go, ToleratesTaint)."""
    for t in tolerations:
        if t.get("effect") and t["effect"] != taint.get("effect"):
            continue
        if t.get("operator", "Equal") == "Exists":
            if not t.get("key") or t["key"] == taint["key"]:
                return True
        elif t.get("key") == taint["key"] and t.get("value", "") == taint.get("value", ""):
            return True
    return False


def _pod_of(objs: list[dict]) -> tuple[str, dict]:
    for o in objs:
        if o.get("kind") == "Job":
            return o["metadata"]["name"], o["spec"]["template"]["spec"]
    raise SystemExit("error: no Job in the rendered manifests")


def _show(res: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(res.items()))


def check(objs: list[dict], nodes: list[dict]) -> tuple[int, str]:
    job, pod = _pod_of(objs)
    want: dict[str, str] = {}
    for c in pod["containers"]:
        for k, v in c.get("resources", {}).get("requests", {}).items():
            want[k] = str(v)  # one container per pod here; several would add up
    selector = pod.get("nodeSelector", {})
    tolerations = pod.get("tolerations", [])
    candidates = [n for n in nodes
                  if selector.items() <= n["metadata"].get("labels", {}).items()
                  and all(tolerated(t, tolerations) for t in n["spec"].get("taints", [])
                          if t.get("effect") in ("NoSchedule", "NoExecute"))]
    if not candidates:
        return 0, (f"note: no node of this cluster matches Job {job}'s nodeSelector {selector or '{}'} and "
                   f"tolerations now (an autoscaled pool at zero nodes looks like this); its pods ask {_show(want)}")
    short: list[tuple[int, int, str, dict]] = []
    for n in candidates:
        alloc = n["status"].get("allocatable", {})
        missing = {k: alloc.get(k, "0") for k, v in want.items() if quantity(alloc.get(k, "0")) < quantity(v)}
        if not missing:
            return 0, f"ok: Job {job}'s pods ({_show(want)}) fit on node {n['metadata']['name']}"
        # The closest node: one that has every kind of resource asked for (a GPU node for a GPU
        # pod), then the fewest short.
        absent = sum(1 for k in want if k not in alloc)
        short.append((absent, len(missing), n["metadata"]["name"], missing))
    _, _, name, missing = min(short)
    return 2, (f"error: Job {job} asks {_show(want)} per pod, more than any node offers: the closest, {name}, has "
               f"{_show(missing)} allocatable; set the shape to fit (k8s/components/gpu-node/shape.yaml, or a "
               f"k8s/components/shapes/<cloud> component)")


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python k8s/node_fit.py RENDERED.yaml NODES.json", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        objs = [d for d in yaml.safe_load_all(f) if d]
    with open(argv[1]) as f:
        nodes = json.load(f).get("items", [])
    code, line = check(objs, nodes)
    print(line, file=sys.stderr if code else sys.stdout)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
