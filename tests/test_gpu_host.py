"""A GPU host as it really is, shown on CPU (issue 25): what a CPU can show of the GPU path.

- The venv's torch build follows the NVIDIA driver (a fake `nvidia-smi` on PATH), and a launch
  on a host whose GPUs torch cannot use is refused in one line instead of training on CPU.
- DEVICE=cpu hides every GPU from the workers; FSDP2 reads a pretrained model on rank 0 only.
- Resuming into a fused AdamW, DeepSpeed's gradient dtypes, fp16's loss scale in the metrics,
  the image's portable CPU ops, the venv's ninja, a peak-FLOPS row.
(The cases only a GPU can show are in tests/test_gpu.py.)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import psutil
import pytest
from helpers import (
    REPO,
    args_for,
    assert_refused,
    fake_nvidia_smi,
    fp16_accelerator,
    free_port,
    job_env,
    kill_tree,
    one_step,
    parse_dockerfile,
    peak_rss,
    save_tiny_pretrained,
    worker_pids,
)


# -- 1. the torch build the driver runs ----------------------------------------------------------
def torch_install_line(path: str, tmp_path) -> subprocess.CompletedProcess:
    """What `make venv` would run (make -n) on a host whose PATH is ``path``."""
    return subprocess.run(["make", "-n", "-f", str(REPO / "Makefile"), "venv", f"VENV={tmp_path / 'venv'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=60, env={**os.environ, "PATH": path})


@pytest.mark.parametrize("driver, build", [("580.65.06", "cu128"), ("570.124.06", "cu128"),
                                           ("550.54.15", "cu126"), ("525.60.13", "cu126"), (None, "cu128")])
def test_make_venv_installs_the_torch_build_the_driver_runs(tmp_path, driver, build):
    """PyPI's torch needs the newest driver; the venv gets the build this driver runs instead
    (cu128, the image's build, from R570; cu126 from R525; cu128 when nvidia-smi prints no version)."""
    out = torch_install_line(fake_nvidia_smi(tmp_path / "bin", driver), tmp_path)
    line = next(ln for ln in out.stdout.splitlines() if "pip install" in ln and ln.endswith(" torch"))
    assert f"--extra-index-url https://download.pytorch.org/whl/{build} " in line, line


def test_a_driver_too_old_for_any_cuda_torch_is_named_in_one_line(tmp_path):
    env = {**os.environ, "PATH": fake_nvidia_smi(tmp_path / "bin", "470.82.01")}
    p = subprocess.run([sys.executable, "-m", "train", "info", "torch-index"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.splitlines() == [p.stderr.strip()] and "NVIDIA driver 470.82.01" in p.stderr
    assert "R525+" in p.stderr and "TORCH_INDEX=" in p.stderr


def launch(tmp_path, path: str, **settings) -> subprocess.CompletedProcess:
    args = [f"{k}={v}" for k, v in {"OUTPUT_DIR": tmp_path / "out", "MODEL": "llama-debug", "NPROC": "1",
                                    "PREFLIGHT": "only", **settings}.items()]
    return subprocess.run([sys.executable, "-m", "train", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=180, env=job_env({"PATH": path}))


def test_gpus_torch_cannot_use_are_refused_instead_of_training_on_cpu(tmp_path):
    """nvidia-smi lists 2 GPUs, this torch sees none (a CPU build here, as a CUDA 13 build on a
    550 driver would): DEVICE=auto would silently become cpu. One line, exit 2, nothing started."""
    path = fake_nvidia_smi(tmp_path / "bin", "550.54.15")
    line = assert_refused(launch(tmp_path, path, DEVICE="auto"), "nvidia-smi lists 2 GPU(s) (driver 550.54.15)",
                          "cannot use them", "whl/cu126", "DEVICE=cpu")
    assert "torch" in line
    assert not (tmp_path / "out").exists()


def test_device_cpu_on_a_gpu_host_is_a_choice_not_refused(tmp_path):
    p = launch(tmp_path, fake_nvidia_smi(tmp_path / "bin", "550.54.15"), DEVICE="cpu")
    assert p.returncode == 0, p.stdout + p.stderr


# -- 2 and 5: one 2-node FSDP2 job on CPU, from a pretrained model, on "GPU workstations" ---------
# ~58M parameters (232 MB in fp32): large enough that a second copy of the weights stands out of
# a worker's own ~0.5 GB (Python, torch, transformers), small enough for one step on 2 busy cores.
BIG = {"hidden_size": 768, "intermediate_size": 2048, "num_layers": 8, "num_heads": 12}


@pytest.fixture(scope="module")
def fsdp_pretrained(tmp_path_factory):
    """The job's result, each worker's environment, and each rank's peak RSS up to the end of
    loading and sharding: rank 1 is held 14 s before its first batch (a failpoint), and the peaks
    are read halfway through, before training's own memory (all-gathers, gradients, Adam) adds
    to them."""
    tmp = tmp_path_factory.mktemp("fsdp-pretrained")
    model_dir = save_tiny_pretrained(tmp / "model", **BIG)
    model_bytes = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    out, port = tmp / "out", str(free_port())
    env = job_env({"CUDA_VISIBLE_DEVICES": "0,1", "TRAIN_FAILPOINTS": "data_sleep=1@1:14"})
    nodes = []  # two "machines" of one process each: rank 1 is its node's local rank 0
    for node in (0, 1):
        args = args_for(out, STRATEGY="fsdp", MODEL=str(model_dir), MAX_STEPS="1", CHECKPOINT_EVERY="0", NPROC="1",
                        NNODES="2", NODE_RANK=str(node), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                        **{"checkpoint.export": "false"})
        with open(tmp / f"node{node}.log", "w") as log:
            nodes.append(subprocess.Popen([sys.executable, "-m", "train", *args], cwd=REPO, env=env, stdout=log,
                                          stderr=subprocess.STDOUT, text=True, start_new_session=True))
    try:
        pids = worker_pids(out, 2, timeout=240)
        envs = {rank: psutil.Process(pid).environ() for rank, pid in pids.items()}
        deadline = time.monotonic() + 300
        while "model prepared as" not in (tmp / "node0.log").read_text() and nodes[0].poll() is None:
            assert time.monotonic() < deadline, "the model was not prepared in 300 s"
            time.sleep(0.2)
        time.sleep(6)
        peaks = {rank: peak_rss(pid) for rank, pid in pids.items()}
        codes = [p.wait(timeout=300) for p in nodes]
    finally:
        for p in nodes:
            kill_tree(p)
            p.wait(timeout=60)
    return {"returncodes": codes, "log": (tmp / "node0.log").read_text() + (tmp / "node1.log").read_text(),
            "envs": envs, "peaks": peaks, "model_bytes": model_bytes}


@pytest.mark.slow
def test_device_cpu_hides_every_gpu_from_the_workers(fsdp_pretrained):
    """On a GPU workstation (CUDA_VISIBLE_DEVICES=0,1 set) fsdp jobs with DEVICE=cpu: accelerate
    would pick CUDA under the forced gloo backend for any GPU the workers can see."""
    assert {rank: env.get("CUDA_VISIBLE_DEVICES") for rank, env in fsdp_pretrained["envs"].items()} == {0: "", 1: ""}


@pytest.mark.slow
def test_fsdp2_reads_a_pretrained_model_on_rank0_only(fsdp_pretrained):
    """Rank 1 builds the model without weights and receives its shard from rank 0: up to the end
    of sharding its peak RSS stays well below rank 0's (which read the whole model), instead of
    both holding it (measured: ~800 vs ~1000 MB here, 920 vs 928 MB before). Rank 1 runs on a
    second "machine", where it is local rank 0: transformers' own rank-0 loading keys on the
    local rank, so only an explicit build without weights keeps every node but the first from
    reading the model."""
    run = fsdp_pretrained
    assert run["returncodes"] == [0, 0], run["log"][-6000:]
    size, peaks = run["model_bytes"], run["peaks"]
    assert size > 200e6
    assert peaks[0] - peaks[1] > 0.6 * size, (f"rank 0 peaked at {peaks[0] / 1e6:.0f} MB, rank 1 at "
                                              f"{peaks[1] / 1e6:.0f} MB, for a {size / 1e6:.0f} MB model")


# -- 4. a converted resume into a fused AdamW ------------------------------------------------------
@pytest.mark.parametrize("kind", ["fused", "capturable", "plain"])
def test_resumed_step_lives_where_the_optimizer_reads_it(kind):
    """resume.py sets every state's `step` by hand under ZeRO (no load_state_dict): fused and
    capturable AdamW read it in device code, so it must sit on the parameter's device as float32,
    as torch's load_state_dict would put it. The meta device stands in for a GPU: any device
    that is not the CPU shows where the tensor went."""
    import torch

    from train.checkpoint.resume import set_steps

    p = torch.nn.Parameter(torch.zeros(4, device="meta"))
    opt = torch.optim.AdamW([p], **({} if kind == "plain" else {kind: True}))
    opt.state[p].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
    set_steps(opt, 7)
    step = opt.state[p]["step"]
    want = torch.device("cpu") if kind == "plain" else p.device
    assert (step.device, step.dtype) == (want, torch.float32)
    if kind == "plain":
        assert step.item() == 7


# -- 7. DeepSpeed reduces and accumulates gradients in fp32, as DDP and FSDP2 -------------------
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("name", ["zero1", "zero2", "zero3", "zero3-offload"])
def test_deepspeed_reduces_and_accumulates_gradients_in_fp32(name, precision):
    """Read back by DeepSpeed's own config parser: what its engine will use. Without these keys it
    reduces and accumulates in the model's dtype (bf16/fp16), unlike DDP and FSDP2. ZeRO-1 in bf16
    is the one exception (fp32 accumulation swaps in DeepSpeed's BF16_Optimizer): it reduces in fp32."""
    import torch
    from deepspeed.runtime.config import DeepSpeedConfig

    from train.config import load_config
    from train.config.strategies import STRATEGIES
    from train.worker.accelerator import deepspeed_config

    cfg = load_config([f"STRATEGY={name}", f"PRECISION={precision}", "MICRO_BATCH=4"])
    for device in ("cpu", "cuda"):
        parsed = DeepSpeedConfig(deepspeed_config(STRATEGIES[name], cfg, 1, 1, 64, device))
        assert parsed.communication_data_type == torch.float32
        bf16_zero1 = name == "zero1" and precision == "bf16"
        assert parsed.grad_accum_dtype == (None if bf16_zero1 else "fp32")


def test_fp32_training_adds_no_dtype_keys():
    from train.config import load_config
    from train.config.strategies import STRATEGIES
    from train.worker.accelerator import deepspeed_config

    ds = deepspeed_config(STRATEGIES["zero2"], load_config(["STRATEGY=zero2", "PRECISION=no"]), 1, 1, 64, "cuda")
    assert "communication_data_type" not in ds and "data_types" not in ds


# -- 8. fp16: the loss scale and skipped steps in the metrics rows --------------------------------
def test_fp16_rows_carry_the_loss_scale_and_the_skipped_steps(tmp_path, capsys):
    """A run stuck at the minimum loss scale showed only grad_norm=inf. accelerate's GradScaler
    (handed over on CPU, as on a GPU) and a fused AdamW, one overflowed step then a finite one:
    each log row, and the loop's printed line, say the scale and how many steps were skipped."""
    import torch

    from train.config import load_config
    from train.checkpoint.saver import TrainState
    from train.worker.metrics import MetricsLog, MetricsWindow, loss_scale

    acc = fp16_accelerator("cpu")
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    model, opt, sched = acc.prepare(model, opt, sched)
    window = MetricsWindow(acc, load_config([]).log, 2, 1, 32, None, None, scale=lambda: loss_scale(acc, opt))
    log = MetricsLog(acc, str(tmp_path), 2, 0, progress=False)
    state, rows = TrainState(), []
    for inject_inf in (True, False):
        skipped = one_step(acc, model, opt, sched, inject_inf)
        window.add(torch.zeros(()), torch.zeros((), dtype=torch.long))
        if skipped:
            window.step_skipped()
        state.step += 1
        rows.append(window.record(state, 1e-2, torch.tensor(1.0), None))
        log.log(rows[-1])
    log.close()
    assert [(r["loss_scale"], r["skipped_steps"]) for r in rows] == [(2.0**15, 1), (2.0**15, 0)]
    printed = capsys.readouterr().out.splitlines()
    assert "loss_scale=3.277e+04 skipped_steps=1" in printed[0] and "skipped_steps=0" in printed[1]


def test_bf16_and_fp32_rows_have_no_loss_scale():
    """Without loss scaling (no `scale`) the rows stay as they were."""
    import torch

    from train.config import load_config
    from train.checkpoint.saver import TrainState
    from train.worker.metrics import MetricsWindow

    acc = fp16_accelerator("cpu")
    window = MetricsWindow(acc, load_config([]).log, 1, 1, 32, None, None)
    window.add(torch.zeros(()), torch.zeros((), dtype=torch.long))
    state = TrainState()
    state.step = 1
    assert "loss_scale" not in window.record(state, 1e-2, None, None)


# -- 10. the image's CPU ops are built for a portable target, not the build machine ---------------
PORTABLE = REPO / "docker" / "portable-cpu-ops.sh"


def test_deepspeeds_op_builder_made_portable_picks_avx2_on_any_build_machine(tmp_path):
    """The pinned DeepSpeed's own builder (op_builder/builder.py), rewritten by the image's script,
    then asked for its flags on this machine. Unrewritten it answers -march=native and, on a build
    machine with AVX-512, AVX-512 code: SIGILL on older nodes in zero3-offload."""
    import importlib.util

    import deepspeed.ops.op_builder.builder as installed

    shutil.copy(installed.__file__, tmp_path / "builder.py")
    p = subprocess.run([str(PORTABLE), str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    spec = importlib.util.spec_from_file_location("portable_op_builder", tmp_path / "builder.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)

    class CPUOp(builder.OpBuilder):  # what CPU Adam's builder asks (op_builder/cpu/builder.py cxx_args)
        def absolute_name(self):
            return "cpu_op"

        def sources(self):
            return []

    op = CPUOp("cpu_op")
    assert op.cpu_arch() == "-march=x86-64-v3"
    assert op.simd_width() in ("-D__AVX256__", "-D__SCALAR__")  # SCALAR: a build machine without AVX2
    # A second run finds nothing to rewrite and says so (a DeepSpeed that picks flags another way).
    again = subprocess.run([str(PORTABLE), str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "update docker/portable-cpu-ops.sh" in again.stderr


def test_both_image_flavours_build_cpu_ops_portably_and_check_for_avx512():
    """deps rewrites the installed builder (the CPU flavour's warm step and a run's JIT load then
    agree on the flags), ops-cuda rewrites DeepSpeed's source before its ahead-of-time build, and
    each op stage refuses a build holding AVX-512 (zmm) instructions."""
    args, stages = parse_dockerfile()
    assert (args["CPU_OPS_MARCH"], args["CPU_OPS_SIMD"]) == ("x86-64-v3", "AVX256")
    runs = {name: " ".join(r for w, r in stages[name]["body"] if w == "RUN") for name in ("deps", "ops-cpu", "ops-cuda")}
    deps = runs["deps"]
    assert deps.index("portable-cpu-ops") > deps.index('"deepspeed==${DEEPSPEED_VERSION}"')
    assert "/ops/op_builder" in deps
    cuda = runs["ops-cuda"]
    assert cuda.index("pip download") < cuda.index("portable-cpu-ops") < cuda.index("DS_BUILD_CPU_ADAM=1")
    assert '/tmp/ds/deepspeed-"${DEEPSPEED_VERSION}"' in cuda, "ops-cuda installs the rewritten source"
    for name in ("ops-cpu", "ops-cuda"):
        assert "objdump -d" in runs[name] and "grep -c zmm" in runs[name], f"{name} does not check for AVX-512"
        assert ("SHELL", '["/bin/bash", "-o", "pipefail", "-c"]') in stages[name]["body"]
    copies = [r for w, r in stages["deps"]["body"] if w == "COPY"]
    assert "docker/portable-cpu-ops.sh /usr/local/bin/portable-cpu-ops" in copies


# -- 11. the RTX 3090's peak is its fp32-accumulate tensor rate ----------------------------------
def test_rtx_3090_peak_is_the_fp32_accumulate_rate():
    """GeForce GA102 runs fp16/bf16 tensor math with fp32 accumulation (what training uses) at half
    its fp16-accumulate rate: 71 TFLOPS dense, not 142 (NVIDIA's GA102 whitepaper, table 9)."""
    from train.flops import peak_flops

    assert peak_flops("NVIDIA GeForce RTX 3090", "bf16") == peak_flops("NVIDIA GeForce RTX 3090", "fp16") == 71e12
    assert peak_flops("NVIDIA GeForce RTX 3090", "no") == 35.6e12


# -- 3. make venv's warm step finds the venv's ninja ----------------------------------------------
def test_make_venvs_warm_step_runs_the_venvs_ninja(tmp_path):
    """torch's JIT runs `ninja` from PATH (cpp_extension.is_ninja_available). `make venv` installs
    ninja into the venv, but a venv's bin is not on PATH unless activated: the warm step would
    then fail without a system ninja, or build with another version than the runs use. The warm
    line `make venv` runs, with the venv's python asked which ninja it gets, on a PATH that also
    holds another ninja (as /usr/bin here)."""
    venv, other = tmp_path / "venv", tmp_path / "system"
    for d, version in ((venv / "bin", "venv"), (other, "system")):
        d.mkdir(parents=True)
        (d / "ninja").write_text(f"#!/bin/sh\necho 1.11.1-{version}\n")
        (d / "ninja").chmod(0o755)
    (venv / "bin" / "python").symlink_to(sys.executable)  # the standard library is all the probe needs
    path = f"{other}:{os.environ['PATH']}"
    dry = subprocess.run(["make", "-n", "-f", str(REPO / "Makefile"), "venv", f"VENV={venv}"], cwd=REPO,
                         capture_output=True, text=True, timeout=60, env={**os.environ, "PATH": path})
    (warm,) = [ln for ln in dry.stdout.splitlines() if ln.endswith("-m train warm")]
    probe = warm.replace("-m train warm", "-c \"import subprocess; print(subprocess.check_output(['ninja', '--version'], text=True))\"")
    out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=60, env={**os.environ, "PATH": path})
    assert out.stdout.strip() == "1.11.1-venv", warm + "\n" + out.stdout + out.stderr


# -- TORCH=system: the stack on top of a torch the Python already has -------------------------------
def make_venv_dry(tmp_path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-n", "-f", str(REPO / "Makefile"), "venv", f"VENV={tmp_path / 'venv'}",
                           f"PYTHON={sys.executable}", *extra], cwd=REPO, capture_output=True, text=True, timeout=60)


def test_torch_system_keeps_the_pythons_torch_and_installs_around_it(tmp_path):
    """An NGC or cloud image's CUDA torch: the venv sees it (--system-site-packages), no torch is
    installed, and every later pip install is held to exactly that torch by a constraint."""
    lines = make_venv_dry(tmp_path, "TORCH=system").stdout.splitlines()
    assert any(ln.endswith(f"-m venv --system-site-packages {tmp_path / 'venv'}") for ln in lines)
    assert not [ln for ln in lines if "pip install" in ln and ln.endswith(" torch")]
    (held,) = [ln for ln in lines if ln.startswith("sed ")]
    script = held.replace(f"{tmp_path / 'venv'}/constraints.txt", str(tmp_path / "constraints.txt"))
    subprocess.run(["bash", "-c", script], cwd=REPO, check=True, timeout=60)
    import torch

    assert f"torch=={torch.__version__}\n" in (tmp_path / "constraints.txt").read_text()
    installs = [ln for ln in lines if "pip install" in ln and "pip>=24" not in ln]
    assert len(installs) == 2 and all(f"-c {tmp_path / 'venv'}/constraints.txt" in ln for ln in installs)


def test_torch_system_refuses_a_torch_outside_the_supported_range_in_one_line(tmp_path):
    """Checked from the installed distribution's metadata, without importing it (an old torch can
    fail to import with today's numpy); a fake torch 2.4.0 earlier on the path stands in for it."""
    dist = tmp_path / "site" / "torch-2.4.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.4.0\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    p = subprocess.run([sys.executable, "-m", "train", "info", "system-torch"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stdout == ""
    (line,) = p.stderr.splitlines()
    assert "torch 2.4.0" in line and "supported: 2.11 to 2.13.x" in line
    ok = subprocess.run([sys.executable, "-m", "train", "info", "system-torch"], cwd=REPO, capture_output=True,
                        text=True, timeout=60)
    assert ok.returncode == 0 and ok.stdout.strip().startswith("2.13.")


def test_a_misspelt_torch_choice_is_refused_before_anything_is_made(tmp_path):
    p = subprocess.run(["make", "-f", str(REPO / "Makefile"), "venv", f"VENV={tmp_path / 'venv'}", "TORCH=sytem"],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "TORCH=sytem: the one value is system" in p.stderr
    assert not (tmp_path / "venv").exists()
