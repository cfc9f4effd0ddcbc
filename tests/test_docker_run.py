"""The CPU image, built for real and trained in through compose: what CI proves about docker/.

Needs a Docker engine: `.ci/run` starts one (`bash .ci/docker.sh start`, then
`eval "$(bash .ci/docker.sh env)"` exports DOCKER_HOST, DOCKER, TRAINER_LOCAL_BASE and
TORCH_WHEEL). Under CI=true a missing engine FAILS this module; elsewhere it is skipped.

The image is built by the same make target users run (`docker-image-cpu`) on a base made
locally with debootstrap (no registry here), and the job is started by `make compose-cpu-up`
with compose/compose.yaml + compose/compose.cpu.yaml, in a compose project of its own so a
user's `trainer` volumes are never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import compose_bin, constraint, env_example, free_port, parse_dockerfile


def dockerfile_args() -> dict:
    return parse_dockerfile()[0]

pytestmark = [pytest.mark.docker, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
IMAGE, TAG = "trainer-ci", "test"
REF = f"{IMAGE}:{TAG}-cpu"
PROJECT = f"trainer-ci-{os.getpid()}"
RUN_NAME = "ci"
STEPS = 4
BUILD_TIMEOUT = 1800  # cold: ~4-7 min on 2 cores (the DeepSpeed CPU op JIT build dominates)
RUN_TIMEOUT = 600


def _docker_client() -> str | None:
    # Debian's docker.io client builds with BuildKit; a newer client without buildx does not.
    return os.environ.get("DOCKER") or ("/usr/bin/docker" if Path("/usr/bin/docker").exists()
                                         else shutil.which("docker"))


def sh(cmd: list[str], timeout: float, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, **(env or {})})
    if check and p.returncode != 0:
        raise AssertionError(f"`{' '.join(cmd)}` exited {p.returncode}\n--- stdout (tail)\n{p.stdout[-6000:]}\n"
                             f"--- stderr (tail)\n{p.stderr[-6000:]}")
    return p


@pytest.fixture(scope="module")
def docker() -> str:
    client = _docker_client()
    reason = "no docker client on PATH" if not client else None
    if client:
        p = subprocess.run([client, "version", "--format", "{{.Server.Version}}"],
                           capture_output=True, text=True, timeout=30)
        if p.returncode != 0:
            reason = (f"no Docker engine answers at DOCKER_HOST={os.environ.get('DOCKER_HOST', '(default)')}: "
                      f"{p.stderr.strip()[-300:]}")
    if reason:
        hint = 'start one: bash .ci/docker.sh start && eval "$(bash .ci/docker.sh env)"'
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}. CI must build and run the image; {hint}")
        pytest.skip(f"{reason}; {hint}")
    return client


@pytest.fixture(scope="module")
def report(request):
    """Measurements (build time, image size) printed in the test log."""
    capture = request.config.pluginmanager.getplugin("capturemanager")

    def write(line: str) -> None:
        with capture.global_and_fixture_disabled():
            print(f"\n[docker] {line}", flush=True)

    return write


@pytest.fixture(scope="module")
def local_base(docker) -> str:
    """The CPU flavour's base, made locally (debootstrap + host CA bundle → docker import)."""
    name = os.environ.get("TRAINER_LOCAL_BASE", "localbase:bookworm")
    if sh([docker, "image", "inspect", name], 30, check=False).returncode != 0:
        sh(["bash", "docker/ci/engine.sh", "base"], 600, env={"LOCAL_BASE": name})
    return name


def make_vars(docker: str, local_base: str) -> list[str]:
    wheel = os.environ.get("TORCH_WHEEL", "")
    if not wheel:  # a find-links folder with the CPU wheel, as on the dev machines
        version = constraint("torch")
        for d in os.environ.get("PIP_FIND_LINKS", "").split() + ["/opt/wheels"]:
            found = sorted(Path(d).glob(f"torch-{version}+cpu-*.whl")) if Path(d).is_dir() else []
            if found:
                wheel = str(found[0])
                break
    makefile = "Makefile" if "docker/docker.mk" in (REPO / "Makefile").read_text() else "docker/docker.mk"
    out = ["-f", makefile, f"DOCKER={docker}", f"COMPOSE={' '.join(compose_bin())}",
           f"TRAINER_IMAGE={IMAGE}", f"TRAINER_TAG={TAG}",
           # Builds that download need the host network here (the engine runs without a bridge).
           f"DOCKER_BUILD_FLAGS=--network host --progress plain --build-arg CPU_IMAGE={local_base}"]
    return out + ([f"TORCH_WHEEL={wheel}"] if wheel else [])


