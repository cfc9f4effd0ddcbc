"""Portable checkpoints: one strategy-independent form, read from any native checkpoint.

The portable form is full fp32 tensors keyed by parameter name - the weight, Adam's
``exp_avg`` and ``exp_avg_sq`` - plus Adam's step count and the LR scheduler state, in
safetensors shards with an ``index.json``. Every native layout reads into it tensor by tensor:

- ddp: accelerate's ``model.safetensors`` (read lazily) and ``optimizer.bin`` (memory-mapped;
  its integer indices map to names through the model's parameter order, see build_optimizer);
- fsdp: accelerate's torch distributed checkpoint folders, read offline on CPU key by key;
- deepspeed (ZeRO 1/2/3): DeepSpeed's own ``ds_to_universal``, which writes one folder per
  parameter with ``fp32``/``exp_avg``/``exp_avg_sq``, one rank's shard file in memory at a time.

Writers hold one shard (``SHARD_BYTES``) plus one tensor; train/checkpoint/resume.py sets the form into
any prepared strategy, train/export.py writes a Hugging Face model from it.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from train.config import ConfigError

PORTABLE = "portable"
INDEX = "index.json"
FORMAT = 1
KINDS = ("param", "exp_avg", "exp_avg_sq")
SHARD_BYTES = int(os.environ.get("TRAIN_PORTABLE_SHARD_BYTES", 512 * 2**20))
TMP = ".tmp-"


def layout(ckpt: Path) -> str:
    """Which native layout a checkpoint folder holds: ddp | fsdp | deepspeed | portable."""
    if (ckpt / INDEX).is_file():
        return "portable"
    if (ckpt / "model.safetensors").is_file() and (ckpt / "optimizer.bin").is_file():
        return "ddp"
    if any(ckpt.glob("pytorch_model_fsdp_*")):
        return "fsdp"
    if (ckpt / "pytorch_model" / "latest").is_file() or any(ckpt.glob("pytorch_model/*optim_states.pt")):
        return "deepspeed"
    raise ConfigError(f"checkpoint {str(ckpt)!r} holds no known layout (ddp: model.safetensors + optimizer.bin, "
                      "fsdp: pytorch_model_fsdp_0/, deepspeed: pytorch_model/, portable: index.json)")


# -- the model's parameter names, without building its weights -------------------------------
def run_config(ckpt: Path):
    from train.config import load_config

    path = ckpt / "run_config.yaml"
    if not path.is_file():
        raise ConfigError(f"checkpoint {str(ckpt)!r} has no run_config.yaml; cannot tell which model it holds")
    return load_config([f"config={path}"], env={}, dotenv_path=None)


def skeleton(cfg):
    """(model on the meta device, transformers config, tokenizer): names, shapes and order, no memory."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoModelForCausalLM

    from train.worker.model import load_tokenizer, model_config

    tok = load_tokenizer(cfg.model)
    mconf = model_config(cfg.model, len(tok))
    # The class itself, not from_config: inside a ZeRO-3 worker from_config would enter
    # deepspeed.zero.Init, whose collectives hang when only rank 0 builds a skeleton.
    cls = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(mconf), None)
    with torch.device("meta"):
        model = cls(mconf) if cls is not None else AutoModelForCausalLM.from_config(
            mconf, dtype=torch.float32, trust_remote_code=cfg.model.trust_remote_code)
    if model.config.vocab_size < len(tok):
        model.resize_token_embeddings(len(tok))
    return model, mconf, tok


