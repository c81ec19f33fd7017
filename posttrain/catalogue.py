"""What ``posttrain methods`` lists: every method, and every part or option a recipe can select besides
``method.name`` (GRPO advantages, aggregations and clipping rules, adapter types, method options such as
``method.loss: pacs`` / ``ipo`` and ``method.mask: wagle``, ``training.optim: stable_spam``, and the multi-stage
recipes of docs/methods/), each with its docs/methods page.

Everything here is read from the registries and the method parameter models, so a new part appears without an edit.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# method keys whose values select a variant documented on its own page or in the method's (a Literal of names)
SELECTOR_KEYS = ("loss", "mask")


@dataclasses.dataclass(frozen=True)
class Part:
    """A selectable value: ``key`` (recipe key), ``name`` (its value), ``doc`` (docs/methods page), ``where`` (which
    methods take it), ``text`` (one line: the registered function's docstring, or empty)."""

    key: str
    name: str
    doc: str
    where: str = ""
    text: str = ""


def _first_line(doc: str | None) -> str:
    return " ".join((doc or "").split("\n\n")[0].split())


def page_summary(page: str) -> str | None:
    """The first paragraph after the title of a docs/methods page (None when the docs are not installed)."""
    path = ROOT / page.split("#", 1)[0]
    if not path.is_file():
        return None
    paragraphs = [p for p in path.read_text().split("\n\n") if p.strip() and not p.lstrip().startswith("#")]
    return " ".join(paragraphs[0].split()) if paragraphs else None


def page_title(page: str) -> str | None:
    path = ROOT / page.split("#", 1)[0]
    if not path.is_file():
        return None
    first = path.read_text().splitlines()[:1]
    return first[0].lstrip("# ").strip() if first else None


def parts() -> list[Part]:
    """Every selectable part besides ``method.name``, grouped by recipe key."""
    from posttrain.adapters.spec import ADAPTER_VARIANTS
    from posttrain.methods import METHODS
    from posttrain.optim import OPTIMIZERS
    from posttrain.rl.advantages import ADVANTAGES
    from posttrain.rl.aggregation import AGGREGATIONS
    from posttrain.rl.clipping import CLIPPINGS

    grpo = ", ".join(m.name for m in METHODS.values() if "advantage" in m.params.model_fields)  # the GRPO methods
    out: list[Part] = []
    for key, registry, where in (("method.advantage", ADVANTAGES, grpo), ("method.aggregation", AGGREGATIONS, grpo),
                                 ("method.clipping", CLIPPINGS, grpo), ("peft.type", ADAPTER_VARIANTS, "any method")):
        out += [Part(key, e.name, e.doc, where, _first_line(e.fn.__doc__)) for e in registry]
    selectors: dict[tuple[str, str], list[str]] = {}
    for m in METHODS.values():
        for key in SELECTOR_KEYS:
            field = m.params.model_fields.get(key)
            if field is None or typing.get_origin(field.annotation) is not typing.Literal:
                continue
            for value in typing.get_args(field.annotation):
                if value != "none" and value not in METHODS:
                    selectors.setdefault((f"method.{key}", value), []).append(m.name)
    for (key, value), names in selectors.items():
        own = f"docs/methods/{value}.md"
        doc = own if (ROOT / own).is_file() else METHODS[names[0]].doc
        out.append(Part(key, value, doc, ", ".join(names)))
    out += [Part("training.optim", name, f"docs/methods/{name}.md", "any method") for name in OPTIMIZERS]
    covered = {p.doc.split("#", 1)[0] for p in out} | {m.doc for m in METHODS.values()}
    for row in _readme_rows():
        if row["page"] not in covered:  # multi-stage recipes (pre_dpo) and pages of math not yet selectable (spo)
            out.append(Part("page", Path(row["page"]).stem, row["page"], row["selector"], row["what"]))
    return out


def _readme_rows() -> list[dict[str, str]]:
    """The rows of docs/methods/README.md's table: page, recipe selector, what."""
    path = ROOT / "docs" / "methods" / "README.md"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if len(cells) >= 3 and cells[0].startswith("[") and "](" in cells[0]:
            page = "docs/methods/" + cells[0].split("](", 1)[1].rstrip(")")
            rows.append({"page": page, "selector": cells[1].replace("`", ""), "what": cells[2]})
    return rows


def find(name: str) -> list[Part]:
    return [p for p in parts() if p.name == name]


def format_default(value: Any) -> str:
    """A parameter default as it would be written in a recipe (YAML flow style, JSON scalars): ``0.2``, ``null``,
    ``[{name: exact_match, weight: 1.0}]``."""
    import yaml
    from pydantic import BaseModel

    def plain(v: Any) -> Any:
        if isinstance(v, BaseModel):
            return {k: plain(x) for k, x in v.model_dump(mode="json").items() if x not in (None, {}, [])}
        if isinstance(v, list | tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    v = plain(value)
    if v is None or isinstance(v, bool | int | float):
        return json.dumps(v)
    text = yaml.safe_dump(v, default_flow_style=True, sort_keys=False, width=10_000).strip()
    return text.removesuffix("...").strip()
