"""(split from train/config/load.py)"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

from train.config.exitcodes import CONFIG, Exit
from train.config.strategies import CUSTOM, REPO_ROOT, STRATEGIES

DEFAULT_CONFIG = REPO_ROOT / "configs" / "runs" / "tiny.yaml"


class ConfigError(Exit, ValueError):
    """Bad user input: printed as one line, exit code 2."""

    code = CONFIG


def setting(default: Any, help: str = "", env: str | None = None, *, ge: float | None = None,
            gt: float | None = None, le: float | None = None, lt: float | None = None) -> Any:
    """A config field: its default, its help line for `make keys`, its short environment name
    (the one name the Makefile, `.env`, compose and Kubernetes use; see ``ENV_VARS``) and its
    bounds (``ge``/``gt``/``le``/``lt``), which the loader checks (``bounds_error``)."""
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    return field(default=default, metadata={"help": help, **({"env": env} if env else {}), **bounds})


def bounds_error(key: str, value: float, meta: Mapping[str, Any]) -> str | None:
    """The refusal for a value outside its field's bounds, or None."""
    lo, lo_in = (meta["ge"], True) if "ge" in meta else (meta.get("gt"), False)
    hi, hi_in = (meta["le"], True) if "le" in meta else (meta.get("lt"), False)
    if (lo is None or (value >= lo if lo_in else value > lo)) and (hi is None or (value <= hi if hi_in else value < hi)):
        return None
    if hi is None:
        return f"{key}={value} is too small; it must be >= {lo}" if lo_in else f"{key}={value} must be > {lo}"
    if lo is None:
        return f"{key}={value} is too large; it must be {'<=' if hi_in else '<'} {hi}"
    return f"{key}={value} must be in {'[' if lo_in else '('}{lo}, {hi}{']' if hi_in else ')'}"


# Enumerated settings are Literal types: `make keys` lists and the loader checks the values
# through typing.get_args, so each list of allowed values is written once, here. Every field has
# its help line and bounds here; the defaults are the embedded default run (configs/runs/tiny.yaml
# sets nothing these say already).
@dataclass
class LaunchConfig:
    strategy: str = setting("ddp", f"one of {', '.join(STRATEGIES)}", env="STRATEGY")
    accelerate_config: str = setting("", "your own `accelerate config` file (overrides strategy)", env="ACCELERATE_CONFIG")
    nproc_per_node: int = setting(0, "processes per node; 0 = GPUs on this node, or 2 on CPU", env="NPROC", ge=0)
    nnodes: int = setting(1, "nodes in the job (each runs one launcher)", env="NNODES", ge=1)
    node_rank: int = setting(0, "this node's rank, 0..nnodes-1 (Kubernetes, Slurm and PyTorchJob set it for you)", env="NODE_RANK")
    master_addr: str = setting("127.0.0.1", "node 0's address, reachable from every node", env="MASTER_ADDR")
    master_port: int = setting(29500, "node 0's rendezvous port (one node: a free port unless set)", env="MASTER_PORT")
    device: Literal["auto", "cpu", "cuda"] = setting("auto", "auto = cuda if torch sees a GPU, else cpu", env="DEVICE")
    timeout_s: int = setting(300, "collective/rendezvous timeout: a dead peer fails the job after this", env="DIST_TIMEOUT", ge=1)
    master_wait_s: int = setting(120, "how long a non-master node waits for the master to resolve and listen", ge=0)
    max_restarts: int = setting(3, "times torchrun restarts the workers after a crash (multi-process runs); they resume from the newest checkpoint", env="MAX_RESTARTS", ge=0)
    hang_timeout_s: float = setting(0.0, "no rank finished a step for this long: dump stacks, exit 4; 0 = max(60 s, 10 median steps)", env="HANG_TIMEOUT", ge=0)
    preflight: Literal["auto", "off", "only"] = setting(
        "auto", "auto | off | only: check every node, link and volume before training (train/launcher/preflight/), "
        "skip that, or check and exit", env="PREFLIGHT")