def optimizer_order(model) -> list[str]:
    """Parameter names in the order of the optimizer's flat indices (train/worker/loop.py build_optimizer:
    the decayed >=2-D parameters first, then the rest)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [n for n, p in named if p.dim() >= 2] + [n for n, p in named if p.dim() < 2]


# -- sources: a native or portable checkpoint, read tensor by tensor --------------------------
class Source:
    """names/shapes of every parameter; ``get(kind, name)`` one full fp32 tensor."""

    names: list[str]
    shapes: dict[str, tuple[int, ...]]
    step: int
    scheduler: dict | None

    def get(self, kind: str, name: str) -> torch.Tensor:
        raise NotImplementedError

    def close(self) -> None:
        pass


class DDPSource(Source):
    def __init__(self, ckpt: Path, model):
        from safetensors import safe_open

        self._weights = safe_open(str(ckpt / "model.safetensors"), framework="pt")
        # mmap: optimizer tensors are paged in as they are read, not all at once.
        optim = torch.load(ckpt / "optimizer.bin", map_location="cpu", mmap=True, weights_only=True)
        order = optimizer_order(model)
        saved = [i for g in optim["param_groups"] for i in g["params"]]
        if len(saved) != len(order):
            raise ConfigError(f"checkpoint {str(ckpt)!r}: optimizer.bin has {len(saved)} parameters, "
                              f"the model has {len(order)}; it is another model's checkpoint")
        self._state = {order[k]: optim["state"].get(i, {}) for k, i in enumerate(saved)}
        self.names = [n for n, _ in model.named_parameters()]
        self.shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        self.step = _int_step(next(iter(self._state.values()), {}).get("step", 0))
        self.scheduler = _scheduler(ckpt)

    def get(self, kind, name):
        if kind == "param":
            return self._weights.get_tensor(name).float()
        return self._state[name][kind].float()


class FSDPSource(Source):
    """accelerate's FSDP sharded state: DCP folders ``pytorch_model_fsdp_0`` and ``optimizer_0``,
    read offline (no process group) one key at a time."""

    def __init__(self, ckpt: Path, model):
        import torch.distributed.checkpoint as dcp

        self._dcp = dcp
        self._model_dir = next(ckpt.glob("pytorch_model_fsdp_*"))
        self._optim_dir = next(ckpt.glob("optimizer_*"))
        self._model_meta = dcp.FileSystemReader(str(self._model_dir)).read_metadata().state_dict_metadata
        self._optim_meta = dcp.FileSystemReader(str(self._optim_dir)).read_metadata().state_dict_metadata
        self.names = [n for n, _ in model.named_parameters()]
        self.shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        self._model_prefix = _prefix(self._model_meta, self.names[0])
        self._optim_prefix = _prefix(self._optim_meta, self.names[0] + ".exp_avg")
        step_key = f"{self._optim_prefix}{self.names[0]}.step"
        self.step = _int_step(self._read(self._optim_dir, self._optim_meta, step_key)) if step_key in self._optim_meta else 0
        self.scheduler = _scheduler(ckpt)

    def _read(self, folder, meta, key):
        md = meta[key]
        if not hasattr(md, "size"):  # bytes (e.g. a python int step)
            out = {key: None}
        else:
            out = {key: torch.empty(md.size, dtype=md.properties.dtype)}
        with warnings.catch_warnings():  # "torch.distributed is disabled": offline on purpose
            warnings.simplefilter("ignore", UserWarning)
            self._dcp.load(out, storage_reader=self._dcp.FileSystemReader(str(folder)), no_dist=True)
        return out[key]

    def get(self, kind, name):
        if kind == "param":
            return self._read(self._model_dir, self._model_meta, self._model_prefix + name).float()
        return self._read(self._optim_dir, self._optim_meta, f"{self._optim_prefix}{name}.{kind}").float()


def _prefix(meta, suffix: str) -> str:
    for key in meta:
        if key.endswith(suffix):
            return key[: len(key) - len(suffix)]
    raise ConfigError(f"torch distributed checkpoint has no key ending in {suffix!r}; it is another model's checkpoint")


class DeepSpeedSource(Source):
    """DeepSpeed's universal-checkpoint conversion, then one parameter folder at a time."""

    def __init__(self, ckpt: Path, model, work: Path):
        import argparse

        from deepspeed.checkpoint import ds_to_universal

        ds_dir = ckpt / "pytorch_model"
        universal = work / "universal"
        shutil.rmtree(work, ignore_errors=True)
        universal.parent.mkdir(parents=True, exist_ok=True)
        # Single-process extraction: one rank's optimizer shard in memory at a time.
        args = argparse.Namespace(input_folder=str(ds_dir), output_folder=str(universal), num_extract_workers=1,
                                  num_merge_workers=1, keep_temp_folder=False, strict=True,
                                  inject_missing_state=True)
        with _quiet():
            ds_to_universal.main(args)
        self._dir = universal / "zero"
        self.names = [n for n, _ in model.named_parameters()]
        self.shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        missing = [n for n in self.names if not (self._dir / n).is_dir()]
        if missing:
            raise ConfigError(f"checkpoint {str(ckpt)!r} lacks parameters {missing[:3]}...; "
                              "it is another model's checkpoint")
        step_file = self._dir / self.names[0] / "step.pt"
        self.step = _int_step(torch.load(step_file, weights_only=False)) if step_file.is_file() else _ds_step(ds_dir)
        self.scheduler = _scheduler(ckpt)

    def get(self, kind, name):
        f = self._dir / name / f"{'fp32' if kind == 'param' else kind}.pt"
        t = torch.load(f, map_location="cpu", weights_only=False)
        t = t["param"] if isinstance(t, dict) else t
        return t.float().reshape(self.shapes[name])


def _ds_step(ds_dir: Path) -> int:
    f = next(ds_dir.glob("*optim_states.pt"))
    sd = torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
    base = sd.get("base_optimizer_state") or sd.get("optimizer_state_dict")
    states = base["state"]
    first = states[0] if isinstance(states, list) else next(iter(states.values()))
    return _int_step(first.get("step", 0))


class PortableSource(Source):
    def __init__(self, folder: Path):
        from safetensors import safe_open

        self._folder = folder
        idx = json.loads((folder / INDEX).read_text())
        self.names, self.step, self.scheduler = idx["names"], idx["step"], idx.get("scheduler")
        self.shapes = {n: tuple(s) for n, s in idx["shapes"].items()}
        self._map = idx["weight_map"]
        self._open = {}
        self._safe_open = safe_open

    def get(self, kind, name):
        key = f"{kind}/{name}"
        f = self._map[key]
        if f not in self._open:
            self._open[f] = self._safe_open(str(self._folder / f), framework="pt")
        return self._open[f].get_tensor(key)


