"""The refusal contract (bad input), written once."""

from __future__ import annotations

from pathlib import Path


# -- bad input -------------------------------------------------------------------------------
def snapshot(root: Path) -> dict:
    """Every file under ``root`` with its size and mtime: a refusal must leave it as it was."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def assert_refused(p, *fragments, code: int = 2, out: Path | None = None, before: dict | None = None) -> str:
    """The refusal contract, written once: exit ``code`` (2, bad input) with one `error: ...` line,
    the last one printed, holding every fragment; no traceback anywhere; nothing started (the
    launcher's "[launch]" line comes only after every check passed); ``out`` as ``before`` was."""
    text = p.stdout + p.stderr
    assert p.returncode == code, text
    assert "Traceback" not in text, text
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, p.stderr
    last = [ln for ln in p.stderr.splitlines() if ln.strip()][-1]
    assert last == errors[0], text
    for f in fragments:
        assert f in last, last
    assert "[launch]" not in p.stdout
    if out is not None:
        assert snapshot(out) == before
    return last


def launch_in_process(monkeypatch, capsys, *args, env: dict | None = None, cwd: Path | None = None):
    """`python -m train ARGS` called in this process, as a CompletedProcess: a refusal costs no new
    interpreter. Should a check wrongly pass, the launcher's exec of `accelerate launch` raises."""
    import os
    import subprocess

    from helpers.jobs import REPO, job_env
    from train.__main__ import main

    def refuse_exec(*a, **k):
        raise AssertionError("the launcher got past its checks and tried to start the job")

    with monkeypatch.context() as m:
        m.setattr(os, "execvpe", refuse_exec)
        m.chdir(cwd or REPO)
        for k, v in job_env(env).items():
            m.setenv(k, v)
        capsys.readouterr()
        try:
            main(list(args))
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)