@dataclass
class PreflightConfig:
    """Thresholds of the preflight checks (train/launcher/preflight/); launch.preflight turns them on."""

    port: int = setting(0, "TCP port on node 0 for the preflight's short process group; 0 = MASTER_PORT + 1")
    shm_mb_per_gpu: int = setting(512, "free /dev/shm needed per GPU process (NCCL, DataLoader workers)", ge=0)
    shm_mb_per_cpu_process: int = setting(32, "free /dev/shm needed per process on CPU (32 MiB: one process fits Docker's default 64 MB; DeepSpeed's shm all-reduce, DataLoader workers)", ge=0)
    min_stack_mb: int = setting(8, "warn below this stack size limit (ulimit -s)", ge=0)
    disk_checkpoints: int = setting(2, "free space at OUTPUT_DIR must hold this many checkpoints (the planner's byte counts)", ge=0)
    gpu_min_peak_fraction: float = setting(0.4, "a GPU whose bf16 matmul runs below this fraction of its datasheet peak fails", ge=0, le=1)
    link_min_fraction: float = setting(0.5, "a node or link whose pairwise bandwidth is below this fraction of the median fails", ge=0, le=1)
    min_link_gb_s: float = setting(0.0, "a link slower than this many GB/s fails (0 = no absolute floor)", ge=0)
    bandwidth_budget_s: float = setting(1.0, "seconds each bandwidth test (all-reduce, pairwise) may take; larger messages are skipped", ge=0)
    shared_wait_s: float = setting(5.0, "how long a node waits for the others' files to appear in OUTPUT_DIR (NFS caches)", ge=0)


@dataclass
class ModelConfig:
    name: str = setting("llama-tiny", "preset name, hub id or local directory", env="MODEL")
    tokenizer: str = setting("", "hub id or directory; empty = the model's own (or the built-in one for presets)", env="TOKENIZER")
    trust_remote_code: bool = setting(False, "let transformers run the model repository's own code (only for repositories you trust)")
    attn_implementation: str = setting("sdpa", "transformers attention: sdpa | eager | flash_attention_2 (GPU, installed separately)")
    # Size overrides for a preset (0 = the preset's value): from-scratch models of any size.
    hidden_size: int = setting(0, "presets only: hidden size (0 = the preset's)", ge=0)
    num_layers: int = setting(0, "presets only: transformer layers (0 = the preset's)", ge=0)
    num_heads: int = setting(0, "presets only: attention heads, must divide hidden_size (0 = the preset's)", ge=0)
    intermediate_size: int = setting(0, "presets only: MLP width (0 = the preset's)", ge=0)
    activation_checkpointing: bool = setting(False, "recompute each layer's activations in the backward pass (less memory, ~30% more compute)")
    compile: bool = setting(False, "torch.compile the model (needs a C++ compiler on CPU, Triton on GPU)")
    # LoRA (PEFT): r > 0 freezes the model and trains low-rank adapters on the target modules.
    lora_r: int = setting(0, "LoRA rank; 0 = full fine-tuning (no adapters)", env="LORA_R")
    lora_alpha: float = setting(16.0, "LoRA scaling numerator (scale = alpha / r)")
    lora_dropout: float = setting(0.05, "dropout on the LoRA input, in [0, 1)")
    lora_target_modules: str = setting("", "comma-separated module names, or all-linear; empty = PEFT's default for the architecture (llama: q_proj,v_proj)")


