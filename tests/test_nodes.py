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


def resolve(env: dict[str, str]) -> NodeSpec:
    cfg = load_config([], env=env, dotenv_path=None)
    return resolve_nodes(cfg.launch, env)


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
