"""The recipe reference (``docs/recipe_reference.md``), generated from the pydantic schema
(:mod:`posttrain.recipe.schema`) and the method registry, so that it cannot miss a key:
``python -m posttrain.recipe_reference > docs/recipe_reference.md`` (``tests/recipe/test_recipe_reference.py`` fails when the
file is out of date)."""

from __future__ import annotations

import json
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

HEADER = """# Recipe reference

Every key a recipe can set, with its default. Generated from the recipe schema (`posttrain/recipe/schema.py`) and the
method registry (`posttrain/methods.py`) by `python -m posttrain.recipe_reference > docs/recipe_reference.md`; a test fails
when this page is out of date. The README's "Recipe reference" shows the same keys as an annotated recipe.

A data key (`data.train`, `data.eval`, `data.test`, `data.forget`, `data.retain`) is one source or a **mixture**: a
list of sources, each with its own `source`/`split`/`columns`/`max_samples`/`options`. Without weights the sources are
concatenated in order (`datasets.concatenate_datasets`, every row once); when every source has a `weight` they are
interleaved with those weights as probabilities (`datasets.interleave_datasets`, seeded by `seed`, stopping when the
first source runs out). Only the columns every source has are kept. The rows per source are logged and written as
comments at the end of `recipe.yaml`.

A recipe may also hold **`stages:`**, a list of runs made in order from one file: each stage is a mapping with a
`name` and the keys it changes (deep-merged onto the recipe's shared keys); stage `NAME` writes to
`<output_dir>/NAME`, and `model` / `ref_model` may be `stage:NAME`, an earlier stage's final model (Pre-DPO,
`recipes/pre_dpo.yaml`). `--resume` skips finished stages.
"""

TRAINING_NOTES = """## training

Hugging Face `TrainingArguments` / the method family's TRL config (`SFTConfig`, `DPOConfig`, `GRPOConfig`;
`TrainingArguments` + `max_length` for unlearning), passed through and checked before the model loads. posttrain's
defaults where they differ from the library's:

| key | default | note |
|---|---|---|
"""

# (key, default, note): posttrain.trainers.common.training_config and the family config builders
TRAINING_DEFAULTS = [
    ("report_to", "none", "or tensorboard / trackio / wandb (install the extra); metrics.jsonl is always written"),
    ("logging_steps", "10", ""),
    ("save_strategy", "steps", ""),
    ("save_steps", "500", ""),
    ("save_total_limit", "2", ""),
    ("gradient_checkpointing", "false", ""),
    ("bf16", "true on a GPU that supports it, else false", ""),
    ("use_cpu", "true without a GPU", ""),
    ("dataloader_num_workers", "0", ""),
    ("disable_tqdm", "false", "a progress bar"),
    ("max_length", "512 (SFT family, unlearning); TRL's default for preference (1024)",
     "rows longer than this are truncated, and rows left with nothing to score dropped, with a logged count"),
    ("completion_only_loss", "method.completion_only_loss (true)", "SFT family: loss on completion tokens only"),
    ("assistant_only_loss", "true for `messages` rows (SFT family), else false",
     "loss on the assistant turns only, for any chat template (`data.assistant_turns`); false: on every token"),
    ("model_init_kwargs", "refused", "posttrain loads the model: use the `model:` keys"),
    ("logprob_head", "auto (preference, SFT, RL, online, KTO and unlearning families)", "auto \\| chunked \\| fused \\| liger: the LM head "
     "of the log-prob engine (docs/logprob_engine.md); auto: chunked on CPU, TRL's fused Triton kernel on CUDA; logged "
     "once"),
    ("share_prompts", "true (preference, RL and online families)", "each pair's prompt computed once for chosen and "
     "rejected (online DPO: for its two sampled completions), each GRPO prompt once for its G completions (policy, old "
     "policy and reference); false: every row runs whole, same losses"),
]


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(json.dumps(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " \\| ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(annotation))}]"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _default(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "(block below)"
    if isinstance(value, list):
        value = [v.model_dump(exclude_defaults=True) if isinstance(v, BaseModel) else v for v in value]
    return json.dumps(value, default=str)


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def schema_rows(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    """``(dotted key, type, default, description)`` of every field of ``model``, nested models expanded."""
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        rows.append((key, _type_name(field.annotation), _default(field), " ".join((field.description or "").split())))
        for sub in dict.fromkeys(_models_in(field.annotation)):
            if sub.__name__ in ("MethodSpec",):
                continue
            rows.extend(schema_rows(sub, f"{key}."))
    return rows


def _table(rows) -> str:
    out = ["| key | type | default | description |", "|---|---|---|---|"]
    for key, kind, default, text in rows:
        out.append(f"| `{key}` | {kind} | `{default}` | {text.replace('|', '/')} |")
    return "\n".join(out) + "\n"


def generate() -> str:
    from posttrain.methods import METHODS
    from posttrain.recipe import Recipe

    rows = schema_rows(Recipe)
    parts = [HEADER, "## Top-level, model, data, peft, eval\n", _table(rows)]
    parts.append("\n## method\n\n`method.name` picks the method (`posttrain methods`); its hyperparameters are sibling "
                 "keys:\n")
    for name, info in sorted(METHODS.items()):
        params = schema_rows(info.params, "method.")
        parts.append(f"\n### {name} ({info.family})\n\n")
        parts.append(_table(params) if params else "No hyperparameters.\n")
    parts.append("\n" + TRAINING_NOTES)
    parts.extend(f"| `training.{k}` | {d} | {n} |\n" for k, d, n in TRAINING_DEFAULTS)
    return "".join(parts)


if __name__ == "__main__":
    print(generate(), end="")
