"""docs/recipe_reference.md lists every recipe key with its default (issue 12) and is the generator's output."""

from __future__ import annotations

import typing
from pathlib import Path

from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "recipe_reference.md"


def _keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key of a pydantic model, nested models included (walked here, not by the generator)."""
    out = []
    for name, field in model.model_fields.items():
        key = prefix + name
        out.append(key)
        stack, nested = [field.annotation], []
        while stack:
            ann = stack.pop()
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                nested.append(ann)
            stack.extend(typing.get_args(ann))
        for sub in dict.fromkeys(nested):
            if sub.model_config.get("extra") != "allow":  # method: free-form, listed per method below
                out.extend(_keys(sub, key + "."))
    return out


def test_every_schema_key_is_in_the_reference_with_a_default():
    from posttrain.methods import METHODS
    from posttrain.recipe import Recipe

    text = PAGE.read_text()
    keys = _keys(Recipe) + [k for info in METHODS.values() for k in _keys(info.params, "method.")]
    missing = [k for k in keys if f"| `{k}` |" not in text]
    assert not missing, f"docs/recipe_reference.md lacks {missing[:5]}: run python -m posttrain.recipe_reference"
    assert "| `data.chat_template` | str | `\"auto\"` |" in text
    assert "| `training.max_length` | 512" in text


def test_the_reference_is_up_to_date():
    from posttrain.recipe_reference import generate

    assert PAGE.read_text() == generate(), "regenerate: python -m posttrain.recipe_reference > docs/recipe_reference.md"
