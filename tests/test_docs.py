"""The documents hold together: every relative link in README.md, docs/ and tests/README.md reaches a
file that exists, a link to a heading (`page.md#heading`, `#heading`) reaches a heading there, and
every file of the repository they name (`train/loop.py`, `configs/runs/tiny.yaml`) exists, so a
module that moves takes its documents along.

Fast: reads Markdown files only, starts nothing.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCUMENTS = sorted([REPO / "README.md", REPO / "tests" / "README.md", *(REPO / "docs").glob("*.md")])

FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"(?<!!)\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")  # [text](target "title")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)
# A path in the repository, in prose or code: starts at a top-level folder, not inside another
# path (`outputs/tiny/...`, `/data/runs/...`, `OUTPUT_DIR/...` are the user's). One followed by a
# placeholder (`configs/strategies/<name>.yaml`, `..._<date>.json`) names a pattern, not a file
# (possessive `*+`: no backing off to a shorter path before the placeholder).
REPO_PATH = re.compile(r"(?<![\w./~$-])((?:train|tests|configs|k8s|compose|docker|bench-results|docs)/[\w./-]*+)(?![<*{$])")


def prose(text: str) -> str:
    """The text a reader sees as prose: code blocks and inline code hold no links."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def links(doc: Path) -> list[str]:
    return LINK.findall(prose(doc.read_text()))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = text.replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    """Every heading's anchor; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for heading in HEADING.findall(FENCE.sub("", doc.read_text())):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken(doc: Path, target: str) -> str | None:
    """Why `target`, linked from `doc`, reaches nothing; None if it does (or is not relative)."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto: ...: not a file here
        return None
    path, _, fragment = target.partition("#")
    dest = (doc.parent / unquote(path)).resolve() if path else doc
    if not dest.exists():
        return f"{target}: no such file {dest.relative_to(REPO)}"
    if fragment and dest.suffix == ".md" and fragment not in anchors(dest):
        return f"{target}: {dest.relative_to(REPO)} has no heading #{fragment}"
    return None


def named_paths(doc: Path) -> list[str]:
    return [m.rstrip(".-") for m in REPO_PATH.findall(doc.read_text())]


def test_the_documents_are_found():
    assert (REPO / "README.md") in DOCUMENTS and any(d.parent.name == "docs" for d in DOCUMENTS)
    assert all(links(d) for d in (REPO / "README.md", REPO / "docs" / "configuration.md")), \
        "no links found: the link pattern no longer matches the documents"
    assert "train/config/exitcodes.py" in named_paths(REPO / "README.md"), "the path pattern no longer matches"


@pytest.mark.parametrize("doc", DOCUMENTS, ids=lambda d: str(d.relative_to(REPO)))
def test_every_relative_link_reaches_a_file_and_heading(doc: Path):
    bad = [why for target in links(doc) if (why := broken(doc, target))]
    assert not bad, f"{doc.relative_to(REPO)} links to what does not exist:\n  " + "\n  ".join(bad)


@pytest.mark.parametrize("doc", DOCUMENTS, ids=lambda d: str(d.relative_to(REPO)))
def test_every_repository_file_named_exists(doc: Path):
    missing = sorted({p for p in named_paths(doc) if not (REPO / p).exists()})
    assert not missing, f"{doc.relative_to(REPO)} names files the repository does not have (moved?): {missing}"


def test_the_readme_links_every_docs_page():
    linked = {(REPO / t.partition("#")[0]).resolve() for t in links(REPO / "README.md")}
    unlinked = [p.name for p in (REPO / "docs").glob("*.md") if p.resolve() not in linked]
    assert not unlinked, f"README.md's Documentation table does not link docs/{unlinked}"