@dataclass
class DataConfig:
    dataset: str = setting("builtin:tiny-stories", "a directory made by `python -m train prepare`, or a raw source "
                           "(builtin:NAME, hub id, local text/jsonl/parquet/csv file or directory), prepared into "
                           "data.cache_dir on first use (docs/data.md)", env="DATASET")
    dataset_config: str = setting("", "a hub dataset's configuration name (e.g. wikitext-2-raw-v1)")
    split: str = setting("train", "a hub dataset's split to train on (local files are one split)")
    text_field: str = setting("text", "the column holding the text (jsonl, parquet, csv, hub)")
    seq_len: int = setting(128, "tokens per training sequence (documents are packed into blocks of this length)", env="SEQ_LEN", ge=8)
    eval_fraction: float = setting(0.05, "held out from DATASET (each mixture source): its last documents, this share "
                                   "of its tokens rounded to whole documents; unused with data.eval_dataset", gt=0, lt=0.5)
    eval_dataset: str = setting("", "a separate held-out dataset (same forms as DATASET); empty = hold out "
                                "data.eval_fraction of DATASET's documents", env="EVAL_DATASET")
    eval_sets: str = setting("", "named eval sets besides the held-out split (logged as eval/heldout/...): NAME=SOURCE,"
                             "NAME=SOURCE (in YAML also a mapping NAME: SOURCE); sources as DATASET, each logged as "
                             "eval/NAME/loss and eval/NAME/ppl", env="EVAL_SETS")
    mixture: str = setting("", "weighted mixture instead of DATASET: SOURCE=WEIGHT,SOURCE=WEIGHT (in YAML also a list "
                           "of {dataset, weight}); sources as DATASET, weights > 0", env="DATA_MIXTURE")
    num_workers: int = setting(0, "DataLoader worker processes per rank (0 = load in the training process)", ge=0)
    cache_dir: str = setting("", "where raw DATASETs are prepared on first use (CACHE/prepared/) and `datasets` keeps "
                             "downloads; empty = ~/.cache/train (XDG_CACHE_HOME) and its own default", env="DATA_CACHE")
    shard_tokens: int = setting(1 << 27, "prepare: tokens per shard file (a shard ends at the first document end "
                                "past this)", ge=1)
    prepare_workers: int = setting(0, "prepare: tokenizing processes; 0 = the CPUs this process may use", ge=0)
    # Chat / instruction data (docs/instruction-tuning.md).
    format: Literal["auto", "text", "chat"] = setting(
        "auto", "text (a column of text) | chat (JSONL rows of `messages` [{role, content}] or `prompt`/`completion`, "
        "rendered with the chat template, loss on the assistant's tokens) | auto (chat if a local JSON/JSONL "
        "source's first row has `messages` or `prompt` and `completion`, else text)", env="DATA_FORMAT")
    chat_template: str = setting("", "chat data: the tokenizer's own chat template if empty; else a shipped one by "
                                 "name (plain) or a Jinja file's path", env="CHAT_TEMPLATE")
    train_on_prompt: bool = setting(False, "chat data: also compute the loss on system/user/tool tokens (default: the "
                                    "assistant's tokens only)", env="TRAIN_ON_PROMPT")
    packing: Literal["auto", "masked", "plain", "padded"] = setting(
        "auto", "masked (documents packed into SEQ_LEN blocks, each attending only to itself: positions restart, "
        "attention stops at its ends) | plain (packed, attending across documents: pretraining as before) | padded "
        "(one document per sequence, padded; longer ones truncated) | auto (masked for chat data, plain for text)",
        env="PACKING")
    remote_cache_gb: float = setting(50.0, "a prepared DATASET at an object store URL (s3://...) is fetched once per node "
                                     "into data.cache_dir/remote/, checked against its manifest; the fetched corpora "
                                     "there are kept within this many GB (least recently used removed first)",
                                     env="DATA_REMOTE_CACHE_GB", gt=0)


@dataclass
class OptimConfig:
    lr: float = setting(3e-3, "peak learning rate of AdamW", env="LR", gt=0)
    min_lr_ratio: float = setting(0.1, "cosine schedule: the final LR as a fraction of the peak", ge=0, le=1)
    weight_decay: float = setting(0.1, "AdamW weight decay (not on norms and biases)", ge=0)
    beta1: float = setting(0.9, "AdamW beta1", ge=0, lt=1)
    beta2: float = setting(0.95, "AdamW beta2", ge=0, lt=1)
    eps: float = setting(1e-8, "AdamW epsilon", gt=0)
    grad_clip: float = setting(1.0, "clip the global gradient norm to this", gt=0)
    warmup_steps: int = setting(10, "linear LR warm-up steps", ge=0)
    schedule: Literal["cosine", "linear", "constant"] = setting("cosine", "the LR after warm-up")


