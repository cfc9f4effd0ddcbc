"""What produced a checkpoint: code, image, packages, hardware, nodes, data and the resolved config.

Written into every checkpoint's manifest (``"provenance"``) and into ``final/provenance.json``,
printed at start in a few lines, shown for the current host by ``python -m train env``, compared
on resume (what changed is said out loud) and by ``python -m train verify`` (which replays).

Everything here is read from the machine as it is: git for the code (the image has no .git, so
the build writes ``build-info.json`` with the revision it was built from, see docker/Dockerfile),
package metadata for versions, the driver through ``nvidia-smi``, and the data files' contents.
Nothing here starts a process group; ``collect`` is cheap apart from hashing the data, which a
run does once, on rank 0.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import subprocess
from pathlib import Path
from typing import Any

from train.config import DataConfig, RunConfig, strategy_name
from train.config.strategies import REPO_ROOT

FILE = "provenance.json"  # in final/ (a checkpoint carries it in its manifest)
BUILD_INFO = "build-info.json"  # written into the image at build time (no .git there)
# The code that decides what a run computes; a change elsewhere (tests, docs) is not a dirty tree.
CODE_PATHS = ("train", "configs", "pyproject.toml", "constraints.txt")
PACKAGES = ("accelerate", "transformers", "datasets", "peft", "deepspeed", "tokenizers", "safetensors", "numpy")
MAX_LISTED_FILES = 10_000  # per-file hashes name a changed shard; beyond this only the total is kept
# Settings that say where and how a run is watched, not what it computes: never a "changed recipe".
NOT_RECIPE = ("output_dir", "checkpoint.", "log.", "preflight.", "launch.master_", "launch.node_rank",
              "launch.nnodes", "launch.timeout_s", "launch.max_restarts", "launch.hang_timeout_s", "launch.preflight",
              "launch.nproc_per_node", "train.max_steps", "train.until_step", "train.eval_", "data.num_workers",
              "data.cache_dir")


def _git(root: Path, *args: str) -> str | None:
    try:
        p = subprocess.run(["git", "-C", str(root), *args], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.stdout.decode(errors="replace") if p.returncode == 0 else None


def code_identity(root: Path = REPO_ROOT) -> dict[str, Any]:
    """The commit and whether the run's code differs from it (``dirty``, with a hash of the
    difference: tracked changes and untracked files under ``CODE_PATHS``)."""
    commit = _git(root, "rev-parse", "HEAD")
    if commit is None:
        info = build_info(root)
        if info.get("commit"):
            return {"commit": info["commit"], "dirty": info.get("dirty"), "diff_sha256": info.get("diff_sha256"),
                    "source": BUILD_INFO}
        return {"commit": None, "dirty": None, "diff_sha256": None, "source": "unknown (no git, no build info)"}
    paths = [p for p in CODE_PATHS if (root / p).exists()]
    h = hashlib.sha256()
    diff = _git(root, "diff", "HEAD", "--binary", "--", *paths) or ""
    h.update(diff.encode())
    untracked = sorted((_git(root, "ls-files", "--others", "--exclude-standard", "--", *paths) or "").splitlines())
    for rel in untracked:
        h.update(rel.encode() + b"\0")
        f = root / rel
        # A link is its target (a link to a folder must not be read as a file).
        h.update((os.readlink(f) if f.is_symlink() else _file_sha256(f) if f.is_file() else "").encode())
    dirty = bool(diff or untracked)
    return {"commit": commit.strip(), "dirty": dirty, "diff_sha256": h.hexdigest()[:16] if dirty else None,
            "source": "git"}


def build_info(root: Path = REPO_ROOT) -> dict[str, Any]:
    try:
        return json.loads((root / BUILD_INFO).read_text())
    except (OSError, ValueError):
        return {}


def image_identity() -> dict[str, Any] | None:
    """The image this runs in: what its build recorded, and the reference/digest the deployment
    passes in (``TRAIN_IMAGE_REF``, ``TRAIN_IMAGE_DIGEST``: a container cannot see its own digest).
    None outside an image."""
    info = build_info()
    ref, digest = os.environ.get("TRAIN_IMAGE_REF"), os.environ.get("TRAIN_IMAGE_DIGEST")
    if not info and not ref and not digest:
        return None
    return {"ref": ref, "digest": digest, "build": info or None}


def packages() -> dict[str, str | None]:
    """Versions of everything that changes the numbers: from package metadata (importing
    DeepSpeed to ask would take seconds) and torch's own view of CUDA, cuDNN and NCCL."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    out: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__,
                                  "cuda": torch.version.cuda, "cudnn": None, "nccl": None}
    if torch.backends.cudnn.is_available():
        out["cudnn"] = str(torch.backends.cudnn.version())
    if torch.cuda.is_available():
        try:
            out["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except (AttributeError, RuntimeError):
            pass
    for pkg in PACKAGES:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def hardware(device: str | None = None) -> dict[str, Any]:
    import torch

    cpu = next((ln.split(":", 1)[1].strip() for ln in _read("/proc/cpuinfo").splitlines()
                if ln.startswith("model name")), platform.processor() or platform.machine())
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {"device": device or ("cuda" if gpus else "cpu"), "gpu": sorted(set(gpus)) or None,
            "gpus": len(gpus), "driver": _driver() if gpus else None, "cpu": cpu}


def _driver() -> str | None:
    try:
        p = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.stdout.splitlines()[0].strip() if p.returncode == 0 and p.stdout.strip() else None


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):  # streaming: shards may be large
            h.update(chunk)
    return h.hexdigest()


