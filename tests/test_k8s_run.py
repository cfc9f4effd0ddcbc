"""The rendered cpu-smoke Job, run for real: N local "pods" that form one multi-node training.

Each pod gets the rendered container command and environment exactly as the kubelet would
build it (`$(VAR)` expansion, downward-API job name, the Job controller's
JOB_COMPLETION_INDEX); the PVC and ConfigMap mounts become temp directories. Where we are root,
every pod runs in its own network namespace with an `eth0` on a shared bridge and its own
/etc/hosts holding the headless-Service names, so the rendered MASTER_ADDR
(`<job>-0.<service>`), MASTER_PORT and GLOO_SOCKET_IFNAME are used unchanged. Elsewhere the
pods share the loopback and MASTER_ADDR is pointed at 127.0.0.1.

Asserted: the two pods train as one 2-node job whose losses equal a single-node 2-process run
of the same config; a worker that starts before the master's name resolves waits for it;
killing either pod (or cutting a pod's network) makes the other exit non-zero within the
configured timeout; a drain or SIGTERM to every pod saves a checkpoint within the grace period,
and the replaced pods resume from it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import helpers as km
import psutil
import pytest
from helpers import (
    K8S,
    REPO,
    TINY,
    PodNetwork,
    free_port,
    mounts,
    one,
    pod_env,
    pod_labels,
    render,
    torch_runtime,
    trainer_container,
    trainjob_job,
    try_network,
)

pytestmark = pytest.mark.slow

OVERLAY = "cpu-smoke"
STEPS = 6
RUN_TIMEOUT_S = int(os.environ.get("K8S_RUN_TIMEOUT_S", "420"))  # per launch: 2-process gloo runs can hang, nothing here may wait forever
KILL_DIST_TIMEOUT_S = 30
# The tiny model for every case: what is tested is how the pods form, lose and resume a gang, not
# the model (the 5M default ran 8-9 s a step here, which made this the suite's slowest file).
SMALL = {"MODEL": TINY["MODEL"], "SEQ_LEN": TINY["SEQ_LEN"]}
# Variables of ours or of other launchers that must not leak from the test's environment.
_STRIP = {"CONFIG", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "JOB_COMPLETION_INDEX",
          "MASTER_ADDR", "MASTER_PORT"}


# -- the pods' world: network namespaces from tests/helpers/ ------------------------------------


class Cluster:
    """The rendered cpu-smoke Job (or another controller's Job, with its pods' DNS names and labels),
    with its volumes on disk under `root`."""

    def __init__(self, root: Path, objs: list[dict] | None = None, job: dict | None = None,
                 names: list[str] | None = None, labels: dict | None = None):
        self.objs = render(OVERLAY) if objs is None else objs
        self.job = job or one(self.objs, "Job")
        self.labels = labels  # None: the Job controller's labels (pod_env)
        self.cm = one(self.objs, "ConfigMap")
        self.n = self.job["spec"]["completions"]
        self.command = trainer_container(self.job)["command"]
        self.root = root
        self.paths: dict[str, Path] = {}  # mountPath -> host directory
        for path, vol in mounts(self.job).items():
            if "persistentVolumeClaim" in vol:
                self.paths[path] = root / "pvc"
            elif "configMap" in vol:
                d = root / "configmap"
                d.mkdir(parents=True, exist_ok=True)
                for key, text in self.cm["data"].items():
                    (d / key).write_text(text)
                self.paths[path] = d
        for d in self.paths.values():
            d.mkdir(parents=True, exist_ok=True)
        if names is None:
            svc = one(self.objs, "Service")
            names = [f"{self.job['metadata']['name']}-{i}.{svc['metadata']['name']}" for i in range(self.n)]
        self.names = names

    def _on_disk(self, value: str) -> str:
        for path, host in self.paths.items():
            if value == path or value.startswith(path + "/"):
                return str(host) + value[len(path):]
        return value

    def env(self, index: int, **overrides: str) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items()
                if k not in _STRIP and k not in _env_vars() and not k.startswith("PET_")}
        pod = {k: self._on_disk(v) for k, v in pod_env(self.job, index, labels=self.labels).items()}
        return {**base, **pod, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **overrides}

    def argv(self) -> list[str]:
        cmd = list(self.command)
        assert cmd[0] == "python", f"container command {cmd} no longer starts with python"
        return [sys.executable, *cmd[1:]]

    def output_dir(self) -> Path:
        return Path(self._on_disk(pod_env(self.job, 0, labels=self.labels)["OUTPUT_DIR"]))


def _env_vars() -> set[str]:
    from train.config import ENV_VARS

    return set(ENV_VARS)


class Pod:
    def __init__(self, argv: list[str], env: dict[str, str], log: Path):
        self.log = log
        self._fh = open(log, "wb")
        # A new session: the pod's whole process tree can be killed as one, like a container.
        self.proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=self._fh, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout=max(0.0, timeout))
        except subprocess.TimeoutExpired:
            return None

    def terminate(self) -> None:
        """SIGTERM the container's main process, as the kubelet does on delete or preemption."""
        tree = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        main = next(p for p in tree if p.cmdline()[:1] == [sys.executable])
        main.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL the pod's whole process tree, as a node failure or `kubectl delete --force` does.

        torchrun puts its workers in sessions of their own, so the tree is collected first and
        every process in it is killed, not just the pod's process group."""
        try:
            tree = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for p in tree:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self.proc.wait()
        self._fh.close()

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