@dataclass
class TrainConfig:
    precision: Literal["no", "bf16", "fp16"] = setting("no", "mixed precision: no (fp32) | bf16 | fp16 (GPU, with loss scaling)", env="PRECISION")
    tf32: bool = setting(True, "CUDA: TF32 tensor cores for fp32 matmuls/convolutions (PRECISION=no runs ~8x faster; MFU uses the TF32 peak). false = true IEEE fp32")
    micro_batch: int = setting(8, "sequences per rank per forward pass", env="MICRO_BATCH", ge=1)
    grad_accum: int = setting(1, "micro-batches accumulated per optimizer step", env="GRAD_ACCUM", ge=1)
    global_batch: int = setting(0, "sequences per optimizer step; 0 = micro_batch x grad_accum x world size. If set, grad_accum is derived from it", env="GLOBAL_BATCH", ge=0)
    max_steps: int = setting(150, "optimizer steps of the whole run (a resumed run continues to it)", env="MAX_STEPS", ge=1)
    eval_every: int = setting(50, "evaluate every N steps and at the end (0 = only at the end)", ge=0)
    eval_tokens: int = setting(0, "tokens of each eval set an evaluation reads, from its start in whole blocks of "
                               "SEQ_LEN; 0 = all of it. The same blocks for any world size", env="EVAL_TOKENS", ge=0)
    spike_factor: float = setting(3.0, "a logged loss above this x the median of the last spike_window rolls back to the newest checkpoint and skips the batches since; 0 = only non-finite losses", ge=0)
    spike_window: int = setting(20, "logged losses the spike median is taken over", ge=1)
    max_rollbacks: int = setting(3, "rollbacks a run may take; then it stops with exit 7 (diverged)", ge=0)
    until_step: int = setting(0, "stop after this step without the final export (the LR schedule still spans "
                              "max_steps); 0 = run to max_steps. `python -m train verify` replays a window this way", ge=0)


@dataclass
class CheckpointConfig:
    every: int = setting(50, "save every N optimizer steps (0 = only at the end)", env="CHECKPOINT_EVERY", ge=0)
    keep: int = setting(2, "complete checkpoints to keep", env="KEEP_CHECKPOINTS", ge=1)
    resume: str = setting("auto", "auto (newest complete checkpoint, if any) | never (refuse if any exist) | PATH", env="RESUME")
    export: bool = setting(True, "write OUTPUT_DIR/final (safetensors + config + tokenizer) at the end")
    export_timeout_s: int = setting(3600, "how long the other ranks wait while rank 0 writes the final export (its own bound: DIST_TIMEOUT is for collectives)")
    merge_lora: bool = setting(True, "with LoRA, also write the adapters merged into the model in final/ (the adapter alone goes to final/adapter)")
    harness_tasks: str = setting("", "lm-eval tasks (comma-separated names or YAML files, e.g. "
                                 "configs/lm_eval/tiny_stories.yaml) run on OUTPUT_DIR/final after the export; results "
                                 "in final/harness.json and metrics.jsonl; empty = none", env="HARNESS_TASKS")
    harness_limit: int = setting(0, "documents per lm-eval task (0 = all): a quick look, not a comparable score", ge=0)
    async_save: bool = setting(False, "fsdp, fsdp-offload: write model and optimizer state in the background "
                               "(torch.distributed.checkpoint.async_save) after a copy to CPU memory; a checkpoint "
                               "counts once the next save starts or the run ends", env="ASYNC_SAVE")
    scratch_dir: str = setting("", "node-local directory used when OUTPUT_DIR is an object store URL (s3://, gs://): "
                               "checkpoints are written here before their upload, resumes download here, hang dumps, "
                               "profiles and tracker files stay here; empty = $TMPDIR/train-scratch (docs/object-storage.md)",
                               env="SCRATCH_DIR")