def data_identity(cfg: DataConfig, deep: bool = False) -> dict[str, Any]:
    """What the run trains from: for files, a hash over every file's name and content (and each
    file's own hash, which names a changed shard); for a hub dataset, its id (the hub's own
    revision is not known offline).

    A prepared directory is identified by its manifest, which holds each shard file's sha256 from
    when it was written: reading it costs the same for 10 MB and 10 GB, so start-up stays flat in
    corpus size. ``deep`` (``verify``) hashes the shard files again, so a shard changed after
    prepare shows up as a file whose content no longer has the recorded hash."""
    import dataclasses

    from train.data import resolve_source
    from train.data.loader import parse_mixture
    from train.data.shards import is_prepared

    if cfg.mixture:  # each source's identity, its files named under the source
        parts = [(name, data_identity(dataclasses.replace(cfg, dataset=name, mixture=""), deep))
                 for name, _ in parse_mixture(cfg.mixture)]
        total = hashlib.sha256("".join(f"{n}\0{d.get('sha256')}\0" for n, d in parts).encode())
        return {"source": cfg.mixture, "kind": "mixture", "sha256": total.hexdigest(),
                "files": {f"{n}/{rel}": h for n, d in parts for rel, h in (d.get("files") or {}).items()}}
    from train.storage import is_remote

    if is_remote(cfg.dataset):  # a prepared directory in a bucket: its manifest holds every shard's sha256
        from train.data.remote import read_remote_manifest

        return _manifest_identity(read_remote_manifest(cfg.dataset), cfg.dataset, None)  # (verify: the recorded hashes)
    if is_prepared(Path(cfg.dataset)):
        return _prepared_identity(Path(cfg.dataset), deep)
    else:
        _, kwargs = resolve_source(cfg.dataset, cfg.dataset_config)
        if "data_files" not in kwargs:
            return {"source": cfg.dataset, "kind": "hub", "config": cfg.dataset_config or None, "sha256": None}
        files = kwargs["data_files"]["train"]
        files = [Path(f) for f in ([files] if isinstance(files, str) else files)]
        base = Path(cfg.dataset) if Path(cfg.dataset).is_dir() else files[0].parent
    total, per_file, size = hashlib.sha256(), {}, 0
    for f in files:
        rel = str(f.relative_to(base)) if f.is_relative_to(base) else f.name
        digest = _file_sha256(f)
        total.update(rel.encode() + b"\0" + digest.encode())
        size += f.stat().st_size
        if len(per_file) < MAX_LISTED_FILES:
            per_file[rel] = digest
    return {"source": cfg.dataset, "kind": "files", "sha256": total.hexdigest(), "bytes": size,
            "files": per_file}


def _prepared_identity(path: Path, deep: bool) -> dict[str, Any]:
    from train.data.shards import MANIFEST

    return _manifest_identity((path / MANIFEST).read_bytes(), str(path), path if deep else None)


