"""Turning a recipe's data source into a ``datasets.Dataset``, with clear errors for bad data.

A source is a built-in task (``builtin:<task>``), a local ``.json``/``.jsonl``/``.parquet`` file, a local dataset
directory (anything ``datasets.load_dataset`` reads), or a hub dataset
name. Columns can be renamed (``columns: {question: prompt}``) and the size capped (``max_samples``). Rows that cannot
be used are skipped with a logged count; a dataset left empty, or missing a column, is an error naming the key.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from posttrain.errors import UserError, did_you_mean
from posttrain.recipe import DataSource

logger = logging.getLogger("posttrain")

# Built-in tasks: name -> builder(split, **options) -> list of rows.
BUILTIN_TASKS: dict[str, tuple[Callable[..., list[dict[str, Any]]], str]] = {}


def register_task(name: str, description: str):
    def deco(fn):
        BUILTIN_TASKS[name] = (fn, description)
        return fn

    return deco


def _arithmetic(fmt):
    def build(split: str, **options):
        from posttrain.data.arithmetic import arithmetic_rows

        return arithmetic_rows(fmt, split=split, **options)

    return build


register_task("arithmetic-sft", "a+b= with the answer as completion: {prompt, completion}")(_arithmetic("sft"))
register_task("arithmetic-rl", "a+b= prompts with the verifiable answer: {prompt, answer}")(_arithmetic("rl"))
register_task("arithmetic-pref", "correct vs plausible wrong answer: {prompt, chosen, rejected}")(
    _arithmetic("preference")
)


def _arithmetic_tool(fmt):
    def build(split: str, **options):
        from posttrain.data.arithmetic import arithmetic_tool_rows

        return arithmetic_tool_rows(fmt, split=split, **options)

    return build


register_task(
    "arithmetic-tool-rl",
    "a+b= as a conversational prompt for a calculator tool (method.tools): {prompt: [messages], answer}",
)(_arithmetic_tool("rl"))
register_task(
    "arithmetic-tool-sft",
    "calculator-tool traces (a fraction tool_fraction calls the tool, the rest answer directly), rendered in "
    "posttrain's ChatML tool format: {prompt, completion}",
)(_arithmetic_tool("sft"))


@register_task(
    "facts",
    "fictitious people QA, TOFU in miniature (unlearning): {prompt, completion, paraphrased_answer, "
    "perturbed_answers}; split full, forget01/05/10, retain99/95/90, holdout01/05/10, world, full_world",
)
def _facts(split: str, **options):
    from posttrain.data.facts import facts_rows

    return facts_rows(split, **options)


# Columns each family needs (any one of the alternatives).
REQUIRED_COLUMNS: dict[str, list[tuple[str, ...]]] = {
    "sft": [("prompt", "completion"), ("messages",), ("text",)],
    "preference": [("prompt", "chosen", "rejected"), ("chosen", "rejected")],
    "rl": [("prompt",)],
    "unlearning": [("prompt", "completion")],
    "test": [("prompt", "answer")],
}


def _read_json_file(path: Path) -> list[dict[str, Any]]:
    text = path.read_text()
    if path.suffix == ".jsonl":
        rows = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object per line")
            rows.append(row)
        return rows
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: invalid JSON at line {exc.lineno} ({exc.msg})") from None
    if isinstance(data, dict):  # {"data": [...]} or {"train": [...]} style
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise UserError(f"{path}: expected a list of objects (or an object holding one list)")
        data = lists[0]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise UserError(f"{path}: expected a list of JSON objects")
    return data


def load_rows(src: DataSource, key: str):
    """Load ``src`` as a ``datasets.Dataset`` (columns renamed, capped to ``max_samples``)."""
    import datasets

    name = src.source
    if name.startswith("builtin:"):
        task = name.split(":", 1)[1]
        if task not in BUILTIN_TASKS:
            raise UserError(f"{key}.source: unknown built-in task '{name}'{did_you_mean(task, BUILTIN_TASKS)}")
        builder, _ = BUILTIN_TASKS[task]
        try:
            rows = builder(src.split, **src.options)
        except TypeError as exc:
            raise UserError(f"{key}.options: {exc}") from None
        except ValueError as exc:
            raise UserError(f"{key}: {exc}") from None
        ds = datasets.Dataset.from_list(rows)
    else:
        if src.options:
            raise UserError(f"{key}.options: only built-in tasks take options")
        path = Path(name).expanduser()
        # a directory (e.g. a hub dataset cloned or saved locally) goes through load_dataset, like a hub id
        if (path.suffix in {".json", ".jsonl", ".parquet"} or path.exists()) and not path.is_dir():
            if not path.is_file():
                raise UserError(f"{key}.source: file '{name}' not found")
            if path.suffix in {".json", ".jsonl"}:
                rows = _read_json_file(path)
                if not rows:
                    raise UserError(f"{key}: {path} holds no rows")
                try:
                    ds = datasets.Dataset.from_list(rows)
                except Exception as exc:  # inconsistent types across rows
                    raise UserError(f"{path}: rows have inconsistent columns or types ({_short(exc)})") from None
            elif path.suffix == ".parquet":
                try:
                    ds = datasets.Dataset.from_parquet(str(path))
                except Exception as exc:
                    raise UserError(f"{path}: cannot read parquet ({_short(exc)})") from None
            else:
                raise UserError(f"{key}.source: unsupported file type '{path.suffix}' (use .json, .jsonl or .parquet)")
        else:
            try:
                ds = datasets.load_dataset(name, src.subset, split=src.split)
            except Exception as exc:
                raise UserError(
                    f"{key}.source: cannot load hub dataset '{name}' split '{src.split}' ({_short(exc)})"
                ) from None
    for old, new in src.columns.items():
        if old not in ds.column_names:
            raise UserError(
                f"{key}.columns: column '{old}' not in {name}{did_you_mean(old, ds.column_names)}; "
                f"it has {ds.column_names}"
            )
        if new in ds.column_names and new != old:
            ds = ds.remove_columns(new)
        ds = ds.rename_column(old, new)
    if src.max_samples is not None and len(ds) > src.max_samples:
        ds = ds.select(range(src.max_samples))
    if len(ds) == 0:
        raise UserError(f"{key}: dataset '{name}' is empty")
    return ds


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:200] + ("..." if len(text) > 200 else "")


def check_columns(ds, kind: str, key: str, source: str) -> tuple[str, ...]:
    """Check that ``ds`` has the columns the family ``kind`` needs; return the alternative found."""
    for alternative in REQUIRED_COLUMNS[kind]:
        if all(c in ds.column_names for c in alternative):
            return alternative
    wanted = " or ".join("{" + ", ".join(a) + "}" for a in REQUIRED_COLUMNS[kind])
    missing = [c for c in REQUIRED_COLUMNS[kind][0] if c not in ds.column_names]
    hint = did_you_mean(missing[0], ds.column_names) if missing else ""
    raise UserError(
        f"{key}: {source} is missing column '{missing[0]}'{hint} (needs {wanted}; has {ds.column_names}; "
        f"rename with {key}.columns)"
    )


def _is_empty(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, list):
        return len(value) == 0
    return False


def drop_unusable(ds, columns: tuple[str, ...], key: str, source: str, allow_empty: tuple[str, ...] = ("prompt",)):
    """Skip rows whose required columns are empty (logging the count); error on wrong types naming the row."""
    for col in columns:
        for i, value in enumerate(ds[col]):
            if value is not None and col != "messages" and not isinstance(value, str | list):
                raise UserError(
                    f"{key}: {source} row {i}: column '{col}' must be text, got {type(value).__name__}"
                )
    ds_before = ds
    bad = [
        i
        for i, row in enumerate(ds.select_columns(list(columns)))
        if any(_is_empty(row[c]) for c in columns if c not in allow_empty)
    ]
    if bad:
        logger.warning(
            "%s: skipped %d of %d rows of %s with an empty %s (first: row %d)",
            key, len(bad), len(ds), source, "/".join(c for c in columns if c not in allow_empty), bad[0],
        )
        keep = sorted(set(range(len(ds))) - set(bad))
        ds = ds.select(keep)
    if len(ds) == 0:
        empty_cols = [c for c in columns if c not in allow_empty and any(_is_empty(v) for v in ds_before[c])]
        raise UserError(
            f"{key}: no usable rows left in {source} (all {len(bad)} had empty values in column "
            f"{'/'.join(repr(c) for c in empty_cols)})"
        )
    return ds


def load_source(src: DataSource, key: str, kind: str):
    """Load, check and clean a data source for a family (``sft``, ``preference``, ``rl``, ``unlearning``, ``test``)."""
    ds = load_rows(src, key)
    columns = check_columns(ds, kind, key, src.source)
    return drop_unusable(ds, columns, key, src.source)
