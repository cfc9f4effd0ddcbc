"""``python -m train [COMMAND] [section.key=value | NAME=value ...]``: the command table and the one way out.

Every command is a row of ``COMMANDS`` (name, help, function). A decision to stop is an
``exitcodes.Exit`` (``ConfigError``, ``MasterUnreachable``, ``Diverged``, ...) raised where it is
made; ``main`` turns it into the process's exit code here, once. A rank hands a final code to its
supervisor first (``progress.fatal``), which ends the whole job and prints the line last.
"""

from __future__ import annotations

import sys
from typing import Callable, NamedTuple

from train.config.exitcodes import FINAL_CODES, OK, Exit


def _launch(argv: list[str]) -> int | None:
    from train.config import load_config
    from train.launcher.launch import launch

    return launch(load_config(argv), argv)


def _worker(argv: list[str]) -> None:
    from train.config import load_config
    from train.worker.loop import main as loop_main

    loop_main(load_config(argv))


def _config(argv: list[str]) -> None:
    from train.config import dump_yaml, load_config

    print(dump_yaml(load_config(argv)), end="")


def _doctor(argv: list[str]) -> None:
    import os

    from train.config import load_config
    from train.launcher.launch import processes_per_node
    from train.launcher.nodes import resolve_nodes
    from train.launcher.preflight import doctor
    from train.worker.accelerator import resolve_device

    cfg = load_config(argv)
    device = resolve_device(cfg.launch.device)
    spec = resolve_nodes(cfg.launch, os.environ)
    doctor(cfg, spec, processes_per_node(spec.nproc_per_node or cfg.launch.nproc_per_node, device), device)


def _keys(argv: list[str]) -> None:
    from train.config import env_names, help_text

    print("\n".join(env_names()) if "--env-names" in argv else help_text())


def _plan(argv: list[str]) -> None:
    from train.tools.plan import main as plan_main

    plan_main(argv)


def _bench(argv: list[str]) -> None:
    from train.tools.bench import main as bench_main

    bench_main(argv)


def _env(argv: list[str]) -> None:
    from train.tools.envinfo import print_env

    print_env()


def _warm(argv: list[str]) -> None:
    from train.tools.envinfo import warm_ops

    warm_ops()


def _info(argv: list[str]) -> None:
    from train.tools.info import main as info_main

    info_main(argv)


def _verify(argv: list[str]) -> int:
    from train.tools.verify import main as verify_main

    return verify_main(argv)


def _hang_report(argv: list[str]) -> None:
    from train.tools.hang_report import main as hang_main

    hang_main(argv)


def _export(argv: list[str]) -> None:
    from train.checkpoint.convert import main as convert_main

    convert_main("export", argv)


def _convert(argv: list[str]) -> None:
    from train.checkpoint.convert import main as convert_main

    convert_main("convert", argv)


def _harness(argv: list[str]) -> None:
    from train.tools.harness import main as harness_main

    harness_main(argv)


def _prepare(argv: list[str]) -> None:
    from train.data.prepare import main as prepare_main

    prepare_main(argv)


class Command(NamedTuple):
    run: Callable[[list[str]], int | None]
    help: str


COMMANDS: dict[str, Command] = {
    "launch": Command(_launch, "(default) check the config, then start the distributed job with accelerate"),
    "worker": Command(_worker, "one rank of the job (what `accelerate launch` runs; not for direct use)"),
    "config": Command(_config, "print the resolved configuration and exit"),
    "doctor": Command(_doctor, "the preflight checks alone (devices, /dev/shm, disk, shared storage, links)"),
    "keys": Command(_keys, "list every config key with its default, env name and meaning "
                           "(--env-names: only the short environment names, one per line)"),
    "plan": Command(_plan, "per-GPU memory of each strategy for a model (train/tools/plan.py)"),
    "bench": Command(_bench, "the benchmark table (train/tools/bench/)"),
    "env": Command(_env, "versions of everything that matters, and `accelerate env`"),
    "warm": Command(_warm, "pre-build DeepSpeed's JIT ops for this machine (done by `make` at install time)"),
    "info": Command(_info, "version | pin PACKAGE | strategies | compose | torch-index | system-torch: one fact "
                           "about this checkout, for make"),
    "verify": Command(_verify, "CKPT [--steps N] [key=value ...]: replay N steps from a checkpoint and compare with "
                               "the losses the run logged (exit 0: reproduces, 9: does not); names what differs"),
    "hang-report": Command(_hang_report, "OUTPUT_DIR: which rank hung, where: the table and verdict of the newest hang dump"),
    "export": Command(_export, "CKPT OUT: a Hugging Face model (safetensors, config, tokenizer) from any checkpoint"),
    "convert": Command(_convert, "CKPT OUT --to STRATEGY [--world-size N]: a checkpoint that resumes under STRATEGY"),
    "harness": Command(_harness, "--model EXPORT_OR_CKPT --tasks NAME_OR_YAML,...: lm-eval on a model export or a "
                                 "checkpoint; results in harness.json beside the export (docs/fine-tuning-and-tracking.md)"),
    "prepare": Command(_prepare, "--out DIR SOURCE... [key=value]: tokenize sources into token shards (docs/data.md)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    return "\n".join([__doc__.splitlines()[0].split(":")[0], "", "Commands:",
                      *(f"  {name:<{width}}  {c.help}" for name, c in COMMANDS.items())])


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    cmd = argv.pop(0) if argv and argv[0] in COMMANDS else "launch"
    worker = cmd == "worker"
    if worker:
        from train import progress

        progress.attach()  # before anything slow: die with the agent, let the supervisor trace us
    try:
        code = COMMANDS[cmd].run(argv)
    except Exit as e:
        if worker and e.code in FINAL_CODES:
            progress.fatal(e.code, str(e))  # the supervisor ends the job and prints the line last
        if str(e):
            print(f"error: {e}" if e.code != OK else str(e), file=sys.stderr if e.code != OK else sys.stdout, flush=True)
        sys.exit(e.code)
    except BaseException as e:
        if worker and not isinstance(e, SystemExit):
            progress.crashed(e)
        raise
    sys.exit(code or 0)


if __name__ == "__main__":
    main()
