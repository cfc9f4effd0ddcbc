"""Node topology from each launcher's environment contract (train/launcher/nodes.py).

Pure env dicts, plus a real TCP listener for wait_for_master. The launch config is resolved the
way `python -m train launch` does it (load_config on the same env), so the tests also hold the
"explicit env beats the operators" rule to the real config loader.
"""

from __future__ import annotations

import dataclasses
import socket
import subprocess
import sys
import threading
import time

import pytest
from helpers import free_port

from train.config import ConfigError, LaunchConfig, exitcodes, load_config
from train.launcher.nodes import LAUNCHER_SCRUB_VARS, MasterUnreachable, NodeSpec, resolve_nodes, wait_for_master
from train.launcher.slurm import expand_hostlist, master_port, node_address

# What `scontrol show node` would say each Slurm node's NodeAddr is (train/launcher/slurm.py).
NODE_ADDR = {"gpu07": "10.1.0.7", "n1": "127.0.0.1"}


def resolve(env: dict[str, str]) -> NodeSpec:
    cfg = load_config([], env=env, dotenv_path=None)
    return resolve_nodes(cfg.launch, env, node_address=lambda name: NODE_ADDR.get(name, name))


# -- our own contract -------------------------------------------------------------------------
def any_port(spec: NodeSpec) -> NodeSpec:
    """A single node picks a free port (test_single_node_gets_a_free_port...): compare the rest."""
    return dataclasses.replace(spec, master_port=0)


def test_no_env_is_one_local_node():
    assert any_port(resolve({})) == NodeSpec(1, 0, "127.0.0.1", 0, 0, "config")


def test_single_node_gets_a_free_port_unless_master_port_is_set():
    """Two runs on one host must not both take 29500; nodes of a multi-node job must agree on one."""
    ports = {resolve({}).master_port for _ in range(3)}
    assert 29500 not in ports and len(ports) > 1
    assert resolve({"MASTER_PORT": "29500"}).master_port == 29500
    assert resolve({"NNODES": "2", "NODE_RANK": "0"}).master_port == 29500  # every node must agree on it


def test_explicit_env_is_used_as_is():
    env = {"NNODES": "3", "NODE_RANK": "2", "MASTER_ADDR": "head", "MASTER_PORT": "1234", "NPROC": "4"}
    assert resolve(env) == NodeSpec(3, 2, "head", 1234, 4, "config")


def test_empty_strings_count_as_unset():
    # Make and compose export unset variables as "".
    env = {"NNODES": "", "NODE_RANK": "", "PET_NNODES": "2", "PET_NODE_RANK": "1", "PET_MASTER_ADDR": "m"}
    assert resolve(env) == NodeSpec(2, 1, "m", 29500, 0, "pet")


def test_values_from_run_file_or_cli_count_as_explicit():
    launch = LaunchConfig(nnodes=2, node_rank=1, master_addr="head")  # e.g. from the YAML run file
    spec = resolve_nodes(launch, {"PET_NNODES": "8", "PET_NODE_RANK": "5", "PET_MASTER_ADDR": "other"})
    assert (spec.nnodes, spec.node_rank, spec.master_addr, spec.source) == (2, 1, "head", "config")


# -- Kubeflow Trainer v2 / newer training-operator: PET_* ---------------------------------------
def test_trainer_v2_pet_variables():
    env = {"PET_NNODES": "4", "PET_NPROC_PER_NODE": "8", "PET_NODE_RANK": "3",
           "PET_MASTER_ADDR": "job-node-0-0.job", "PET_MASTER_PORT": "29400"}
    assert resolve(env) == NodeSpec(4, 3, "job-node-0-0.job", 29400, 8, "pet")


@pytest.mark.parametrize("value", ["auto", "gpu", "cpu"])
def test_pet_nproc_keywords_leave_it_to_the_launcher(value):
    env = {"PET_NNODES": "2", "PET_NODE_RANK": "0", "PET_MASTER_ADDR": "m", "PET_NPROC_PER_NODE": value}
    assert resolve(env).nproc_per_node == 0


