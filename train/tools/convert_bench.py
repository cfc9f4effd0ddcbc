"""Peak memory of `export` and `convert` on a ~100M-parameter model: ``python -m train.tools.convert_bench``.

Builds a ~100M-parameter Llama (local model folder), writes a DDP-layout checkpoint of it with
real AdamW state (one optimizer step on random gradients), then runs `python -m train export`
and `convert` as child processes and reads their peak resident memory (``ru_maxrss``), next to
the floor (the same interpreter importing torch, transformers and train.checkpoint.convert) and the
checkpoint's size. Writes ``bench-results/convert-memory_<date>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from train.config.strategies import REPO_ROOT

# hidden 768, 12 layers, MLP 2560, the repo's 640-token vocabulary: 99.4M parameters.
CONFIG = dict(hidden_size=768, intermediate_size=2560, num_hidden_layers=12, num_attention_heads=12,
              num_key_value_heads=12, vocab_size=640, max_position_embeddings=2048, tie_word_embeddings=False)


def make_checkpoint(root: Path) -> tuple[Path, int]:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from train.config import dump_yaml, load_config
    from train.worker.loop import build_optimizer
    from train.worker.model import TOKENIZER_DIR

    model_dir = root / "model"
    conf = LlamaConfig(**CONFIG)
    conf.architectures = ["LlamaForCausalLM"]
    conf.save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(str(TOKENIZER_DIR)).save_pretrained(model_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(conf, dtype=torch.float32)
    n = sum(p.numel() for p in model.parameters())
    cfg = load_config([f"MODEL={model_dir}", "STRATEGY=ddp"], env={}, dotenv_path=None)
    opt = build_optimizer(model, cfg, "cpu")
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    ckpt = root / "checkpoints" / "step_00000001"
    ckpt.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt / "model.safetensors"),
              metadata={"format": "pt"})
    torch.save(opt.state_dict(), ckpt / "optimizer.bin")
    (ckpt / "run_config.yaml").write_text(dump_yaml(cfg))
    files = {f.name: f.stat().st_size for f in ckpt.iterdir()}
    manifest = {"format": 1, "step": 1, "train_state": {"step": 1}, "world_size": 1, "strategy": "ddp",
                "form": "native", "fingerprint": cfg.fingerprint(), "files": files}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    return ckpt, n


def _anon_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))
    except (OSError, StopIteration):
        return 0


def peak_rss_mb(cmd: list[str], env: dict | None = None) -> tuple[float, float, float]:
    """(peak RSS MiB, peak anonymous RSS MiB, wall s) of ``cmd``.

    Peak RSS (``ru_maxrss`` from wait4) counts the file pages the readers map (safetensors and
    ``torch.load(mmap=True)``), which are page cache the kernel drops under pressure; the
    anonymous part (sampled every ~2 ms from /proc) is the memory the command really needs."""
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    anon = 0
    while True:
        pid, status, usage = os.wait4(p.pid, os.WNOHANG)
        if pid:
            break
        anon = max(anon, _anon_kib(p.pid))
        if time.monotonic() - t0 > 1800:
            p.kill()
        time.sleep(0.002)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr.read().decode()[-3000:]}")
    return usage.ru_maxrss / 1024, anon / 1024, time.monotonic() - t0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m train.tools.convert_bench")
    ap.add_argument("--out", default=str(REPO_ROOT / "bench-results"))
    ap.add_argument("--shard-mb", default="512,64", help="shard sizes to measure, MiB")
    ap.add_argument("--make", help=argparse.SUPPRESS)  # internal: write the checkpoint in a child process
    args = ap.parse_args(argv)
    if args.make:
        ckpt, n = make_checkpoint(Path(args.make))
        print(n)
        return
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    rows = []
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        # In a child: its 1.6 GB would otherwise count in every later child's ru_maxrss (fork copies it).
        made = subprocess.run([sys.executable, "-m", "train.tools.convert_bench", "--make", str(root)], cwd=REPO_ROOT,
                              env=env, capture_output=True, text=True, timeout=1800, check=True)
        n = int(made.stdout.strip().splitlines()[-1])
        ckpt = root / "checkpoints" / "step_00000001"
        size_mb = sum(f.stat().st_size for f in ckpt.iterdir()) / 2**20
        floor, floor_anon, _ = peak_rss_mb([sys.executable, "-c", "import torch, transformers, safetensors, train.checkpoint.convert"], env)
        rows.append({"what": "floor: python + torch + transformers + train.checkpoint.convert imported", "peak_rss_mib": floor,
                     "peak_anon_mib": floor_anon})
        for mb in [int(x) for x in args.shard_mb.split(",")]:
            e = {**env, "TRAIN_PORTABLE_SHARD_BYTES": str(mb * 2**20)}
            for cmd in ("export", "convert"):
                out = root / f"{cmd}-{mb}"
                extra = ["--to", "zero3"] if cmd == "convert" else []
                peak, anon, wall = peak_rss_mb([sys.executable, "-m", "train", cmd, str(ckpt), str(out), *extra], e)
                written = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
                rows.append({"what": f"{cmd}, shards <= {mb} MiB", "peak_rss_mib": peak, "peak_anon_mib": anon, "wall_s": wall,
                             "written_mib": written})
    date = time.strftime("%Y-%m-%d")
    result = {"params": n, "checkpoint_mib": size_mb, "config": CONFIG, "rows": rows,
              "command": "python -m train.tools.convert_bench " + " ".join(argv or sys.argv[1:]),
              "load_avg": os.getloadavg()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"convert-memory_{date}.json").write_text(json.dumps(result, indent=1))
    lines = [f"# Checkpoint conversion memory ({date})", "",
             f"Llama, {n / 1e6:.1f}M parameters (`train/tools/convert_bench.py` CONFIG), DDP-layout checkpoint of "
             f"{size_mb:.0f} MiB (fp32 weights + AdamW exp_avg/exp_avg_sq). Peak RSS is `ru_maxrss` of the "
             "command's process: it includes the checkpoint's file pages that the readers map (page cache, "
             "dropped under memory pressure). Peak anonymous RSS (sampled every ~2 ms) is what the "
             f"command itself allocates. Command: `{result['command']}`.", "",
             "| what | peak RSS MiB | peak anonymous MiB | anonymous above floor MiB | wall s | written MiB |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['what']} | {r['peak_rss_mib']:.0f} | {r['peak_anon_mib']:.0f} | "
                     f"{r['peak_anon_mib'] - floor_anon:.0f} | {r.get('wall_s', 0):.1f} | {r.get('written_mib', 0):.0f} |")
    (out / f"convert-memory_{date}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
