"""Every Markdown file the repository points to (in code, configs and docs) is in the
repository: a user who follows a docstring or a doc link finds the page."""

from __future__ import annotations

import re
import subprocess

import pytest
from helpers import REPO

# Names of files the tools write (``boxteacher benchmark quality`` -> OUT/quality.md ...),
# not pages of this repository.
WRITTEN_BY_TOOLS = {"quality.md", "summary.md"}
MD_PATH = re.compile(r"(?<![\w/.-])((?:[\w.-]+/)*[\w.-]+\.md)\b")


def referenced_markdown() -> dict[str, set[str]]:
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    found: dict[str, set[str]] = {}
    for name in files:
        if not name.endswith((".py", ".md", ".yaml", ".toml", "Makefile", "Dockerfile", ".sh")) or not (REPO / name).is_file():
            continue
        if name == "tests/test_references.py":  # its by-hand case names a missing page on purpose
            continue
        for ref in MD_PATH.findall((REPO / name).read_text(errors="replace")):
            found.setdefault(ref, set()).add(name)
    return found


def resolves(ref: str, source: str) -> bool:
    candidates = [REPO / ref, (REPO / source).parent / ref, REPO / "docs" / ref]
    return any(c.is_file() for c in candidates)


@pytest.mark.skipif(not (REPO / ".git").exists(), reason="needs a git checkout (the scan reads `git ls-files`)")
def test_every_markdown_reference_resolves():
    refs = referenced_markdown()
    assert "docs/method.md" in refs  # the scan sees the references it checks
    dangling = {
        ref: sorted(sources)
        for ref, sources in refs.items()
        if ref.split("/")[-1] not in WRITTEN_BY_TOOLS and not all(resolves(ref, s) for s in sources)
    }
    assert not dangling, f"references to Markdown files not in the repository: {dangling}"


def test_the_scan_finds_a_dangling_reference_by_hand():
    assert MD_PATH.findall('see implementation-notes.md §4 and docs/method.md, "BoxTeacher"') == [
        "implementation-notes.md",
        "docs/method.md",
    ]
    assert not resolves("implementation-notes.md", "training/boxteacher.py")
    assert resolves("method.md", "training/boxteacher.py")  # docs/method.md
