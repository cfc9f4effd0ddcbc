"""``python -m train [COMMAND] [section.key=value | NAME=value ...]``

Commands:
  launch   (default) check the config, then start the distributed job with accelerate
  worker   one rank of the job (what `accelerate launch` runs; not for direct use)
  config   print the resolved configuration and exit
  doctor   the preflight checks alone (devices, /dev/shm, disk, shared storage, links; see train/preflight.py)
  keys     list every config key with its default, env name and meaning
           (--env-names: only the short environment names, one per line)
  plan     per-GPU memory of each strategy for a model (see train/plan.py)
  bench    the benchmark table (see train/bench.py)
  env      versions of everything that matters, and `accelerate env`
  warm     pre-build DeepSpeed's JIT ops for this machine (done by `make` at install time)
  hang-report OUTPUT_DIR   which rank hung, where: the table and verdict of the newest hang dump
  export   CKPT OUT: a Hugging Face model (safetensors, config, tokenizer) from any checkpoint
  convert  CKPT OUT --to STRATEGY [--world-size N]: a checkpoint that resumes under STRATEGY
  prepare  --out DIR SOURCE... [key=value]: tokenize sources into token shards (see train/data/prepare.py)
"""

from __future__ import annotations

import sys

from .config import ConfigError
from .exitcodes import MASTER_UNREACHABLE
from .nodes import MasterUnreachable

COMMANDS = ("launch", "worker", "config", "keys", "plan", "bench", "env", "warm", "doctor", "hang-report", "export",
            "convert", "prepare")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return
    cmd = argv.pop(0) if argv and argv[0] in COMMANDS else "launch"
    if cmd == "worker":
        from . import progress

        progress.attach()  # before anything slow: die with the agent, let the supervisor trace us
    try:
        code = run(cmd, argv)
    except ConfigError as e:
        if cmd == "worker":
            progress.config_error(str(e))  # the supervisor ends the job and prints the line last
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except MasterUnreachable as e:  # retriable (a cold node, slow DNS), unlike a config error
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(MASTER_UNREACHABLE)
    except BaseException as e:
        from .rollback import Diverged

        if cmd == "worker" and isinstance(e, Diverged):
            from .exitcodes import DIVERGED

            progress.fatal("diverged", str(e), DIVERGED)  # a restart would diverge again
        if cmd == "worker" and not isinstance(e, SystemExit):
            progress.crashed(e)
        raise
    sys.exit(code or 0)


def run(cmd: str, argv: list[str]) -> int | None:
    if cmd == "hang-report":
        from .hang import main as hang_main

        hang_main(argv)
    elif cmd == "keys":
        from .config import env_names, help_text

        print("\n".join(env_names()) if "--env-names" in argv else help_text())
    elif cmd == "env":
        from .envinfo import print_env

        print_env()
    elif cmd == "warm":
        from .envinfo import warm_ops

        warm_ops()
    elif cmd == "plan":
        from .plan import main as plan_main

        plan_main(argv)
    elif cmd in ("export", "convert"):
        from .convert import main as convert_main

        convert_main(cmd, argv)
    elif cmd == "prepare":
        from .data.prepare import main as prepare_main

        prepare_main(argv)
    elif cmd == "bench":
        from .bench import main as bench_main

        bench_main(argv)
    else:
        from .config import dump_yaml, load_config

        cfg = load_config(argv)
        if cmd == "config":
            print(dump_yaml(cfg), end="")
        elif cmd == "worker":
            from .loop import main as loop_main

            loop_main(cfg)
        elif cmd == "doctor":
            import os

            from .distributed import resolve_device
            from .launch import processes_per_node
            from .nodes import resolve_nodes
            from .preflight import doctor

            device = resolve_device(cfg.launch.device)
            spec = resolve_nodes(cfg.launch, os.environ)
            doctor(cfg, spec, processes_per_node(spec.nproc_per_node or cfg.launch.nproc_per_node, device), device)
        else:
            from .launch import launch

            return launch(cfg, argv)
    return None


if __name__ == "__main__":
    main()