def test_pet_fixed_range_is_accepted_elastic_range_is_not():
    base = {"PET_NODE_RANK": "1", "PET_MASTER_ADDR": "m"}
    assert resolve({**base, "PET_NNODES": "2:2"}).nnodes == 2
    with pytest.raises(ConfigError, match=r"PET_NNODES='1:4' is an elastic range"):
        resolve({**base, "PET_NNODES": "1:4"})


def test_explicit_env_beats_pet():
    env = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "mine", "NPROC": "1",
           "PET_NNODES": "4", "PET_NODE_RANK": "3", "PET_MASTER_ADDR": "theirs", "PET_NPROC_PER_NODE": "8"}
    assert resolve(env) == NodeSpec(2, 1, "mine", 29500, 1, "config")


# -- PyTorchJob v1 ----------------------------------------------------------------------------
def test_pytorchjob_world_size_counts_pods_not_processes():
    # Old operators: WORLD_SIZE = number of pods, RANK = this pod's node rank. Reading WORLD_SIZE
    # as a process count is the classic wrong-world-size bug: 2 pods x 8 GPUs is 16 ranks, not 2.
    env = {"MASTER_ADDR": "trainer-ptj-master-0", "MASTER_PORT": "23456", "WORLD_SIZE": "2", "RANK": "1",
           "NPROC": "8"}
    spec = resolve(env)
    assert spec == NodeSpec(2, 1, "trainer-ptj-master-0", 23456, 8, "pytorchjob")
    assert spec.nnodes * spec.nproc_per_node == 16


def test_newer_pytorchjob_prefers_pet_over_process_world_size():
    # Newer training-operator with nprocPerNode: WORLD_SIZE = pods x nproc, plus PET_* per node.
    env = {"MASTER_ADDR": "m", "MASTER_PORT": "23456", "WORLD_SIZE": "16", "RANK": "1",
           "PET_NNODES": "2", "PET_NODE_RANK": "1", "PET_NPROC_PER_NODE": "8"}
    assert resolve(env) == NodeSpec(2, 1, "m", 23456, 8, "pet")


