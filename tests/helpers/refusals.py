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


