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


@register_task("arithmetic-chat", "the a+b= problems as multi-turn conversations (options.turns exchanges per row) "
               "for chat SFT: {messages}")
def _arithmetic_chat(split: str, **options):
    from posttrain.data.arithmetic import arithmetic_chat_rows

    return arithmetic_chat_rows(split, **options)


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
    # KTO: unpaired rows labelled desirable (true) or undesirable (false); paired rows are unpaired by the trainer
    "unpaired": [("prompt", "completion", "label"), ("prompt", "chosen", "rejected"), ("chosen", "rejected")],
    "rl": [("prompt",)],
    "unlearning": [("prompt", "completion")],
    "test": [("prompt", "answer")],
}


def _read_json_file(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows of a ``.json`` / ``.jsonl`` file (UTF-8, a byte-order mark is fine) and each row's ``file:row`` label
    (``file:LINE`` for JSON lines, ``file:row N`` (0-based) for a JSON list)."""
    from posttrain.recipe import read_text

    text = read_text(path)
    if path.suffix == ".jsonl":
        rows, labels = [], []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as exc:
                raise UserError(f"{path}:{lineno}: invalid JSON ({getattr(exc, 'msg', 'nested too deeply')})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object per line")
            rows.append(row)
            labels.append(f"{path}:{lineno} (row {len(rows) - 1})")
        return rows, labels
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: invalid JSON at line {exc.lineno} ({exc.msg})") from None
    except RecursionError:
        raise UserError(f"{path}: invalid JSON (nested too deeply)") from None
    if isinstance(data, dict):  # {"data": [...]} or {"train": [...]} style
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise UserError(f"{path}: expected a list of objects (or an object holding one list)")
        data = lists[0]
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a list of JSON objects")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise UserError(f"{path}:row {i}: expected a JSON object, got {_json_type(row)}")
    return data, [f"{path}:row {i}" for i in range(len(data))]


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


# columns whose value is text, or TRL's conversational form: a list of {"role", "content"} messages
TEXT_COLUMNS = ("prompt", "completion", "chosen", "rejected", "text")


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in value
    )


def check_value_types(values, labels, column: str, key: str) -> None:
    """Each value of a known column has the type TRL expects; the first that does not names its ``file:row``."""
    for i, value in enumerate(values):
        if value is None:
            continue
        if column == "messages":
            ok, want = _is_messages(value), "a list of {role, content} messages"
        elif column == "answer":
            ok = isinstance(value, str | int | float) and not isinstance(value, bool)
            want = "text or a number"
        elif column in TEXT_COLUMNS:
            ok, want = isinstance(value, str) or _is_messages(value), "text or a list of {role, content} messages"
        else:
            return
        if not ok:
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise UserError(f"{key}: {labels(i)}: column '{column}' must be {want}, got {_json_type(value)} {shown}")


def _check_rows(rows: list[dict[str, Any]], labels: list[str], key: str) -> None:
    """Per-row type checks before ``Dataset.from_list`` (which would fail with no row, or accept a wrong type)."""
    columns = sorted({c for row in rows for c in row})
    for column in columns:
        check_value_types([row.get(column) for row in rows], labels.__getitem__, column, key)
        kinds = {}
        for i, row in enumerate(rows):  # one JSON type per column (a row that differs is named)
            value = row.get(column)
            if value is None:
                continue
            kind = "a number" if isinstance(value, int | float) and not isinstance(value, bool) else _json_type(value)
            first = kinds.setdefault("kind", (kind, i))
            if kind != first[0]:
                raise UserError(f"{key}: {labels[i]}: column '{column}' is {kind}, but {labels[first[1]]} has "
                                f"{first[0]} (one type per column)")


def load_rows(src: DataSource, key: str):
    """Load ``src`` as a ``datasets.Dataset`` (columns renamed, capped to ``max_samples``)."""
    ds, _ = _load_rows_with_labels(src, key)
    return ds


def _load_rows_with_labels(src: DataSource, key: str):
    """``(dataset, label)``: ``label(i)`` names row ``i`` (``file:LINE`` for local files)."""
    import datasets

    labels = None

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
                rows, labels = _read_json_file(path)
                if not rows:
                    raise UserError(f"{key}: {path} holds no rows")
                _check_rows(rows, labels, key)
                try:
                    ds = datasets.Dataset.from_list(rows)
                except Exception as exc:  # inconsistent nested types across rows
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
    if labels is not None:
        return ds, labels.__getitem__
    return ds, lambda i: f"{name} row {i}"


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


def column_values(ds, column: str) -> list[Any]:
    """A column as a Python list (through Arrow: much faster than iterating ``ds[column]``)."""
    return ds.with_format("arrow")[column].to_pylist()


def _is_empty(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, list):
        return len(value) == 0
    return False


def drop_unusable(ds, columns: tuple[str, ...], key: str, source: str, allow_empty: tuple[str, ...] = ("prompt",),
                  label=None):
    """Skip rows whose required columns are empty (logging the count); error on wrong types naming the row
    (``label(i)``: the row's ``file:row``)."""
    label = label or (lambda i: f"{source} row {i}")
    values = {col: column_values(ds, col) for col in columns}
    for col in columns:
        check_value_types(values[col], label, col, key)
    checked = [c for c in columns if c not in allow_empty]
    bad = [i for i in range(len(ds)) if any(_is_empty(values[c][i]) for c in checked)]
    if bad:
        logger.warning(
            "%s: skipped %d of %d rows of %s with an empty %s (first: %s)",
            key, len(bad), len(ds), source, "/".join(c for c in columns if c not in allow_empty), label(bad[0]),
        )
        keep = sorted(set(range(len(ds))) - set(bad))
        ds = ds.select(keep)
    if len(ds) == 0:
        empty_cols = [c for c in checked if any(_is_empty(v) for v in values[c])]
        raise UserError(
            f"{key}: no usable rows left in {source} (all {len(bad)} had empty values in column "
            f"{'/'.join(repr(c) for c in empty_cols)})"
        )
    return ds


def load_source(src: DataSource | list[DataSource], key: str, kind: str, seed: int = 0):
    """Load, check and clean a data source for a family (``sft``, ``preference``, ``rl``, ``unlearning``, ``test``);
    a list of sources is a mixture (:func:`load_mixture`)."""
    if isinstance(src, list):
        return load_mixture(src, key, kind, seed)
    ds, label = _load_rows_with_labels(src, key)
    columns = check_columns(ds, kind, key, src.source)
    if "label" in columns:  # unpaired preference rows: desirable (true) or undesirable (false), nothing else
        check_labels(column_values(ds, "label"), label, key)
    return drop_unusable(ds, columns, key, src.source, label=label)


def check_labels(values, label, key: str) -> None:
    """Each ``label`` of an unpaired preference row is ``true`` (desirable) or ``false`` (undesirable); the first other
    value names its ``file:row``."""
    for i, value in enumerate(values):
        if not isinstance(value, bool):
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise UserError(f"{key}: {label(i)}: column 'label' must be true (desirable) or false (undesirable), got "
                            f"{_json_type(value)} {shown}")


def load_mixture(sources: list[DataSource], key: str, kind: str, seed: int = 0):
    """A mixture: each source loaded and checked on its own (its ``columns``, ``split``, ``max_samples``), reduced
    to the columns every source has, then combined. Without weights the sources are concatenated in order
    (``datasets.concatenate_datasets``: every row once); with weights they are interleaved
    (``datasets.interleave_datasets`` with the weights as probabilities, seeded, stopping when the first source runs
    out: ``first_exhausted``). The rows per source are logged and kept as ``ds.posttrain_mixture``."""
    import datasets

    parts = [load_source(src, f"{key}[{i}]", kind) for i, src in enumerate(sources)]
    shared = [c for c in parts[0].column_names if all(c in p.column_names for p in parts[1:])]
    dropped = sorted({c for p in parts for c in p.column_names} - set(shared))
    if dropped:
        logger.info("%s: mixture: columns not in every source are dropped: %s", key, ", ".join(dropped))
    parts = [p.select_columns(shared) for p in parts]
    for i, p in enumerate(parts[1:], start=1):
        for col in shared:
            if p.features[col] != parts[0].features[col]:
                raise UserError(f"{key}[{i}]: column '{col}' has type {p.features[col]}, but {key}[0] has "
                                f"{parts[0].features[col]} (every source of a mixture needs the same types)")
    weights = [src.weight for src in sources]
    if all(w is not None for w in weights) and len(parts) > 1:
        total = sum(weights)
        probabilities = [w / total for w in weights]
        tagged = [p.add_column("_posttrain_source", [i] * len(p)) for i, p in enumerate(parts)]
        ds = datasets.interleave_datasets(tagged, probabilities=probabilities, seed=seed,
                                          stopping_strategy="first_exhausted")
        drawn = column_values(ds, "_posttrain_source")
        ds = ds.remove_columns("_posttrain_source")
        how = "interleaved with probabilities " + ", ".join(f"{p:.3g}" for p in probabilities)
        how += " (rows drawn: " + ", ".join(str(drawn.count(i)) for i in range(len(parts))) + ")"
    else:
        ds = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
        how = "concatenated"
    text = (f"mixture of {len(parts)} sources, {how}: "
            + "; ".join(f"{src.source} ({src.split}): {len(p)} rows" for src, p in zip(sources, parts, strict=True))
            + f"; {len(ds)} rows in all")
    logger.info("%s: %s", key, text)
    ds.posttrain_mixture = text
    return ds