@pytest.fixture(scope="module")
def image(docker, local_base, report) -> str:
    t0 = time.monotonic()
    sh(["make", "--no-print-directory", "docker-image-cpu", *make_vars(docker, local_base)], BUILD_TIMEOUT)
    size = json.loads(sh([docker, "image", "inspect", REF], 30).stdout)[0]["Size"]
    report(f"built {REF} in {time.monotonic() - t0:.0f} s, {size / 1e9:.2f} GB")
    return REF


@pytest.fixture(scope="module")
def trained(docker, local_base, image, tmp_path_factory, report):
    """One real job: `make compose-cpu-up` with a small model, 2 ranks, ddp over gloo."""
    env_file = tmp_path_factory.mktemp("compose") / "ci.env"
    # MAX_STEPS in the file is overridden on make's command line, as with `make train`.
    settings = {**env_example(), "STRATEGY": "ddp", "NPROC": "2", "MAX_STEPS": str(STEPS - 1), "LOG_EVERY": "1",
                "CHECKPOINT_EVERY": "2", "MODEL": "llama-debug", "SEQ_LEN": "32", "MICRO_BATCH": "4",
                "RUN_NAME": RUN_NAME, "TENSORBOARD_PORT": str(free_port())}
    env_file.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
    project = {"COMPOSE_PROJECT_NAME": PROJECT}
    t0 = time.monotonic()
    try:
        up = sh(["make", "--no-print-directory", "compose-cpu-up", f"ENV_FILE={env_file}", f"MAX_STEPS={STEPS}",
                 *make_vars(docker, local_base)], BUILD_TIMEOUT + RUN_TIMEOUT, env=project, check=False)
        report(f"compose-cpu-up ({STEPS} steps, 2 ranks) took {time.monotonic() - t0:.0f} s, exit {up.returncode}")
        yield {"up": up, "env_file": env_file, "settings": settings, "project": project}
    finally:
        sh([*compose_bin(), "-f", "compose/compose.yaml", "-f", "compose/compose.cpu.yaml",
            "down", "--volumes", "--remove-orphans"], 120,
           env={**project, "TRAINER_ENV_FILE": str(env_file), "TRAINER_IMAGE": IMAGE, "TRAINER_TAG": TAG},
           check=False)


def volume_listing(docker: str) -> dict:
    """Files in the run's output volume, read from a fresh container that mounts it."""
    script = (
        "import json, os, sys\n"
        f"root = '/outputs/{RUN_NAME}'\n"
        "files = {os.path.relpath(os.path.join(d, f), root): os.stat(os.path.join(d, f))\n"
        "         for d, _, fs in os.walk(root) for f in fs}\n"
        "rows = [json.loads(l) for l in open(os.path.join(root, 'metrics.jsonl'))]\n"
        "print(json.dumps({'files': {k: [s.st_uid, s.st_size] for k, s in files.items()}, 'metrics': rows}))\n"
    )
    p = sh([docker, "run", "--rm", "--network", "none", "-v", f"{PROJECT}_outputs:/outputs:ro",
            "--entrypoint", "python", REF, "-c", script], 120)
    return json.loads(p.stdout)


def test_compose_cpu_stack_trains_and_exports_the_model_as_non_root(docker, trained):
    up = trained["up"]
    assert up.returncode == 0, f"make compose-cpu-up failed:\n{up.stdout[-8000:]}\n{up.stderr[-8000:]}"
    log = up.stdout + up.stderr
    assert "world_size=2" in log, "the job must engage 2 ranks (gloo) inside one container"
    out = volume_listing(docker)
    files, metrics = out["files"], out["metrics"]
    final = {"final/model.safetensors", "final/config.json", "final/tokenizer.json"}
    assert final <= files.keys(), f"export missing from the outputs volume: {sorted(files)}"
    assert files["final/model.safetensors"][1] > 100_000, "exported weights are suspiciously small"
    owners = {uid for uid, _ in files.values()}
    assert owners == {1000}, f"outputs must be written by the image's non-root user (uid 1000), got {owners}"
    steps = [r["step"] for r in metrics if "loss" in r]
    assert steps and max(steps) == STEPS, f"metrics.jsonl steps: {steps} (make's MAX_STEPS={STEPS} must win)"
    assert any(k.startswith("checkpoints/") for k in files), "CHECKPOINT_EVERY=2 wrote no checkpoint"


def test_tensorboard_serves_the_run_from_the_shared_volume(trained):
    url = f"http://127.0.0.1:{trained['settings']['TENSORBOARD_PORT']}/data/runs"
    deadline, last = time.monotonic() + 90, None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                runs = json.loads(r.read())
            if any(run.startswith(f"{RUN_NAME}/") for run in runs):
                return
            last = runs
        except OSError as e:
            last = e
        time.sleep(2)
    pytest.fail(f"TensorBoard at {url} did not list the run: {last}")


