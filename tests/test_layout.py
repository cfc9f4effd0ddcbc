"""The folders of train/ say which process runs the code, and imports point one way.

- ``config/``: settings, strategies, exit codes. Imports nothing else of train.
- ``launcher/``: the launcher process (once per node; it becomes the per-node supervisor).
- ``worker/``: each rank. ``checkpoint/`` and ``data``: read and written by ranks, read by the launcher.
- ``tools/``: operator commands outside a run (plan, env, bench).
- Leaves both sides read (``progress``: the launcher/worker file protocol; ``memory``: the held-bytes
  formula; ``flops``; ``corpus``) import only ``config``.

The worker never imports the launcher or the tools: a line of worker code must not depend on
state that only exists in another process. Lazy imports inside functions count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from helpers import REPO

PACKAGE = REPO / "train"
LEAVES = {"train.progress", "train.memory", "train.flops", "train.corpus", "train.storage"}
# (importer prefix, what it may not import)
RULES = [
    ("train.config", ("train.",), ("train.config",)),
    ("train.worker", ("train.launcher", "train.tools"), ()),
    ("train.checkpoint", ("train.launcher", "train.tools"), ()),
    # data reads with the run's tokenizer, which the model module loads (presets use the built-in one)
    ("train.data", ("train.launcher", "train.tools", "train.worker"), ("train.worker.model",)),
    ("train.launcher", ("train.tools",), ()),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                mod = ".".join([*base, *([node.module] if node.module else [])])
            else:
                mod = node.module or ""
            found |= {mod} | {f"{mod}.{a.name}" for a in node.names}
    return {m for m in found if m == "train" or m.startswith("train.")}


def _violations() -> list[str]:
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        me = module_name(path)
        for imported in sorted(imports_of(path)):
            for prefix, banned, allowed in RULES:
                if (me == prefix or me.startswith(prefix + ".")) and imported.startswith(banned) \
                        and not imported.startswith(allowed):
                    bad.append(f"{me} imports {imported}")
            if me in LEAVES and imported not in LEAVES and not imported.startswith(("train.config", *LEAVES)):
                bad.append(f"leaf {me} imports {imported}")
    return bad


def test_imports_point_one_way():
    assert _violations() == []


def test_every_module_lives_in_a_room():
    loose = sorted(module_name(p) for p in PACKAGE.glob("*.py")
                   if module_name(p) not in LEAVES | {"train", "train.__main__", "train.data"})
    assert loose == [], "new modules go into config/, launcher/, worker/, checkpoint/ or tools/ (or are leaves)"


@pytest.mark.parametrize("rule", RULES, ids=[r[0] for r in RULES])
def test_the_rules_can_fail(rule, tmp_path, monkeypatch):
    """A worker module that imports the launcher is caught (the check is not vacuous)."""
    prefix, banned, _ = rule
    target = PACKAGE.joinpath(*prefix.split(".")[1:])
    probe = (target / "_probe_layout.py") if target.is_dir() else target.with_name("_probe_layout.py")
    if not target.is_dir():
        pytest.skip(f"{prefix} is a module")
    probe.write_text(f"import {banned[0].rstrip('.')}.x\n")
    try:
        assert any("_probe_layout" in v for v in _violations())
    finally:
        probe.unlink()
