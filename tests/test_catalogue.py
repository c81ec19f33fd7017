"""The README's methods tables are generated from the registries (posttrain.catalogue) and kept current."""

from __future__ import annotations

from pathlib import Path

import pytest

from posttrain.catalogue import README_BEGIN, README_END, readme_tables, with_readme_tables
from posttrain.methods import METHODS
from posttrain.families.rl.parts import ADVANTAGES

ROOT = Path(__file__).resolve().parents[1]


def test_readme_methods_tables_are_current():
    readme = (ROOT / "README.md").read_text()
    assert with_readme_tables(readme) == readme, (
        "README.md's methods tables are stale: run `python -m posttrain.catalogue --write-readme`")


def test_tables_list_every_method_and_part_once():
    tables = readme_tables()
    for name, info in METHODS.items():
        assert tables.count(f"| [`{name}`]({info.doc}) | {info.family} |") == 1, name
    for entry in ADVANTAGES:
        assert tables.count(f"| `method.advantage` | [`{entry.name}`]({entry.doc}) |") == 1, entry.name
    assert "| `method.loss` | [`pacs`](docs/methods/pacs.md) |" in tables


def test_writing_needs_both_markers():
    written = with_readme_tables(f"a\n{README_BEGIN}\nold\n{README_END}\nb")
    assert written == f"a\n{README_BEGIN}\n{readme_tables()}\n{README_END}\nb"
    with pytest.raises(ValueError, match="markers"):
        with_readme_tables("no markers here")
