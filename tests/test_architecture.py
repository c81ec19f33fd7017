"""Repository-wide architecture checks: method documentation lives in the repository (docs/methods/) and code cites it
(or the paper), never a specification file outside the repository."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE = "shared" + "/methods"  # split so that this file does not match itself
# `name.md "Section"` (or `name.md, "Section"`) where name.md is not a path (no `/` before it)
BARE_SECTION_CITATION = re.compile(r"(?<![\w/.-])([\w-]+\.md)\)?,? *\"[A-Z][^\"]*\"")
DOCS_LINK = re.compile(r"docs/methods/([\w-]+\.md)(?:#([\w-]+))?")


def _tracked_text_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split()
    files = []
    for name in out:
        path = ROOT / name
        if path.suffix in {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".cfg", ".json", ".tsv"} and path.is_file():
            files.append(path)
    return files


def _anchors(page: Path) -> set[str]:
    """GitHub-style heading anchors of a markdown page."""
    anchors = set()
    for line in page.read_text().splitlines():
        m = re.match(r"#+\s+(.*)", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            anchors.add(slug)
    return anchors


def test_no_file_cites_specs_outside_the_repository():
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in _tracked_text_files()
                 for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if OUTSIDE in line]
    assert offenders == [], f"cite docs/methods/<page>.md or the paper instead: {offenders}"


def test_section_citations_name_a_docs_path():
    offenders = []
    for p in _tracked_text_files():
        if p.suffix not in {".py", ".md"} or p == Path(__file__).resolve():
            continue
        for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
            for m in BARE_SECTION_CITATION.finditer(line):
                offenders.append(f"{p.relative_to(ROOT)}:{i}: {m.group(0)}")
    assert offenders == [], f"cite docs/<page>.md (docs/methods/<page>.md#anchor) instead: {offenders}"


def test_docs_methods_links_resolve():
    pages = ROOT / "docs" / "methods"
    broken = []
    for p in _tracked_text_files():
        for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
            for m in DOCS_LINK.finditer(line):
                page, anchor = pages / m.group(1), m.group(2)
                if not page.is_file() or (anchor and anchor not in _anchors(page)):
                    broken.append(f"{p.relative_to(ROOT)}:{i}: {m.group(0)}")
    assert broken == [], broken


def test_the_citation_checks_catch_offenders():
    assert BARE_SECTION_CITATION.search('see npo.md "TOFU metrics" here')
    assert BARE_SECTION_CITATION.search('(wpo.md, "Weights")')
    assert not BARE_SECTION_CITATION.search('docs/rlvr.md "Tool calling"')