def _manifest_identity(raw: bytes, source: str, rehash: Path | None) -> dict[str, Any]:
    """A prepared corpus's identity from its manifest; with ``rehash``, its files hashed again there."""
    manifest = json.loads(raw)
    suffixes = {key: spec["suffix"] for key, spec in manifest["arrays"].items()}
    recorded = {shard["name"] + suffixes[key]: digest for shard in manifest["shards"]
                for key, digest in shard.get("sha256", {}).items()}
    files = {rel: (_file_sha256(rehash / rel) if rehash else digest) for rel, digest in recorded.items()}
    listed = dict(list(files.items())[:MAX_LISTED_FILES])
    return {"source": source, "kind": "prepared", "sha256": hashlib.sha256(raw).hexdigest(),
            "content_sha256": hashlib.sha256("".join(f"{k}\0{v}\0" for k, v in sorted(files.items())).encode()).hexdigest(),
            "tokens": sum(shard["tokens"] for shard in manifest["shards"]), "files": listed}


def constraints_sha256(root: Path = REPO_ROOT) -> str | None:
    path = root / "constraints.txt"
    return _file_sha256(path)[:16] if path.is_file() else None


def host(cfg: RunConfig | None = None, device: str | None = None) -> dict[str, Any]:
    """This machine's side of the provenance (no data, no run): what ``env`` shows and ``verify`` compares."""
    return {"code": code_identity(), "image": image_identity(), "constraints_sha256": constraints_sha256(),
            "packages": packages(), "hardware": hardware(device)}


def collect(cfg: RunConfig, world_size: int, hosts: list[str], device: str,
            data: dict[str, Any] | None = None) -> dict[str, Any]:
    """The whole record for a run: this host, the nodes (``hosts``: each rank's hostname), the
    data's identity and the resolved config (credentials masked)."""
    return {**host(cfg, device), "nodes": {"world_size": world_size, "hosts": hosts},
            "strategy": strategy_name(cfg.launch), "data": data if data is not None else data_identity(cfg.data),
            "config": cfg.redacted()}


def hostname() -> str:
    return socket.gethostname()


# -- saying it -----------------------------------------------------------------------------------
def _short(commit: str | None) -> str:
    return commit[:12] if commit else "unknown"


def code_line(code: dict) -> str:
    if not code or not code.get("commit"):
        return "unknown commit"
    dirty = f" + uncommitted changes (diff {code['diff_sha256']})" if code.get("dirty") else " (clean)"
    return _short(code["commit"]) + dirty


def summary(prov: dict) -> list[str]:
    """A few lines for the start of a run and for ``env``."""
    pk, hw = prov.get("packages", {}), prov.get("hardware", {})
    image = prov.get("image")
    lines = [f"code {code_line(prov.get('code', {}))}; image "
             + (f"{image.get('ref') or '?'} {image.get('digest') or ''} (built from "
                f"{_short((image.get('build') or {}).get('commit'))})" if image else "none (not in an image)"),
             "packages " + " ".join(f"{k}={v}" for k, v in pk.items() if v)
             + f"; constraints.txt {prov.get('constraints_sha256')}",
             f"hardware {hw.get('device')}: " + (f"{hw.get('gpus')}x {', '.join(hw.get('gpu') or [])} driver "
                                                 f"{hw.get('driver')}" if hw.get("gpu") else f"{hw.get('cpu')}")]
    nodes = prov.get("nodes")
    if nodes:
        hosts = nodes.get("hosts") or []
        lines.append(f"nodes {len(set(hosts))} ({', '.join(sorted(set(hosts)))}), world size {nodes.get('world_size')}")
    data = prov.get("data")
    if data:
        what = (f"sha256 {data['sha256'][:16]} over {len(data.get('files', {}))} file(s), {data.get('bytes')} bytes"
                if data.get("sha256") else "hub dataset, not hashed")
        lines.append(f"data {data.get('source')}: {what}")
    return lines


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def config_changes(old: dict, new: dict) -> list[str]:
    """Settings that change what a run computes, old -> new (where it is written or watched does not count)."""
    a, b = _flat(old or {}), _flat(new or {})
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and not k.startswith(NOT_RECIPE)]