def test_docker_env_prints_what_the_container_sees(docker, local_base, trained):
    p = sh(["make", "--no-print-directory", "docker-cpu-env", f"ENV_FILE={trained['env_file']}",
            *make_vars(docker, local_base)], 300, env=trained["project"])
    text = p.stdout
    for expected in ("torch", constraint("torch"), "nvidia-smi not present", "op name", "cpu_adam",
                     "/dev/shm", "memlock", "user trainer (1000:1000)"):
        assert expected in text, f"`make docker-cpu-env` output lacks {expected!r}:\n{text[-4000:]}"


def test_image_metadata_records_versions_and_runs_non_root(docker, image, report):
    cfg = json.loads(sh([docker, "image", "inspect", image], 30).stdout)[0]
    labels = cfg["Config"]["Labels"]
    assert labels["train.torch.version"] == constraint("torch")
    assert labels["train.deepspeed.version"] == constraint("deepspeed")
    assert (labels["train.flavour"], labels["train.cuda.version"], labels["train.nccl.version"]) == ("cpu", "none", "none")
    assert cfg["Config"]["User"] == "1000:1000"
    assert cfg["Config"]["Entrypoint"] == ["python", "-m", "train"] and cfg["Config"]["Cmd"] == ["launch"]
    assert {"/outputs", "/cache/huggingface"} <= set(cfg["Config"]["Volumes"])
    # A CUDA torch sneaking into the CPU image: asked of torch itself and of the installed
    # distributions (CUDA wheels pull nvidia-* packages), and bounded by size (they add several GB;
    # the CPU image is ~2.7 GB with lm-eval's scipy/scikit-learn).
    probe = ("import importlib.metadata as m, torch; print(torch.version.cuda, "
             "sorted(d.metadata['Name'] for d in m.distributions() if d.metadata['Name'].lower().startswith('nvidia')))")
    out = sh([docker, "run", "--rm", "--entrypoint", "python", image, "-c", probe], 120).stdout.strip()
    assert out == "None []", f"CPU image has CUDA: {out}"
    assert cfg["Size"] < 3.2e9, f"CPU image is {cfg['Size'] / 1e9:.2f} GB"


def test_model_compile_trains_in_the_image(docker, image, report):
    """model.compile=true inside the image: Inductor compiles C++ kernels on CPU, which needs the
    compiler and Python headers the runtime stage installs (the CUDA flavour needs the same for
    Triton's launcher). One process, one step of llama-debug, no eval (each eval graph would be
    one more compile: ~4-6 min on 2 busy cores as it is); Inductor's cache must hold kernels."""
    script = ("python -m train launch MODEL=llama-debug SEQ_LEN=32 MICRO_BATCH=2 NPROC=1 DEVICE=cpu MAX_STEPS=1 "
              "LOG_EVERY=1 CHECKPOINT_EVERY=0 RESUME=never OUTPUT_DIR=/tmp/run model.compile=true "
              "checkpoint.export=false train.eval_every=0 log.trackers=none log.progress=false "
              "&& find /tmp/inductor -name '*.so' | wc -l")
    t0 = time.monotonic()
    p = sh([docker, "run", "--rm", "--network", "none", "-e", "TORCHINDUCTOR_CACHE_DIR=/tmp/inductor",
            "--entrypoint", "bash", image, "-c", script], RUN_TIMEOUT, check=False)
    report(f"model.compile=true, 1 step in the CPU image took {time.monotonic() - t0:.0f} s, exit {p.returncode}")
    assert p.returncode == 0, f"compiled run failed:\n{p.stdout[-4000:]}\n{p.stderr[-6000:]}"
    assert "step=1 loss=" in p.stdout + p.stderr
    kernels = int(p.stdout.strip().splitlines()[-1])
    assert kernels > 0, "Inductor built no C++ kernels: the model was not compiled"


def test_cuda_flavour_labels_with_a_stand_in_base(docker, local_base):
    """The CUDA base cannot be pulled here; stand the local base in for it and build the label
    stage, so the labels the CUDA image will carry come from the real build args."""
    ref = f"{IMAGE}:{TAG}-cuda-labels"
    sh([docker, "build", "-f", "docker/Dockerfile", "--target", "runtime-base-cuda",
        "--build-arg", "FLAVOUR=cuda", "--build-arg", f"CUDA_RUNTIME_IMAGE={local_base}", "-t", ref, "."],
       300, env={"DOCKER_BUILDKIT": "1"})
    try:
        labels = json.loads(sh([docker, "image", "inspect", ref], 30).stdout)[0]["Config"]["Labels"]
    finally:
        sh([docker, "rmi", ref], 60, check=False)
    args = dockerfile_args()
    assert labels["train.cuda.version"] == args["CUDA_VERSION"]
    assert labels["train.nccl.version"] == args["NCCL_VERSION"]
    assert labels["train.torch.cuda-arch-list"] == args["TORCH_CUDA_ARCH_LIST"]