def _losses(output_dir: Path) -> list[tuple[int, float]]:
    path = output_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def _wait_all(pods: list[Pod], timeout: float) -> list[int | None]:
    deadline = time.monotonic() + timeout
    return [p.wait(deadline - time.monotonic()) for p in pods]


def _start_job(cluster: Cluster, net: PodNetwork | None, tmp: Path, master_delay_s: float = 0.0,
               **overrides: str) -> list[Pod]:
    """Start every pod. With a network, the workers start first and the master's name only
    resolves `master_delay_s` later: the Kubernetes DNS race, which the launcher must wait out."""
    pods: dict[int, Pod] = {}
    if net is None:
        overrides = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
                     "GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo", **overrides}
    order = list(range(1, cluster.n)) + [0]
    for i in order:
        if i == 0 and net is not None and master_delay_s:
            time.sleep(master_delay_s)
        if net is not None:
            net.publish(i)
        argv = net.wrap(i, cluster.argv()) if net else cluster.argv()
        pods[i] = Pod(argv, cluster.env(i, **overrides), tmp / f"pod-{i}.log")
    return [pods[i] for i in range(cluster.n)]


def _run_job_to_success(cluster: Cluster, net: PodNetwork | None, tmp: Path, what: str = "job",
                        **start) -> tuple[list[Pod], str]:
    """Start every pod, wait for all to exit, assert they all succeeded; (pods, their log tails)."""
    pods = _start_job(cluster, net, tmp, **start)
    try:
        codes = _wait_all(pods, RUN_TIMEOUT_S)
        logs = "\n".join(f"--- pod {i} ---\n{p.tail()}" for i, p in enumerate(pods))
        assert codes == [0] * cluster.n, f"{what}: exit codes {codes}\n{logs}"
    finally:
        for p in pods:
            p.kill()
    return pods, logs


@pytest.fixture
def cluster(tmp_path):
    return Cluster(tmp_path / "cluster")


@pytest.fixture
def net(cluster):
    network = try_network(cluster.n, cluster.names)
    print(f"pods run {'in network namespaces' if network else 'on the loopback'}")
    yield network
    if network:
        network.down()


