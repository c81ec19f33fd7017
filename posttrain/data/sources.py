"""Turning a recipe's data source into a ``datasets.Dataset``, with clear errors for bad data.

A source is a built-in task (``builtin:<task>``), a local ``.json``/``.jsonl``/``.parquet`` file, a local dataset
directory (anything ``datasets.load_dataset`` reads), or a hub dataset
name. Columns can be renamed (``columns: {question: prompt}``) and the size capped (``max_samples``). Rows that cannot
be used are skipped with a logged count; a dataset left empty, or missing a column, is an error naming the key.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from posttrain.errors import UserError, did_you_mean

if TYPE_CHECKING:  # the recipe schema sits above the data loaders (it checks built-in task options with them)
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


@register_task(
    "news",
    "fictitious news articles + questions, MUSE-News in miniature (unlearning): {prompt, completion}; split full, "
    "forget, retain, holdout, {forget,retain,holdout}_text, {forget,retain,holdout}_qa, forget_verbmem",
)
def _news(split: str, **options):
    from posttrain.data.news import news_rows

    return news_rows(split, **options)


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


class _DuplicateKeys(dict):
    """A JSON object that names a key more than once (``duplicate``: the first such key); json keeps the last."""

    duplicate = ""


def _object_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    duplicate = None
    for key, value in pairs:
        if key in out and duplicate is None:
            duplicate = key
        out[key] = value
    if duplicate is None:
        return out
    marked = _DuplicateKeys(out)
    marked.duplicate = duplicate
    return marked


def _duplicate_key(value: Any) -> str | None:
    """The first key named twice in one object anywhere inside ``value`` (a parsed JSON row), or None."""
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, _DuplicateKeys):
            return node.duplicate
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return None


def _read_json_file(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows of a ``.json`` / ``.jsonl`` file (UTF-8, a byte-order mark is fine) and each row's ``file:row`` label
    (``file:LINE`` for JSON lines, ``file:row N`` (0-based) for a JSON list). A key given twice in one object is an
    error (JSON parsers keep the last silently)."""
    from posttrain.paths import read_text

    text = read_text(path)
    if path.suffix == ".jsonl":
        rows, labels = [], []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line, object_pairs_hook=_object_pairs)
            except (json.JSONDecodeError, RecursionError) as exc:
                raise UserError(f"{path}:{lineno}: invalid JSON ({getattr(exc, 'msg', 'nested too deeply')})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object per line")
            rows.append(row)
            labels.append(f"{path}:{lineno} (row {len(rows) - 1})")
        _refuse_duplicate_keys(rows, labels)
        return rows, labels
    try:
        data = json.loads(text, object_pairs_hook=_object_pairs)
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
    labels = [f"{path}:row {i}" for i in range(len(data))]
    _refuse_duplicate_keys(data, labels)
    return data, labels


def _refuse_duplicate_keys(rows: list[dict[str, Any]], labels: list[str]) -> None:
    for row, label in zip(rows, labels, strict=True):
        duplicate = _duplicate_key(row)
        if duplicate is not None:
            raise UserError(f"{label}: key '{duplicate}' appears twice in one object (JSON keeps the last silently); "
                            "give each key once")


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