@dataclass
class LogConfig:
    every: int = setting(10, "log a metrics row (loss, tokens/s, MFU, memory) every N steps", env="LOG_EVERY", ge=1)
    progress: bool = setting(True, "a progress bar on rank 0's terminal (the log lines are printed either way)")
    trackers: str = setting("tensorboard", "comma-separated: tensorboard, mlflow, wandb (or none); same metrics as metrics.jsonl", env="TRACKERS")
    project: str = setting("train", "MLflow experiment / W&B project name")
    held_bytes_every: int = setting(10, "measure held_bytes (a walk over all state) on the first log step and every N-th after it", ge=1)
    straggler_fraction: float = setting(0.2, "warn when a rank's own time per step exceeds the median rank's by this fraction of the step time ...", gt=0)
    straggler_log_steps: int = setting(5, "... for this many log steps in a row (0 = never warn)", ge=0)
    profile_steps: str = setting("", "record a torch.profiler trace (CPU and CUDA activity) of these optimizer steps, "
                                 "e.g. 10-12 or 5, as Chrome/Perfetto JSON in OUTPUT_DIR/profiles; empty = off",
                                 env="PROFILE_STEPS")
    profile_ranks: str = setting("0", "the ranks that record profile_steps: comma-separated ranks, or all",
                                 env="PROFILE_RANKS")
    profile_memory: bool = setting(False, "CUDA: also record a memory snapshot of profile_steps "
                                   "(OUTPUT_DIR/profiles/*.pickle; open at pytorch.org/memory_viz)")
    memory_history: bool = setting(False, "CUDA: record every allocation's stack from the start, so the snapshot "
                                   "written on out-of-memory (exit 10) says who allocated what; costs step time")


@dataclass
class RunConfig:
    output_dir: str = setting("", "where checkpoints, metrics and final/ go; empty = outputs/<run file>-<strategy>, "
                              "plus a short hash when model, data, SEQ_LEN, SEED or LoRA differ from the run file's",
                              env="OUTPUT_DIR")
    seed: int = setting(1234, "seeds the model init, the data order and dropout", env="SEED")
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    preflight: PreflightConfig = field(default_factory=PreflightConfig)
    # Filled by the loader, not settings (no key, not saved): where each value came from, e.g.
    # {"launch.strategy": "command line STRATEGY"}, and the notices it printed about precedence.
    sources: dict[str, str] = field(default_factory=dict, repr=False, compare=False, metadata={"internal": True})
    notes: list[str] = field(default_factory=list, repr=False, compare=False, metadata={"internal": True})

    # -- derived -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The settings (what the run file, `.env` and the command line can set), without the loader's records."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("sources", "notes")}

    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint must agree with to be resumed: changing any of it changes the run."""
        return {
            "model": model_id(self.model),
            "seq_len": self.data.seq_len,
            "dataset": self.data.dataset,
            "seed": self.seed,
            # None without LoRA: checkpoints written before this key existed still match
            "lora": f"r={self.model.lora_r} targets={self.model.lora_target_modules}" if self.model.lora_r else None,
            # only when set: checkpoints of single-dataset runs keep their fingerprint
            **({"mixture": self.data.mixture} if self.data.mixture else {}),
            # only when set: what a sequence is and where the loss is taken change the run too
            **({"sequences": f"format={self.data.format} packing={self.data.packing} template="
                f"{self.data.chat_template} train_on_prompt={self.data.train_on_prompt}"}
               if (self.data.format, self.data.packing, self.data.chat_template, self.data.train_on_prompt)
               != ("auto", "auto", "", False) else {}),
        }

    def fingerprint_hash(self) -> str:
        blob = json.dumps(self.fingerprint(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def redacted(self) -> dict[str, Any]:
        return _redact(self.to_dict())


def profile_window(log: LogConfig) -> tuple[int, int] | None:
    """log.profile_steps as (first, last) step, or None when off; ConfigError if malformed."""
    text = log.profile_steps.strip()
    if not text:
        return None
    first, _, last = text.partition("-")
    try:
        a, b = int(first), int(last or first)
    except ValueError:
        raise ConfigError(f"PROFILE_STEPS={text!r} is not a step window; use FIRST-LAST (e.g. 10-12) or one step") from None
    if not 1 <= a <= b:
        raise ConfigError(f"PROFILE_STEPS={text!r}: steps count from 1 and FIRST <= LAST (e.g. 10-12)")
    return a, b


def profile_ranks(log: LogConfig, world_size: int | None = None) -> set[int] | None:
    """log.profile_ranks as a set of ranks (None = all); ConfigError if malformed or, given the
    world size, naming a rank the run does not have."""
    text = log.profile_ranks.strip()
    if text == "all":
        return None
    try:
        ranks = {int(r) for r in text.split(",")}
    except ValueError:
        raise ConfigError(f"PROFILE_RANKS={text!r}: use comma-separated ranks (e.g. 0,3) or all") from None
    bad = sorted(r for r in ranks if r < 0 or (world_size is not None and r >= world_size))
    if bad:
        raise ConfigError(f"PROFILE_RANKS={text!r}: rank {bad[0]} does not exist; allowed: 0.."
                          f"{'N-1' if world_size is None else world_size - 1}, or all")
    return ranks


HELDOUT = "heldout"  # the eval set drawn from the training data (or data.eval_dataset)
_EVAL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def eval_set_specs(data: DataConfig) -> list[tuple[str, str]]:
    """data.eval_sets as [(name, source)], in order; ConfigError for a malformed entry, a bad or duplicate name.
    Names become metric keys (eval/NAME/loss), hence the plain characters."""
    out: list[tuple[str, str]] = []
    for part in (p.strip() for p in data.eval_sets.split(",") if p.strip()):
        name, sep, source = (x.strip() for x in part.partition("="))
        if not sep or not source:
            raise ConfigError(f"data.eval_sets entry {part!r} is not NAME=SOURCE (e.g. stories=data/stories.jsonl)")
        if not _EVAL_NAME.match(name):
            raise ConfigError(f"data.eval_sets name {name!r}: use letters, digits, _, . and - (it names eval/NAME/loss)")
        if name == HELDOUT or name in dict(out):
            why = "is the held-out split's" if name == HELDOUT else "is given twice"
            raise ConfigError(f"data.eval_sets name {name!r} {why}; each eval set needs its own name")
        out.append((name, source))
    return out


def harness_task_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


SIZE_KEYS = ("hidden_size", "num_layers", "num_heads", "intermediate_size")


def model_id(model: ModelConfig) -> str:
    """The model's name plus any preset size overrides: what a checkpoint must match."""
    sizes = [f"{k}={getattr(model, k)}" for k in SIZE_KEYS if getattr(model, k)]
    return model.name + (f"({', '.join(sizes)})" if sizes else "")