def _int_step(step) -> int:
    return int(step.item() if torch.is_tensor(step) else step)


def _scheduler(ckpt: Path) -> dict | None:
    f = ckpt / "scheduler.bin"
    return torch.load(f, map_location="cpu", weights_only=False) if f.is_file() else None


@contextmanager
def _quiet():
    """ds_to_universal prints a line per stage and tqdm bars; keep the user's output readable."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def open_source(ckpt: Path, model=None, work: Path | None = None) -> Source:
    """The checkpoint's tensors, whichever layout holds them (portable form preferred if present)."""
    if (ckpt / PORTABLE / INDEX).is_file():
        return PortableSource(ckpt / PORTABLE)
    kind = layout(ckpt)
    if kind == "portable":
        return PortableSource(ckpt)
    if model is None:
        model = skeleton(run_config(ckpt))[0]
    try:
        if kind == "ddp":
            return DDPSource(ckpt, model)
        if kind == "fsdp":
            return FSDPSource(ckpt, model)
        return DeepSpeedSource(ckpt, model, work or ckpt.parent / f"{TMP}universal-{ckpt.name}")
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged file surfaces as any of torch's/DeepSpeed's errors
        raise ConfigError(f"checkpoint {str(ckpt)!r} cannot be read as a {kind} checkpoint "
                          f"({type(e).__name__}: {_first_line(e)}); it may be truncated or corrupt") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


# -- writing: bounded shards ------------------------------------------------------------------
class ShardWriter:
    """safetensors shards of at most ``max_bytes`` (a single larger tensor gets its own shard):
    peak memory is one shard plus one tensor."""

    def __init__(self, folder: Path, stem: str, max_bytes: int = SHARD_BYTES):
        self.folder, self.stem, self.max = folder, stem, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.size = 0
        self.files: list[str] = []
        self.weight_map: dict[str, str] = {}
        self.total = 0

    def add(self, key: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if self.pending and self.size + nbytes > self.max:
            self.flush()
        self.pending[key] = t.contiguous()
        self.size += nbytes
        self.total += nbytes

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        name = f"{self.stem}-{len(self.files) + 1:05d}.safetensors"
        save_file(self.pending, str(self.folder / name), metadata={"format": "pt"})
        self.files.append(name)
        self.weight_map.update({k: name for k in self.pending})
        self.pending, self.size = {}, 0


def write_portable(src: Source, out: Path, source_info: dict) -> Path:
    """Write ``src`` as the portable form into ``out`` (atomically: tmp folder, index last, rename)."""
    tmp = out.with_name(TMP + out.name)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    w = ShardWriter(tmp, "tensors")
    for name in src.names:
        for kind in KINDS:
            t = src.get(kind, name)
            if tuple(t.shape) != src.shapes[name]:
                raise ConfigError(f"{kind} of {name} has shape {tuple(t.shape)}, the model has {src.shapes[name]}")
            w.add(f"{kind}/{name}", t)
    w.flush()
    index = {"format": FORMAT, "names": src.names, "shapes": {n: list(s) for n, s in src.shapes.items()},
             "step": src.step, "scheduler": _jsonable(src.scheduler), "source": source_info,
             "weight_map": w.weight_map}
    (tmp / INDEX).write_text(json.dumps(index, indent=1))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def _jsonable(sched: dict | None) -> dict | None:
    if sched is None:
        return None
    return json.loads(json.dumps(sched, default=lambda o: o.item() if torch.is_tensor(o) else str(o)))


def ensure_portable(ckpt: Path) -> Path:
    """``ckpt/portable``, converted from the native layout once (kept for later resumes)."""
    out = ckpt / PORTABLE
    if (out / INDEX).is_file():
        return out
    manifest = json.loads((ckpt / "manifest.json").read_text()) if (ckpt / "manifest.json").is_file() else {}
    src = open_source(ckpt, work=ckpt.parent / f"{TMP}universal-{ckpt.name}")
    try:
        info = {"layout": layout(ckpt), "strategy": manifest.get("strategy"), "world_size": manifest.get("world_size")}
        return write_portable(src, out, info)
    finally:
        src.close()
        shutil.rmtree(ckpt.parent / f"{TMP}universal-{ckpt.name}", ignore_errors=True)


def iter_weights(src: Source) -> Iterator[tuple[str, torch.Tensor]]:
    for name in src.names:
        yield name, src.get("param", name)


def native_loads(saved_strategy: str, saved_world: int | None, strategy: str, world: int) -> bool:
    """Whether accelerate's load_state takes the checkpoint as it is (today's fast path): ddp and
    fsdp reshard to any world size within their family; DeepSpeed needs the same ZeRO stage and
    the same world size; a custom accelerate config only its own checkpoints on the same world."""
    from train.config.strategies import STRATEGIES

    a, b = STRATEGIES.get(saved_strategy), STRATEGIES.get(strategy)
    if a is None or b is None:
        return saved_strategy == strategy and saved_world == world
    if a.family != b.family:
        return False
    if a.family == "deepspeed":
        return a.zero_stage == b.zero_stage and saved_world == world
    return True