def _check_rows(rows: list[dict[str, Any]], labels: list[str], key: str) -> list[dict[str, Any]]:
    """Per-row type checks before ``Dataset.from_list`` (which would fail with no row, or accept a wrong type); returns
    the rows with every column of the file (``from_list`` would keep only the first row's keys, silently dropping the
    rest) and ``NaN`` (a JSON extension) read as null."""
    columns = sorted({c for row in rows for c in row})
    rows = [{c: (None if isinstance(row.get(c), float) and math.isnan(row[c]) else row.get(c)) for c in columns}
            for row in rows]
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
    return rows


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
        from posttrain.paths import expand_home

        path = expand_home(name, f"{key}.source")
        # a directory (e.g. a hub dataset cloned or saved locally) goes through load_dataset, like a hub id
        if (path.suffix in {".json", ".jsonl", ".parquet"} or path.exists()) and not path.is_dir():
            if not path.is_file():
                raise UserError(f"{key}.source: file '{name}' not found")
            if path.suffix in {".json", ".jsonl"}:
                rows, labels = _read_json_file(path)
                if not rows:
                    raise UserError(f"{key}: {path} holds no rows")
                rows = _check_rows(rows, labels, key)
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
    renames = {old: new for old, new in src.columns.items() if old != new}  # {a: a} changes nothing
    for old in src.columns:
        if old not in ds.column_names:
            raise UserError(
                f"{key}.columns: column '{old}' not in {name}{did_you_mean(old, ds.column_names)}; "
                f"it has {ds.column_names}"
            )
    replaced = [new for new in renames.values() if new in ds.column_names and new not in renames]
    if replaced:  # the renamed column takes the place of one the file already has
        logger.info("%s.columns: the file's own column%s %s replaced by the renamed one", key,
                    "s" if len(replaced) > 1 else "", ", ".join(repr(c) for c in replaced))
        ds = ds.remove_columns(replaced)
    if renames:
        ds = ds.rename_columns(renames)
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
    if isinstance(value, float):
        return math.isnan(value)
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, list):
        return len(value) == 0
    return False


# --------------------------------------------------------------------------------------------------------------------
# row formats: one per source, one per row, well-formed conversations

# roles every chat template is expected to render; a data.chat_template file may name more (template_role_names)
STANDARD_ROLES = ("system", "user", "assistant", "tool")
_QUOTED_NAME = re.compile(r"""['"]([A-Za-z_][A-Za-z0-9_-]{0,31})['"]""")


def template_role_names(template: str) -> tuple[str, ...]:
    """Quoted names in a chat template's text: the roles it may compare with (``message['role'] == 'robot'``)."""
    return tuple(sorted(set(_QUOTED_NAME.findall(template)) - set(STANDARD_ROLES)))


def _turn_error(value: list, roles: set[str]) -> str | None:
    """What is wrong with a conversation (a list of ``{role, content}`` turns), or None."""
    for t, turn in enumerate(value):
        role = turn.get("role")
        if role not in roles:
            known = ", ".join(sorted(roles))
            return f"turn {t} has role {role!r}, which the chat template does not know (roles: {known})"
        content = turn.get("content")
        if content is None and not turn.get("tool_calls"):
            return f"turn {t} ({role}) has content null (expected text; only a turn with tool_calls may have none)"
        if content is not None and not isinstance(content, str | list):
            return f"turn {t} ({role}) has content {_json_type(content)} (expected text)"
    return None


# row kinds posttrain renders itself (posttrain.data.formatting.render_prompt_completion wraps a plain-text side of a
# conversational row as its user / assistant turn); TRL's trainers (sft, preference) need one format per row
SELF_RENDERED_KINDS = ("unlearning", "test")