def selected_strategy(launch: LaunchConfig):
    """The strategy row this run uses, or None for a user's own ACCELERATE_CONFIG file."""
    return None if launch.accelerate_config else STRATEGIES[launch.strategy]


def strategy_name(launch: LaunchConfig) -> str:
    s = selected_strategy(launch)
    return s.name if s else CUSTOM


def strategy_family(launch: LaunchConfig) -> str:
    s = selected_strategy(launch)
    return s.family if s else CUSTOM


def _key_fields() -> list[tuple[str, dataclasses.Field]]:
    """Every config key (``section.key`` or a top-level key) with its dataclass field, in order."""
    out = []
    for f in dataclasses.fields(RunConfig):
        if f.metadata.get("internal"):
            continue
        if isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory):
            out += [(f"{f.name}.{g.name}", g) for g in dataclasses.fields(f.default_factory)]
        else:
            out.append((f.name, f))
    return out
CONFIG_ENV = "CONFIG"  # path of the YAML run file


# Credentials are never config keys (HF_TOKEN is read from the environment), but a value can
# still carry one: a hub token pasted into a path or URL, or user:password@ in a URL.
_SECRET_VALUE = re.compile(r"hf_[A-Za-z0-9]{20,}|(?<=://)[^/@\s:]+:[^/@\s]+(?=@)")


def _redact(obj: Any) -> Any:
    """The config with credential-looking substrings masked; every setting itself is kept, so the
    saved run_config.yaml still reproduces the run (a key named like `model.tokenizer` is no secret)."""
    if isinstance(obj, dict):
        return {k: _redact(v) for k, v in obj.items()}
    if isinstance(obj, str):
        return _SECRET_VALUE.sub("***", obj)
    return obj
