"""Storage the run writes: OUTPUT_DIR writable and large enough for its checkpoints, the Hugging
Face cache writable, and (across nodes) OUTPUT_DIR the same volume on every node."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

from train.config import ConfigError, RunConfig, selected_strategy
from train.launcher.preflight.group import Group
from train.launcher.preflight.report import FAIL, OK, SKIP, WARN, Check, Report
from train.memory import human
from train.storage import is_remote, location, probe, work_dir


def checks(cfg: RunConfig, nproc: int, device: str) -> list[Check]:
    return [_output_dir_writable(cfg), _disk(cfg), _hf_cache(cfg), *_bucket(cfg)]


def _bucket(cfg: RunConfig) -> list[Check]:
    """An object-store OUTPUT_DIR written, read back and deleted from this node: credentials and
    endpoints are per node (a pod's Secret or workload identity), so each node is asked."""
    if not is_remote(cfg.output_dir):
        return []
    problem = probe(cfg.output_dir)
    need = "write, read and delete objects"
    if problem is None:
        return [Check("object-storage", f"{cfg.output_dir} usable", need, OK)]
    return [Check("object-storage", problem, need, FAIL, _BUCKET_FIX)]


_BUCKET_FIX = ("give every node the bucket's credentials and endpoint (AWS_* / AWS_ENDPOINT_URL, or the cluster's "
               "workload identity; docs/object-storage.md): a node that cannot write it loses its shards of every "
               "checkpoint")


def _try_write(directory: Path) -> str | None:
    """None if ``directory`` can be created and a file written (and synced) in it; else why not."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".preflight-write-") as f:
            f.write(b"preflight")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return f"{errno.errorcode.get(e.errno, type(e).__name__)}: {e.strerror or e}"
    return None


def _permission_fix(what: str) -> str:
    # The manifests already set fsGroup; what defeats it is the volume (docs/kubernetes.md, "Storage").
    return (f"{what} must be writable by uid {os.getuid()} gid {os.getgid()} on every node: Kubernetes: the "
            "pod's fsGroup is set, so the volume refused it: an NFS/Filestore export with root_squash (the "
            "kubelet's chown fails silently: export with no_root_squash or chown the share once to "
            f"{os.getuid()}:{os.getgid()}), an EFS access point with another uid/gid (the class's uid/gid "
            "parameters), Azure Files mountOptions with another uid; docker: chown the host directory to the "
            "container's UID:GID")


def _output_dir_writable(cfg: RunConfig) -> Check:
    path = work_dir(cfg)  # OUTPUT_DIR, or the scratch a URL's checkpoints are staged in
    err = _try_write(path)
    if err is None:
        return Check("output-dir", f"{path} writable", "writable", OK)
    fix = ("free space on that volume" if err.startswith("ENOSPC") else _permission_fix("OUTPUT_DIR"))
    return Check("output-dir", f"{path}: {err}", f"writable by uid {os.getuid()} gid {os.getgid()}", FAIL, fix)


def checkpoint_bytes(cfg: RunConfig) -> int:
    """Bytes of one checkpoint of this run, all ranks together: the planner's parameters, Adam
    moments and (DeepSpeed) fp32 master copy at world size 1 (the shards sum to the whole)."""
    from train.config.strategies import OPTIM, PARAMS
    from train.memory import held_bytes, model_shape
    from train.worker.model import load_model_config

    shape = model_shape(load_model_config(cfg), cfg.model.name, cfg.model.trust_remote_code)
    held = held_bytes(selected_strategy(cfg.launch) or "ddp", shape.params, 1, cfg.train.precision)
    return held[PARAMS] + held[OPTIM] + held["master"]


def _existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _disk(cfg: RunConfig) -> Check:
    n = cfg.preflight.disk_checkpoints
    try:
        one = checkpoint_bytes(cfg)
    except (ConfigError, OSError, ValueError) as e:
        return Check("disk", "checkpoint size unknown", f"{n} checkpoints", SKIP, f"the planner could not size the model: {e}")
    need = n * one
    free = shutil.disk_usage(_existing(work_dir(cfg))).free
    threshold = f">= {human(need)} = {need} bytes ({n} checkpoints x {human(one)})"
    value = f"{human(free)} = {free} bytes free"
    if free >= need:
        return Check("disk", value, threshold, OK, measured=free, limit=need)
    return Check("disk", value, threshold, FAIL,
                 f"free space on the OUTPUT_DIR volume or point OUTPUT_DIR at one with >= {human(need)} free "
                 f"(checkpoint.keep={cfg.checkpoint.keep} keeps that many, plus one being written)", free, need)


def _from_hub(name: str) -> bool:
    from train.worker.model import is_preset

    return bool(name) and not is_preset(name) and not name.startswith("builtin:") and not Path(name).exists()


def _hf_cache(cfg: RunConfig) -> Check:
    from huggingface_hub import constants

    path = Path(constants.HF_HUB_CACHE)
    err = _try_write(path)
    if err is None:
        return Check("hf-cache", f"{path} writable", "writable", OK)
    downloads = [n for n in (cfg.model.name, cfg.model.tokenizer, cfg.data.dataset) if _from_hub(n)]
    verdict = FAIL if downloads else WARN
    need = f"writable (downloads {', '.join(downloads)})" if downloads else "writable (nothing to download)"
    fix = ("set HF_HOME to a writable directory (in Kubernetes on the shared volume, e.g. /data/hf-cache), or "
           + _permission_fix("HF_HOME"))
    return Check("hf-cache", f"{path}: {err}", need, verdict, fix)


def shared_storage(cfg: RunConfig, group: Group, device: str, hosts: dict, report: Report) -> list[Check]:
    """Every node writes a nonce file into OUTPUT_DIR; every node must read everyone's."""
    out, me, n = location(cfg.output_dir), group.me, group.n  # a bucket too: every node must read and write it
    tag = group.share("tag", uuid.uuid4().hex[:12])[0]  # node 0's names this launch's files
    nonce = uuid.uuid4().hex

    def path(j: int):
        return out / f".preflight-{tag}-node{j}"

    try:
        path(me).write_text(nonce)
    except OSError:
        pass  # then nobody sees this node's file: named below
    nonces = group.share("nonce", nonce)

    def sees(j: int) -> bool:
        try:
            return path(j).read_text() == nonces[j]
        except OSError:
            return False

    # NFS may show another client's new file only after its attribute cache expires: retry a while.
    deadline = time.monotonic() + cfg.preflight.shared_wait_s
    seen = [sees(j) for j in range(n)]
    while not all(seen) and time.monotonic() < deadline:
        time.sleep(0.2)
        seen = [s or sees(j) for j, s in enumerate(seen)]
    views = [json.loads(v) for v in group.share("seen", json.dumps(seen))]
    path(me).unlink(missing_ok=True)
    fix = (_BUCKET_FIX if not isinstance(out, Path) else
           "mount the same ReadWriteMany volume (NFS, CephFS, Lustre, ...) at OUTPUT_DIR on every node; with a "
           "per-node disk each node writes its own half of every checkpoint and resume breaks later")
    checks = []
    for j in range(n):
        if j == 0 or (views[j][0] and views[0][j]):
            value = f"{out} holds every node's file" if all(views[j]) else f"{out} holds node 0's file"
            checks.append(Check("shared-storage", value, "the same OUTPUT_DIR on every node", OK, node=j, host=hosts[j]))
        else:
            checks.append(Check("shared-storage",
                                f"OUTPUT_DIR is not shared: node {j} (host {hosts[j]}) sees a different directory "
                                f"than node 0 at {out}", "the same OUTPUT_DIR on every node", FAIL, fix,
                                node=j, host=hosts[j]))
    return checks