def check_row_formats(ds, kind: str, key: str, source: str, label=None, roles: tuple[str, ...] = ()) -> None:
    """Errors (naming ``file:row`` and the column) for rows the family's trainer could not read, before any model
    loads: a null prompt; rows of one source in different formats (``{prompt, completion}`` here, ``{messages}``
    there); a row mixing a conversational column with a plain-text one (except where posttrain renders the rows,
    :data:`SELF_RENDERED_KINDS`); a conversation with a turn whose role the chat template does not know (``roles``:
    besides :data:`STANDARD_ROLES`) or whose content is null."""
    label = label or (lambda i: f"{source} row {i}")
    names = ds.column_names
    alternatives = [a for a in REQUIRED_COLUMNS[kind] if all(c in names for c in a)]
    wanted = sorted({c for a in alternatives for c in a} | {c for c in (*TEXT_COLUMNS, "messages") if c in names})
    if len(alternatives) == 1 and not any(_holds_lists(ds, c) for c in wanted):  # one format, plain text: fast path
        if "prompt" in wanted:
            prompts = column_values(ds, "prompt")
            if None in prompts:
                raise UserError(f"{key}: {label(prompts.index(None))}: column 'prompt' is null (expected text or a "
                                "list of messages; an empty prompt is \"\")")
        return
    values = {c: column_values(ds, c) for c in wanted}
    allowed = set(STANDARD_ROLES) | set(roles)
    first_shape: tuple[tuple[str, ...], int] | None = None
    for i in range(len(ds)):
        filled = {c for c in wanted if values[c][i] is not None}
        shape = next((a for a in alternatives if set(a) <= filled), None)
        if shape is None and "prompt" in names and values["prompt"][i] is None and "prompt" in alternatives[0]:
            raise UserError(f"{key}: {label(i)}: column 'prompt' is null (expected text or a list of messages; an "
                            "empty prompt is \"\")")
        if shape is not None and len(alternatives) > 1:
            if first_shape is None:
                first_shape = (shape, i)
            elif shape != first_shape[0]:
                def show(a):
                    return "{" + ", ".join(a) + "}"

                if set(first_shape[0]) ^ set(shape) == {"prompt"}:  # one row has a prompt, the other's is null
                    null, other = (i, first_shape[1]) if values["prompt"][i] is None else (first_shape[1], i)
                    raise UserError(f"{key}: {label(null)}: column 'prompt' is null, but {label(other)} has one "
                                    "(give every row a prompt, or none)")
                raise UserError(f"{key}: {label(i)}: row has {show(shape)} but {label(first_shape[1])} has "
                                f"{show(first_shape[0])}; give every row of a source the same format (split the file)")
        conversational = [c for c in wanted if c in (*TEXT_COLUMNS, "messages") and isinstance(values[c][i], list)]
        plain = [c for c in wanted if c in TEXT_COLUMNS and isinstance(values[c][i], str)]
        if conversational and plain and kind not in SELF_RENDERED_KINDS:
            raise UserError(f"{key}: {label(i)}: column '{plain[0]}' is plain text but '{conversational[0]}' is a list "
                            "of messages; give the columns of a row in one format (all messages, or all text)")
        for c in conversational:
            problem = _turn_error(values[c][i], allowed)
            if problem:
                raise UserError(f"{key}: {label(i)}: column '{c}': {problem}")


def _holds_lists(ds, column: str) -> bool:
    """Whether a column may hold conversations (its Arrow type is not plain text or a number)."""
    from datasets import Value

    feature = ds.features[column]
    return not (isinstance(feature, Value) and feature.dtype in ("string", "large_string", "null", "int64", "float64",
                                                                  "int32", "float32", "bool"))


def _unusable_rows(ds, columns: tuple[str, ...], allow_empty: tuple[str, ...]) -> list[tuple[str, list[int]]]:
    """``[(reason, row indices)]`` of rows a trainer cannot learn from: an empty required value (null, blank, NaN),
    ``messages`` without an assistant turn (no token to score), ``chosen`` identical to ``rejected`` (nothing to
    prefer). A row counts under its first reason only."""
    values = {c: column_values(ds, c) for c in columns}
    checked = [c for c in columns if c not in allow_empty]
    out: list[tuple[str, list[int]]] = []
    taken: set[int] = set()

    def add(reason: str, rows: list[int]) -> None:
        rows = [i for i in rows if i not in taken]
        if rows:
            out.append((reason, rows))
            taken.update(rows)

    for c in checked:
        add(f"with an empty {c}", [i for i in range(len(ds)) if _is_empty(values[c][i])])
    if "messages" in columns:
        add("whose messages have no assistant turn (nothing to learn)",
            [i for i, m in enumerate(values["messages"]) if isinstance(m, list)
             and not any(isinstance(t, dict) and t.get("role") == "assistant" for t in m)])
    if "chosen" in columns and "rejected" in columns:
        add("whose chosen and rejected responses are identical (nothing to prefer)",
            [i for i in range(len(ds)) if values["chosen"][i] == values["rejected"][i]])
    return out