def test_process_level_rank_inside_a_worker_is_not_a_node_rank():
    # With LOCAL_RANK set, RANK/WORLD_SIZE are a launched worker's process ranks.
    env = {"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "5"}
    assert any_port(resolve(env)) == NodeSpec(1, 0, "127.0.0.1", 0, 0, "config")


def test_pytorchjob_master_pod():
    env = {"MASTER_ADDR": "localhost", "MASTER_PORT": "23456", "WORLD_SIZE": "4", "RANK": "0"}
    assert resolve(env) == NodeSpec(4, 0, "localhost", 23456, 0, "pytorchjob")


# -- Indexed Job ------------------------------------------------------------------------------
def test_indexed_job_index_is_node_rank():
    env = {"JOB_COMPLETION_INDEX": "1", "NNODES": "2", "MASTER_ADDR": "trainer-0.trainer", "NPROC": "1"}
    assert resolve(env) == NodeSpec(2, 1, "trainer-0.trainer", 29500, 1, "indexed-job")


def test_indexed_job_pod_zero_is_master():
    env = {"JOB_COMPLETION_INDEX": "0", "NNODES": "4", "MASTER_ADDR": "trainer-0.trainer"}
    assert resolve(env) == NodeSpec(4, 0, "trainer-0.trainer", 29500, 0, "indexed-job")


def test_single_pod_indexed_job():
    assert any_port(resolve({"JOB_COMPLETION_INDEX": "0"})) == NodeSpec(1, 0, "127.0.0.1", 0, 0, "indexed-job")


def test_pet_beats_pytorchjob_beats_indexed_job():
    common = {"MASTER_ADDR": "m"}
    env = {**common, "JOB_COMPLETION_INDEX": "2", "RANK": "1", "WORLD_SIZE": "4", "PET_NODE_RANK": "3", "PET_NNODES": "4"}
    assert (resolve(env).node_rank, resolve(env).source) == (3, "pet")
    env.pop("PET_NODE_RANK"), env.pop("PET_NNODES")
    assert (resolve(env).node_rank, resolve(env).source) == (1, "pytorchjob")
    env.pop("RANK"), env.pop("WORLD_SIZE")
    env["NNODES"] = "4"
    assert (resolve(env).node_rank, resolve(env).source) == (2, "indexed-job")


# -- Slurm: a task of `srun --ntasks-per-node=1` (slurm/train.sbatch) ----------------------------
def slurm_task(node: int, nodes: int = 2, nodelist: str = "gpu[07-08]", job: str = "4242", **extra) -> dict:
    """The variables srun gives the task on node `node` of a step with one task per node."""
    return {"SLURM_JOB_ID": job, "SLURM_JOB_NUM_NODES": str(nodes), "SLURM_JOB_NODELIST": nodelist,
            "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_NODES": str(nodes), "SLURM_STEP_NODELIST": nodelist,
            "SLURM_STEP_NUM_TASKS": str(nodes), "SLURM_NTASKS": str(nodes), "SLURM_NODEID": str(node),
            "SLURM_PROCID": str(node), **extra}


def test_slurm_step_gives_nodes_rank_and_the_first_node_as_master():
    spec = resolve(slurm_task(1, SLURM_GPUS_ON_NODE="4"))
    assert spec == NodeSpec(2, 1, "10.1.0.7", master_port("4242"), 4, "slurm")
    assert resolve(slurm_task(0)) == NodeSpec(2, 0, "10.1.0.7", master_port("4242"), 0, "slurm")


def test_slurm_nodes_agree_on_a_port_that_differs_between_jobs():
    # Two jobs sharing a node must not both listen on 29500; the nodes of one job must agree.
    ports = {resolve(slurm_task(i, job="4242")).master_port for i in range(2)}
    assert ports == {master_port("4242")} and master_port("4243") not in ports
    assert not {master_port("4242"), master_port("4242") + 1} & set(range(32768, 65536))  # + 1: the preflight's
    assert resolve(slurm_task(1, MASTER_PORT="2345")).master_port == 2345


def test_slurm_single_node_job_gets_a_free_port_and_works_without_srun():
    batch_shell = {k: v for k, v in slurm_task(0, nodes=1, nodelist="n1").items() if "STEP" not in k}
    for env in (slurm_task(0, nodes=1, nodelist="n1"), batch_shell):
        spec = resolve(env)
        assert (spec.nnodes, spec.node_rank, spec.master_addr, spec.source) == (1, 0, "127.0.0.1", "slurm")
        assert spec.master_port != master_port("4242")


def test_slurm_step_nodes_beat_the_job_nodes():
    # A step on part of the allocation: its own node list and count decide, not the job's.
    env = slurm_task(0, nodes=2, nodelist="gpu[07-08]")
    env.update(SLURM_JOB_NUM_NODES="4", SLURM_JOB_NODELIST="gpu[05-08]")
    assert (resolve(env).nnodes, resolve(env).master_addr) == (2, "10.1.0.7")


def test_explicit_env_beats_slurm():
    # e.g. two tasks of one allocation, each told its node rank by hand.
    env = slurm_task(0, NNODES="2", NODE_RANK="1", MASTER_ADDR="head", MASTER_PORT="29600", NPROC="1")
    assert resolve(env) == NodeSpec(2, 1, "head", 29600, 1, "config")


def test_kubernetes_contracts_beat_leaked_slurm_variables():
    env = {**slurm_task(1), "JOB_COMPLETION_INDEX": "0", "NNODES": "2", "MASTER_ADDR": "trainer-0.trainer"}
    assert resolve(env).source == "indexed-job" and resolve(env).node_rank == 0


@pytest.mark.parametrize("hostlist, names", [
    ("n1", ["n1"]),
    ("n[1-2]", ["n1", "n2"]),
    ("gpu[07-09,11],login1", ["gpu07", "gpu08", "gpu09", "gpu11", "login1"]),
    ("a[1-2]-b[1-2]", ["a1-b1", "a1-b2", "a2-b1", "a2-b2"]),
    ("node[098-101]", ["node098", "node099", "node100", "node101"]),
])
def test_slurm_host_lists_expand_as_slurm_does(hostlist, names):
    assert expand_hostlist(hostlist) == names


def test_node_address_without_the_slurm_client_is_the_name(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # e.g. a container without scontrol
    assert node_address("gpu07") == "gpu07"


# -- inconsistent input: one line naming the variable and value -------------------------------
@pytest.mark.parametrize("env, message", [
    ({"JOB_COMPLETION_INDEX": "2", "NNODES": "2", "MASTER_ADDR": "m"},
     r"JOB_COMPLETION_INDEX=2 is not a valid node rank for NNODES=2 \(must be 0..1\)"),
    ({"JOB_COMPLETION_INDEX": "1", "MASTER_ADDR": "m"},
     r"JOB_COMPLETION_INDEX=1 is not a valid node rank for NNODES=1.*set NNODES"),
    ({"JOB_COMPLETION_INDEX": "x1"}, r"JOB_COMPLETION_INDEX='x1' is not an integer"),
    ({"JOB_COMPLETION_INDEX": "-1", "NNODES": "2", "MASTER_ADDR": "m"}, r"JOB_COMPLETION_INDEX=-1 must be >= 0"),
    ({"PET_NNODES": "two", "PET_NODE_RANK": "0"}, r"PET_NNODES='two' is not an integer"),
    ({"PET_NNODES": "0", "PET_NODE_RANK": "0"}, r"PET_NNODES=0 must be >= 1"),
    ({"PET_NNODES": "2", "PET_NODE_RANK": "2", "PET_MASTER_ADDR": "m"},
     r"PET_NODE_RANK=2 is not a valid node rank for PET_NNODES=2"),
    ({"PET_NNODES": "2", "PET_NODE_RANK": "1", "PET_MASTER_ADDR": "m", "PET_MASTER_PORT": "70000"},
     r"PET_MASTER_PORT=70000 is not a TCP port"),
    ({"PET_NNODES": "2", "PET_NODE_RANK": "1", "PET_MASTER_ADDR": "m", "PET_NPROC_PER_NODE": "many"},
     r"PET_NPROC_PER_NODE='many' is not an integer"),
    ({"RANK": "4", "WORLD_SIZE": "4", "MASTER_ADDR": "m"}, r"RANK=4 is not a valid node rank for WORLD_SIZE=4"),
    ({"RANK": "0", "WORLD_SIZE": "4.0", "MASTER_ADDR": "m"}, r"WORLD_SIZE='4.0' is not an integer"),
    ({"NNODES": "2", "JOB_COMPLETION_INDEX": "1"}, r"NNODES=2 nodes but MASTER_ADDR is not set"),
    ({k: v for k, v in slurm_task(0).items() if "STEP" not in k},
     r"SLURM_JOB_NUM_NODES=2 but this is the batch script, not a job step: .*srun --ntasks-per-node=1"),
    (slurm_task(0, SLURM_STEP_NUM_TASKS="8"),
     r"SLURM_STEP_NUM_TASKS=8 tasks on SLURM_STEP_NUM_NODES=2 nodes: run one task per node"),
    (slurm_task(2), r"SLURM_NODEID=2 is not a valid node rank for SLURM_STEP_NUM_NODES=2 \(must be 0..1\)"),
    (slurm_task(0, nodelist="gpu[07-"), r"SLURM_JOB_NODELIST='gpu\[07-' is not a Slurm host list"),
    (slurm_task(0, job="abc"), r"SLURM_JOB_ID='abc' is not an integer"),
])
def test_inconsistent_input_is_a_config_error(env, message):
    with pytest.raises(ConfigError, match=message) as info:
        resolve(env)
    assert "\n" not in str(info.value)


def test_scrub_list_covers_every_node_level_variable():
    for var in ("RANK", "WORLD_SIZE", "PET_NNODES", "PET_NODE_RANK", "PET_NPROC_PER_NODE",
                "PET_MASTER_ADDR", "PET_MASTER_PORT"):
        assert var in LAUNCHER_SCRUB_VARS


# -- wait_for_master --------------------------------------------------------------------------
def test_wait_is_a_no_op_on_the_master_and_on_one_node():
    port = free_port()  # nothing listens: a real wait would time out
    start = time.monotonic()
    wait_for_master(NodeSpec(2, 0, "127.0.0.1", port, 1, "indexed-job"), timeout_s=5)
    wait_for_master(NodeSpec(1, 0, "no-such-host.invalid", port, 1, "config"), timeout_s=5)
    assert time.monotonic() - start < 1


def test_wait_returns_once_the_master_listens():
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        start = time.monotonic()
        wait_for_master(NodeSpec(2, 1, "localhost", port, 1, "indexed-job"), timeout_s=10)
        assert time.monotonic() - start < 2


def test_wait_keeps_trying_until_the_master_starts_late():
    port = free_port()
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)

    def start_late():
        time.sleep(1.5)
        srv.bind(("127.0.0.1", port))
        srv.listen()

    t = threading.Thread(target=start_late)
    t.start()
    try:
        start = time.monotonic()
        wait_for_master(NodeSpec(2, 1, "127.0.0.1", port, 1, "indexed-job"), timeout_s=20)
        assert 1.4 < time.monotonic() - start < 10
    finally:
        t.join()
        srv.close()


def test_wait_times_out_on_a_closed_port(capsys):
    port = free_port()
    start = time.monotonic()
    with pytest.raises(MasterUnreachable, match=rf"master 127.0.0.1:{port} not reachable after 2 s: .*connect failed"):
        wait_for_master(NodeSpec(2, 1, "127.0.0.1", port, 1, "indexed-job"), timeout_s=2)
    assert 1.9 < time.monotonic() - start < 5
    assert "waiting up to 2 s" in capsys.readouterr().err


def test_wait_times_out_on_a_name_that_never_resolves():
    start = time.monotonic()
    with pytest.raises(MasterUnreachable, match=r"master trainer-0.no-such-service.invalid:29500 not reachable after 1 s: "
                                          r"name does not resolve"):
        wait_for_master(NodeSpec(2, 1, "trainer-0.no-such-service.invalid", 29500, 1, "indexed-job"), timeout_s=1)
    assert time.monotonic() - start < 15  # the resolver's own timeout may add a little


def test_an_unreachable_master_is_not_a_config_error():
    # A cold GPU node pulling a 10 GB image is not bad input: the Job retries this, not exit 2.
    assert not issubclass(MasterUnreachable, ConfigError)
    assert exitcodes.MASTER_UNREACHABLE not in exitcodes.FINAL_CODES


def test_launcher_exits_master_unreachable_when_node_0_never_answers(tmp_path):
    from helpers import REPO, TINY, job_env

    port = free_port()  # nothing listens
    settings = {**TINY, "OUTPUT_DIR": str(tmp_path / "run"), "NNODES": "2", "NODE_RANK": "1",
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "launch.master_wait_s": "1",
                "PREFLIGHT": "off"}  # the preflight's own wait for node 0 says the same (tests/test_preflight.py)
    p = subprocess.run([sys.executable, "-m", "train", "launch", *[f"{k}={v}" for k, v in settings.items()]],
                       cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == exitcodes.MASTER_UNREACHABLE, p.stderr[-3000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: master 127.0.0.1:{port} not reachable after 1 s"), last