def differences(old: dict | None, new: dict, parts: tuple[str, ...] = ("code", "image", "packages", "constraints",
                                                                       "hardware", "data", "config")) -> list[str]:
    """What differs between two provenance records, one line per difference, named by field
    (``old`` is the checkpoint's; ``new`` this run's or this host's)."""
    if not old:
        return ["provenance: the checkpoint records none (written before provenance existed)"]
    out = []
    if "code" in parts:
        oc, nc = old.get("code") or {}, new.get("code") or {}
        if oc.get("commit") != nc.get("commit"):
            out.append(f"code: commit {_short(oc.get('commit'))} -> {_short(nc.get('commit'))}")
        if (oc.get("dirty"), oc.get("diff_sha256")) != (nc.get("dirty"), nc.get("diff_sha256")):
            out.append(f"code: uncommitted changes {_dirt(oc)} -> {_dirt(nc)}")
    if "image" in parts and (old.get("image") or None) != (new.get("image") or None):
        out.append(f"image: {_image(old.get('image'))} -> {_image(new.get('image'))}")
    if "packages" in parts:
        op, np_ = old.get("packages") or {}, new.get("packages") or {}
        out += [f"package {k}: {op.get(k)} -> {np_.get(k)}" for k in sorted(set(op) | set(np_)) if op.get(k) != np_.get(k)]
    if "constraints" in parts and old.get("constraints_sha256") != new.get("constraints_sha256"):
        out.append(f"constraints.txt: {old.get('constraints_sha256')} -> {new.get('constraints_sha256')}")
    if "hardware" in parts:
        oh, nh = old.get("hardware") or {}, new.get("hardware") or {}
        out += [f"hardware {k}: {oh.get(k)} -> {nh.get(k)}" for k in ("device", "gpu", "gpus", "driver", "cpu")
                if oh.get(k) != nh.get(k)]
    if "data" in parts:
        out += data_changes(old.get("data"), new.get("data"))
    if "config" in parts:
        out += [f"config {c}" for c in config_changes(old.get("config"), new.get("config"))]
    return out


def _dirt(code: dict) -> str:
    return f"diff {code.get('diff_sha256')}" if code.get("dirty") else "none" if code.get("dirty") is False else "unknown"


def caveats(prov: dict) -> list[str]:
    """What makes a record weaker than it looks, whatever the host (said by verify)."""
    code = prov.get("code") or {}
    out = []
    if code.get("dirty"):
        out.append(f"the checkpoint was written from a dirty tree (uncommitted changes, diff {code.get('diff_sha256')}): "
                   f"commit {_short(code.get('commit'))} alone does not reproduce it")
    if not code.get("commit"):
        out.append("the checkpoint does not know its code's commit")
    if (prov.get("data") or {}).get("kind") == "hub":
        out.append("the data is a hub dataset: its contents were not hashed")
    return out


def data_changes(old: dict | None, new: dict | None) -> list[str]:
    """The changed, missing and new files of the data, by name (or the total, past MAX_LISTED_FILES)."""
    key = "content_sha256" if old and new and "content_sha256" in old and "content_sha256" in new else "sha256"
    if not old or not new or old.get(key) == new.get(key):
        return []
    if old.get("source") != new.get("source"):
        return [f"data: source {old.get('source')} -> {new.get('source')}"]
    of, nf = old.get("files") or {}, new.get("files") or {}
    named = [f"data: {rel} changed (sha256 {of[rel][:12]} -> {nf[rel][:12]})" for rel in sorted(of) if rel in nf and of[rel] != nf[rel]]
    named += [f"data: {rel} is missing" for rel in sorted(set(of) - set(nf))]
    named += [f"data: {rel} is new" for rel in sorted(set(nf) - set(of))]
    return named or [f"data: {old.get('source')} sha256 {str(old.get('sha256'))[:16]} -> {str(new.get('sha256'))[:16]}"]


def _image(image: dict | None) -> str:
    if not image:
        return "none"
    build = image.get("build") or {}
    return f"{image.get('ref') or '?'}@{image.get('digest') or '?'} (built from {_short(build.get('commit'))})"


def build_args() -> str:
    """``docker build`` flags that record this checkout's code identity in the image
    (docker/docker.mk passes them; the Dockerfile writes build-info.json and a revision label)."""
    code = code_identity()
    return (f"--build-arg GIT_COMMIT={code['commit'] or ''} --build-arg GIT_DIRTY={str(bool(code['dirty'])).lower()} "
            f"--build-arg GIT_DIFF_SHA256={code['diff_sha256'] or ''}")


if __name__ == "__main__":
    print(build_args())