def drop_unusable(ds, columns: tuple[str, ...], key: str, source: str, allow_empty: tuple[str, ...] = ("prompt",),
                  label=None):
    """Skip rows a trainer cannot learn from (:func:`_unusable_rows`), logging the count per reason; error on wrong
    types naming the row (``label(i)``: the row's ``file:row``), and when no row is left."""
    label = label or (lambda i: f"{source} row {i}")
    for col in columns:
        check_value_types(column_values(ds, col), label, col, key)
    unusable = _unusable_rows(ds, columns, allow_empty)
    bad = sorted(i for _, rows in unusable for i in rows)
    for reason, rows in unusable:
        logger.warning("%s: skipped %d of %d rows of %s %s (first: %s)", key, len(rows), len(ds), source, reason,
                       label(rows[0]))
    if len(bad) == len(ds):
        reasons = "; ".join(f"{len(rows)} {reason}" for reason, rows in unusable)
        empty_cols = [c for c in columns if c not in allow_empty and any(reason.endswith(f" {c}")
                                                                        for reason, _ in unusable)]
        cols = f" (column {'/'.join(repr(c) for c in empty_cols)})" if empty_cols else ""
        raise UserError(f"{key}: no usable rows left in {source}{cols}: all {len(bad)} rows skipped ({reasons})")
    if bad:
        keep = sorted(set(range(len(ds))) - set(bad))
        ds = ds.select(keep)
    return ds


def drop_unanswerable(ds, key: str, source: str = ""):
    """Skip (and count) RL rows whose ``answer`` is null, blank or NaN: a reward that compares with the answer cannot
    score them. Used when a reward needs the answer (posttrain.families.rl.trainer.check_rl_data)."""
    answers = column_values(ds, "answer")
    bad = [i for i, a in enumerate(answers) if _is_empty(a)]
    if not bad:
        return ds
    where = f" of {source}" if source else ""
    if len(bad) == len(ds):
        raise UserError(f"{key}: no usable rows left{where}: every row's 'answer' is null, empty or NaN, and the "
                        "rewards compare with it")
    logger.warning("%s: skipped %d of %d rows%s whose answer is null, empty or NaN (the rewards compare with it; "
                   "first: row %d)", key, len(bad), len(ds), where, bad[0])
    return ds.select(sorted(set(range(len(ds))) - set(bad)))


def load_source(src: DataSource | list[DataSource], key: str, kind: str, seed: int = 0,
                roles: tuple[str, ...] = ()):
    """Load, check and clean a data source for a family (``sft``, ``preference``, ``rl``, ``unlearning``, ``test``);
    a list of sources is a mixture (:func:`load_mixture`). ``roles``: conversation roles allowed besides
    :data:`STANDARD_ROLES` (those a ``data.chat_template`` file names)."""
    if isinstance(src, list):
        return load_mixture(src, key, kind, seed, roles)
    ds, label = _load_rows_with_labels(src, key)
    columns = check_columns(ds, kind, key, src.source)
    check_row_formats(ds, kind, key, src.source, label, roles)
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


def load_mixture(sources: list[DataSource], key: str, kind: str, seed: int = 0, roles: tuple[str, ...] = ()):
    """A mixture: each source loaded and checked on its own (its ``columns``, ``split``, ``max_samples``), reduced
    to the columns every source has, then combined. Without weights the sources are concatenated in order
    (``datasets.concatenate_datasets``: every row once); with weights they are interleaved
    (``datasets.interleave_datasets`` with the weights as probabilities, seeded, stopping when the first source runs
    out: ``first_exhausted``). The rows per source are logged and kept as ``ds.posttrain_mixture``."""
    import datasets

    parts = [load_source(src, f"{key}[{i}]", kind, roles=roles) for i, src in enumerate(sources)]
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
        top = max(weights)  # scaled first: weights near the float maximum would overflow their sum
        total = math.fsum(w / top for w in weights)
        probabilities = [w / top / total for w in weights]
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
