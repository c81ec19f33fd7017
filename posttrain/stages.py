"""Multi-stage recipes: several runs from one recipe file, in order, each in its own output folder.

A recipe with a top-level ``stages:`` list holds the keys every stage shares (model, data, method, training, ...)
plus, per stage, a ``name`` and the keys that stage changes (deep-merged onto the shared ones; ``--set`` overrides
apply to every stage after that). Stage ``NAME`` writes to ``<output_dir>/NAME``; ``model`` or ``ref_model`` may be
``stage:NAME`` (or ``{path: stage:NAME}``), the final model of an earlier stage. Pre-DPO (docs/methods/pre_dpo.md) is
such a recipe: a DPO guide, then DPO from the same start with the guide as the reference.

Every stage is checked before the first one trains. With ``--resume``, finished stages are skipped, the stage that
was interrupted resumes from its newest checkpoint, and the later ones start fresh.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

from posttrain.errors import UserError

STAGE_REF = "stage:"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def merge(base: Any, update: Any) -> Any:
    """``update`` deep-merged onto ``base`` (mappings merge key by key; anything else replaces)."""
    if isinstance(base, dict) and isinstance(update, dict):
        out = dict(base)
        for key, value in update.items():
            out[key] = merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    return copy.deepcopy(update)


def _resolve_refs(data: dict[str, Any], done: dict[str, str], where: str) -> None:
    for key in ("model", "ref_model"):
        value = data.get(key)
        path = value.get("path") if isinstance(value, dict) else value
        if not isinstance(path, str) or not path.startswith(STAGE_REF):
            continue
        name = path[len(STAGE_REF):]
        if name not in done:
            raise UserError(f"{where}.{key}: '{path}' is not an earlier stage (earlier: {', '.join(done) or 'none'})")
        if isinstance(value, dict):
            data[key] = {**value, "path": done[name]}
        else:
            data[key] = done[name]


def split_stages(data: dict[str, Any], overrides: list[str] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """``[(name, recipe data)]`` of a multi-stage recipe (raw data, before validation)."""
    from posttrain.recipe import apply_override

    stages = data.get("stages")
    if not isinstance(stages, list) or not stages:
        raise UserError("stages: expected a non-empty list of stages, each a mapping with a name")
    base = {k: v for k, v in data.items() if k != "stages"}
    out: list[tuple[str, dict[str, Any]]] = []
    done: dict[str, str] = {}
    for i, stage in enumerate(stages):
        where = f"stages[{i}]"
        if not isinstance(stage, dict) or not isinstance(stage.get("name"), str):
            raise UserError(f"{where}.name: every stage is a mapping with a name")
        name = stage["name"]
        if not _NAME.match(name):
            raise UserError(f"{where}.name: '{name}' must be letters, digits, '_', '-' or '.' (it names a folder)")
        if name in done:
            raise UserError(f"{where}.name: stage '{name}' appears twice")
        merged = merge(base, {k: v for k, v in stage.items() if k != "name"})
        for assignment in overrides or []:
            apply_override(merged, assignment)
        root = merged.get("output_dir", "runs/recipe")
        if not isinstance(root, str):
            raise UserError("output_dir: expected a folder path")
        merged["output_dir"] = str(Path(root).expanduser() / name)
        _resolve_refs(merged, done, where)
        done[name] = merged["output_dir"]
        out.append((name, merged))
    return out


def load_stages(path: str | Path, overrides: list[str] | None = None):
    """``[(name, Recipe)]`` when the recipe file at ``path`` has ``stages:``, else ``None``. Every stage is
    validated here (an error names ``stages[i]`` or the key)."""
    from posttrain.recipe import check_depth, load_yaml, parse_recipe, read_text

    path = Path(path).expanduser()
    if not path.is_file():
        return None
    try:
        data = load_yaml(read_text(path)) or {}
    except Exception:  # noqa: BLE001 - load_recipe reports unreadable files with its own message
        return None
    if not isinstance(data, dict) or "stages" not in data:
        return None
    check_depth(data)
    out = []
    for name, stage in split_stages(data, overrides):
        try:
            recipe = parse_recipe(stage)
        except UserError as exc:
            raise UserError(f"stage '{name}': {exc}") from None
        recipe._source_dir = path.resolve().parent
        out.append((name, recipe))
    return out


def run_stages(stages, *, resume: bool, overwrite: bool, command: str | None = None) -> list[dict[str, Any]]:
    """Train the stages in order; returns their summaries."""
    import logging

    from posttrain.train import run
    from posttrain.trainers.common import previous_outputs

    logger = logging.getLogger("posttrain")
    summaries = []
    for name, recipe in stages:
        out = Path(recipe.output_dir)
        started = bool(previous_outputs(out))
        logger.info("stage '%s' -> %s", name, out)
        summary = run(recipe, resume=resume and started, overwrite=overwrite and not resume, command=command)
        summary["stage"] = name
        summaries.append(summary)
    return summaries