# -- tests ------------------------------------------------------------------------------------
def test_two_pods_train_as_one_job_with_the_losses_of_one_node_two_processes(cluster, net, tmp_path):
    pods, logs = _run_job_to_success(cluster, net, tmp_path, master_delay_s=3.0, MAX_STEPS=str(STEPS), LOG_EVERY="1",
                                     **SMALL)
    two_nodes = _losses(cluster.output_dir())
    assert [s for s, _ in two_nodes] == list(range(1, STEPS + 1)), two_nodes
    pod0 = pods[0].log.read_text(errors="replace")
    assert "node 0/2 (indexed-job)" in pod0 and "world size 2" in pod0, pods[0].tail()
    pod1 = pods[1].log.read_text(errors="replace")
    assert "node 1/2 (indexed-job)" in pod1, pods[1].tail()
    if net is not None:
        assert "master " + cluster.names[0] in pod1 and "reachable after" in pod1, pods[1].tail()

    # The same config on one node with two processes.
    single_root = tmp_path / "single"
    single = Cluster(single_root)
    env = single.env(0, NNODES="1", NPROC="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                     GLOO_SOCKET_IFNAME="lo", NCCL_SOCKET_IFNAME="lo", MAX_STEPS=str(STEPS), LOG_EVERY="1", **SMALL)
    ref = Pod(single.argv(), env, tmp_path / "single.log")
    try:
        code = ref.wait(RUN_TIMEOUT_S)
        assert code == 0, f"single-node run: exit {code}\n{ref.tail()}"
    finally:
        ref.kill()
    one_node = _losses(single.output_dir())
    assert [s for s, _ in one_node] == [s for s, _ in two_nodes]
    assert [loss for _, loss in two_nodes] == pytest.approx([loss for _, loss in one_node], rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("victim, how", [(1, "kill"), (0, "kill"), (1, "cut")],
                         ids=["kill-worker", "kill-master", "cut-worker-network"])
def test_losing_one_pod_fails_the_other_within_the_timeout(cluster, net, tmp_path, victim, how):
    """kill: the kernel closes the dead pod's sockets, so the peer fails at once. cut: packets
    just vanish (a node or switch gone), and only DIST_TIMEOUT ends the wait."""
    if how == "cut" and net is None:
        pytest.skip("cutting one pod's network needs network namespaces (root)")
    pods = _start_job(cluster, net, tmp_path, MAX_STEPS="100000", LOG_EVERY="1", CHECKPOINT_EVERY="0",
                      DIST_TIMEOUT=str(KILL_DIST_TIMEOUT_S), **SMALL)
    survivor = 1 - victim
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not _losses(cluster.output_dir()):
            codes = [p.proc.poll() for p in pods]
            assert None in codes and time.monotonic() < deadline, \
                f"no step logged (exit codes {codes})\n" + "\n".join(p.tail() for p in pods)
            time.sleep(0.5)
        assert pods[survivor].proc.poll() is None, pods[survivor].tail()
        start = time.monotonic()
        if how == "kill":
            pods[victim].kill()  # the node dies: no SIGTERM, no save
        else:
            net.cut(victim)
        # The survivor's collective fails (at once, or after DIST_TIMEOUT for a cut); its agent then
        # restarts its workers in place (MAX_RESTARTS), whose rendezvous waits up to DIST_TIMEOUT
        # for the lost pod before the pod fails: at most two timeouts.
        margin = 30
        code = pods[survivor].wait(2 * KILL_DIST_TIMEOUT_S + margin)
        elapsed = time.monotonic() - start
        assert code is not None, f"pod {survivor} still running {elapsed:.0f} s after pod {victim} died\n" \
                                 f"{pods[survivor].tail()}"
        assert code != 0, f"pod {survivor} exited 0 after its peer died\n{pods[survivor].tail()}"
        print(f"pod {survivor} exited {code} {elapsed:.1f} s after pod {victim} was {how}")
    finally:
        for p in pods:
            p.kill()


# -- the Job controller's side: what each pod's exit makes the Job do -------------------------------
class JobController:
    """The Indexed Job controller for the pods started here: it applies the rendered
    podFailurePolicy (helpers.job_action) to each pod that ends. Ignore replaces the pod (it has
    fully stopped: podReplacementPolicy Failed); FailJob or a counted failure (backoffLimit 0)
    fails the Job and stops every pod; index 0 succeeding completes it (successPolicy)."""

    def __init__(self, cluster: Cluster, net: PodNetwork | None, tmp: Path, **overrides: str):
        if net is None:  # the loopback stand-in: one address and port for every pod, replacements too
            overrides = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "GLOO_SOCKET_IFNAME": "lo",
                         "NCCL_SOCKET_IFNAME": "lo", **overrides}
        self.cluster, self.net, self.tmp, self.overrides = cluster, net, tmp, overrides
        self.spec = cluster.job["spec"]
        self.disrupted: set[int] = set()  # pods with the DisruptionTarget condition
        self.drained_at: dict[int, float] = {}  # index -> when its SIGTERM was sent
        self.stopped_in: dict[int, float] = {}  # index -> seconds from its SIGTERM to its exit
        self.replaced: list[tuple[int, int, str]] = []  # (index, exit code, action)
        self.pods = _start_job(cluster, net, tmp, **overrides)
        self._round = {i: 0 for i in range(cluster.n)}

    def drain(self, index: int) -> None:
        """A node drain or preemption: the pod gets DisruptionTarget, then SIGTERM."""
        self.disrupted.add(index)
        self.drained_at[index] = time.monotonic()
        self.pods[index].terminate()

    def run(self, timeout: float) -> tuple[str, str]:
        """Until the Job completes or fails: ("Complete" | "Failed: ...", log tails)."""
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                for i, pod in enumerate(self.pods):
                    code = pod.proc.poll()
                    if code is None:
                        continue
                    if i in self.drained_at:
                        self.stopped_in[i] = time.monotonic() - self.drained_at.pop(i)
                    if code == 0 and i == 0:
                        return "Complete", self.logs()
                    if code == 0:
                        continue  # a worker that finished: the Job waits for index 0
                    conditions = ("DisruptionTarget",) if i in self.disrupted else ()
                    action = km.job_action(self.spec, code, conditions)
                    if action != "Ignore":
                        return f"Failed: pod {i} exit {code} -> {action}", self.logs()
                    self.replaced.append((i, code, action))
                    self.disrupted.discard(i)
                    self._replace(i)
                time.sleep(0.5)
            return "Timeout", self.logs()
        finally:
            for p in self.pods:
                p.kill()

    def _replace(self, index: int) -> None:
        self.pods[index].kill()
        self._round[index] += 1
        d = self.tmp / f"pod-{index}-{self._round[index]}"
        d.mkdir(parents=True, exist_ok=True)
        argv = self.net.wrap(index, self.cluster.argv()) if self.net else self.cluster.argv()
        self.pods[index] = Pod(argv, self.cluster.env(index, **self.overrides), d / "pod.log")

    def logs(self) -> str:
        return "\n".join(f"--- pod {i} ---\n{p.tail()}" for i, p in enumerate(self.pods))


def _wait_for_steps(cluster: Cluster, pods: list[Pod], n: int) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while len(_losses(cluster.output_dir())) < n:
        codes = [p.proc.poll() for p in pods]
        assert None in codes and time.monotonic() < deadline, \
            f"fewer than {n} steps logged (exit codes {codes})\n" + "\n".join(p.tail() for p in pods)
        time.sleep(0.5)


@pytest.mark.parametrize("drained", [[1], [0, 1]],
                         ids=["drain-one-node", "preempt-every-node"])
def test_a_drain_or_preemption_stops_the_gang_with_a_checkpoint_and_the_job_resumes_it(cluster, net, tmp_path, drained):
    """Draining one node (its pod gets DisruptionTarget + SIGTERM) makes every rank stop at one
    agreed step and save; the drained pod is not counted, its gang-mates exit 143 (preempted),
    which the Job does not count either, so it replaces them and the new gang resumes. A whole
    spot pool preempted at once (or `kubectl delete job` then apply) is the same with every pod
    disrupted. Every drained pod saves and exits within terminationGracePeriodSeconds."""
    steps = 8
    job = JobController(cluster, net, tmp_path, MAX_STEPS=str(steps), LOG_EVERY="1", CHECKPOINT_EVERY="0",
                        TRAIN_FAILPOINTS="step_sleep=0.5", **SMALL)
    _wait_for_steps(cluster, job.pods, 2)
    for i in drained:
        job.drain(i)
    outcome, logs = job.run(RUN_TIMEOUT_S)
    assert outcome == "Complete", f"{outcome}; replaced {job.replaced}\n{logs}"
    grace = cluster.job["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert sorted(job.stopped_in) == drained and max(job.stopped_in.values()) < grace, \
        f"a drained pod must save and exit before the kubelet's SIGKILL ({grace} s): {job.stopped_in}"
    print(f"drained pods exited {job.stopped_in} s after SIGTERM (grace {grace} s)")
    assert {i for i, _, _ in job.replaced} == {0, 1}, f"every pod of the gang stops and is replaced: {job.replaced}"
    steps_seen = [s for s, _ in _losses(cluster.output_dir())]
    assert steps_seen == list(range(1, steps + 1)), f"one curve, resumed where the gang stopped: {steps_seen}"
    assert "resumed from" in job.pods[0].log.read_text(errors="replace"), logs


def test_a_final_exit_code_fails_the_job_at_once(cluster, net, tmp_path):
    """A pod that exits with a final code (here 2: a bad setting on node 1) fails the Job; no
    replacement is tried, the other pods are stopped."""
    job = JobController(cluster, net, tmp_path, MAX_STEPS="4", LOG_EVERY="1", **SMALL)
    bad = cluster.env(1, **job.overrides, PRECISION="fp16")  # fp16 on CPU is refused before any group starts
    job.pods[1].kill()
    job.pods[1] = Pod(net.wrap(1, cluster.argv()) if net else cluster.argv(), bad, tmp_path / "bad.log")
    outcome, logs = job.run(RUN_TIMEOUT_S)
    assert outcome == "Failed: pod 1 exit 2 -> FailJob", f"{outcome}\n{logs}"
    assert not job.replaced


# -- Kubeflow Trainer v2: the TrainJob example's pods, as its torch runtime builds them ----------------
def _trainjob_cluster(root: Path) -> tuple[Cluster, dict]:
    """k8s/examples/trainjob.yaml on a CPU cluster: one process per node (numProcPerNode), no GPU
    resources, DDP instead of ZeRO-2 (DeepSpeed's CPU ops build for a minute; the contract under
    test is the same). Everything else is the example: env, volumes, and the PET_* variables the
    Torch plugin adds. The ConfigMap is made from k8s/base/run.yaml, as the example says."""
    import yaml

    (tj,) = [d for d in yaml.safe_load_all((K8S / "examples" / "trainjob.yaml").read_text())
             if d and d["kind"] == "TrainJob"]
    tr = tj["spec"]["trainer"]
    tr["numProcPerNode"] = 1
    tr.pop("resourcesPerNode")
    for e in tr["env"]:
        e.update({"DEVICE": {"value": "cpu"}, "STRATEGY": {"value": "ddp"}}.get(e["name"], {}))
    job = trainjob_job(tj, torch_runtime())
    name = tj["metadata"]["name"]
    cm = {"kind": "ConfigMap", "metadata": {"name": "trainer-run"},
          "data": {"run.yaml": (K8S / "base" / "run.yaml").read_text()}}
    names = [f"{name}-node-0-{i}.{name}" for i in range(tr["numNodes"])]  # JobSet's pod DNS names
    labels = {**pod_labels(job), "jobset.sigs.k8s.io/jobset-name": name}
    return Cluster(root, objs=[cm], job=job, names=names, labels=labels), tj


def test_a_trainjob_on_the_torch_runtime_trains_as_one_job_from_the_pet_variables(tmp_path):
    cluster, tj = _trainjob_cluster(tmp_path / "cluster")
    env0 = cluster.env(0)
    assert env0["PET_MASTER_ADDR"] == cluster.names[0] and "MASTER_ADDR" not in env0
    net = try_network(cluster.n, cluster.names)
    try:
        pods, logs = _run_job_to_success(cluster, net, tmp_path, what="trainjob", master_delay_s=3.0,
                                         MAX_STEPS=str(STEPS), LOG_EVERY="1", CHECKPOINT_EVERY="0", **SMALL)
    finally:
        if net:
            net.down()
    assert [s for s, _ in _losses(cluster.output_dir())] == list(range(1, STEPS + 1)), logs
    assert cluster.output_dir().name == tj["metadata"]["name"]
    if net is not None:  # on the loopback MASTER_ADDR is overridden, so only rank and count are PET_'s
        for i, pod in enumerate(pods):
            text = pod.log.read_text(errors="replace")
            assert f"node {i}/2 (pet)" in text, pod.tail()
        assert "master " + cluster.names[0] in pods[1].log.read_text(errors="replace"), pods[1].tail()
