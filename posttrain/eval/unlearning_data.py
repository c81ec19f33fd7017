"""Which rows an unlearning evaluation scores: ``posttrain eval MODEL --suite tofu|unlearning`` and the evaluation
during training (``eval.steps``).

Every evaluation scores the run's own data, or says which data it scores and why; it never falls back silently to a
built-in split. Each *role* (``forget``, ``retain``, ``holdout``, ``wf``, ``verbmem``, ``forget_qa``, ``retain_qa``)
gets its source from, in this order:

1. the command line (``--forget`` / ``--data``, ``--retain``, ``--holdout``, ``--forget-qa``, ``--retain-qa``;
   ``--forget-split`` changes the split of a built-in forget source, or names a ``builtin:facts`` split);
2. the run's ``recipe.yaml`` (``data.forget``, ``data.retain``, ``data.holdout``), unless the forget set was given
   on the command line (then the run's other sets no longer match it);
3. for a built-in forget source whose task defines its evaluation splits (``builtin:facts``, ``builtin:news``): the
   matching splits (``forget05`` -> ``retain95``, ``holdout05``, ``world``; see each task's ``eval_splits``);
4. for a built-in model with no run folder (``builtin:tiny-qwen2-facts``): the forget set of the task it was trained
   on, named in the output;
5. ``verbmem`` and ``forget_qa`` default to the forget set, ``retain_qa`` to the retain set (a question/answer
   forget set is its own verbatim and knowledge set).

No forget set at all is an error that says what to give. Every result names each role's data and where it came from.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from posttrain.errors import UserError

logger = logging.getLogger("posttrain")

ROLES = {"tofu": ("forget", "retain", "holdout", "wf"),
         "unlearning": ("forget", "holdout", "verbmem", "forget_qa", "retain_qa")}
CLI_FLAGS = {"forget": "--forget", "retain": "--retain", "holdout": "--holdout", "forget_qa": "--forget-qa",
             "retain_qa": "--retain-qa"}
RECIPE_ROLES = ("forget", "retain", "holdout")  # data.<role> keys a run's recipe may hold
DEFAULTS = {"verbmem": "forget", "forget_qa": "forget", "retain_qa": "retain"}


def _task_eval_splits():
    from posttrain.data import facts, news

    # built-in task -> fn(forget split) -> {role: split}
    return {"facts": facts.eval_splits, "news": news.eval_splits}


@dataclasses.dataclass
class RoleSource:
    source: Any  # a DataSource or a list of them (a mixture)
    origin: str  # where it came from, for the output

    def describe(self) -> str:
        srcs = self.source if isinstance(self.source, list) else [self.source]
        return " + ".join(_describe(s) for s in srcs)


def _describe(src) -> str:
    text = src.source
    if not src.source.endswith((".json", ".jsonl", ".parquet")) and not Path(src.source).is_dir():
        text += f" {src.split}"
    if src.options:
        text += " " + ",".join(f"{k}={v}" for k, v in sorted(src.options.items()))
    return text


def parse_source(value: Any, flag: str):
    """A data source given on the command line: a path, hub name or ``builtin:task`` string, or a YAML mapping /
    list as in a recipe (``'{source: builtin:facts, split: forget05}'``)."""
    import yaml
    from pydantic import ValidationError

    from posttrain.recipe import DataSpec, validation_error_to_user_error

    try:
        data = yaml.safe_load(value) if isinstance(value, str) else value
    except yaml.YAMLError:
        data = value
    if data is None or isinstance(data, int | float | bool):
        data = str(value)
    try:
        return DataSpec.model_validate({"forget": data}).forget
    except ValidationError as exc:
        message = str(validation_error_to_user_error(exc, DataSpec))
        raise UserError(flag + message.removeprefix("forget")) from None


def _run_data(model: str) -> dict[str, Any]:
    """``data.forget`` / ``data.retain`` / ``data.holdout`` of a run folder's ``recipe.yaml`` (parsed sources)."""
    import yaml

    path = Path(model).expanduser() / "recipe.yaml"
    if not path.is_file():
        return {}
    data = (yaml.safe_load(path.read_text()) or {}).get("data") or {}
    return {role: parse_source(data[role], f"{path}: data.{role}") for role in RECIPE_ROLES if data.get(role)}


def _builtin_forget(model: str):
    if not str(model).startswith("builtin:"):
        return None
    from posttrain.builtin import BUILTIN_MODELS

    spec = BUILTIN_MODELS.get(str(model).split(":", 1)[1])
    return None if spec is None or spec.forget_data is None else spec.forget_data


def resolve_sources(suite: str, *, model: str | None = None, cli: dict[str, Any] | None = None,
                    recipe_data: dict[str, Any] | None = None, forget_split: str | None = None,
                    what: str = "MODEL") -> dict[str, RoleSource]:
    """The source of each role of ``suite`` (``tofu`` or ``unlearning``) that has one (see the module docstring).
    ``cli``: ``{role: source}`` from the command line; ``recipe_data``: the run's ``{role: source}`` (read from
    ``MODEL/recipe.yaml`` when ``None`` and ``model`` is a run folder)."""
    from posttrain.recipe import DataSource

    cli = {role: src for role, src in (cli or {}).items() if src is not None}
    run = _run_data(model) if recipe_data is None and model is not None else dict(recipe_data or {})
    out: dict[str, RoleSource] = {}
    if "forget" in cli:
        forget = RoleSource(cli["forget"], "--forget")
    elif run.get("forget") is not None:
        forget = RoleSource(run["forget"], "the run's data.forget")
    elif forget_split is not None:
        forget = RoleSource(DataSource(source="builtin:facts", split=forget_split), "--forget-split")
    elif model is not None and _builtin_forget(model) is not None:
        forget = RoleSource(DataSource(**_builtin_forget(model)), f"the task {model} was trained on (--forget to "
                            "change)")
    else:
        raise UserError(
            f"--forget: nothing to evaluate: {what} is not a run folder with a data.forget (recipe.yaml), so give the "
            "forget set: --forget FILE|SOURCE (e.g. --forget forget.jsonl --retain retain.jsonl --holdout "
            "holdout.jsonl), or --forget-split forget05 for builtin:facts"
        )
    src = forget.source
    single_builtin = not isinstance(src, list) and src.source.startswith("builtin:")
    if forget_split is not None and forget.origin != "--forget-split":
        if not single_builtin:
            raise UserError(f"--forget-split: sets the split of a built-in forget source; the forget set is "
                            f"{forget.describe()} ({forget.origin})")
        forget = RoleSource(src.model_copy(update={"split": forget_split}), f"{forget.origin}, split from "
                            "--forget-split")
        src = forget.source
    overridden = forget.origin != "the run's data.forget"  # the run's other sets belong to its own forget set
    derived: dict[str, Any] = {}
    task = src.source.split(":", 1)[1] if single_builtin else None
    if task in _task_eval_splits():
        try:
            splits = _task_eval_splits()[task](src.split)
        except ValueError as exc:
            raise UserError(f"{'data.forget' if not overridden else '--forget'}: {exc}") from None
        derived = {role: src.model_copy(update={"split": split, "max_samples": None}) for role, split in
                   splits.items()}
    for role in ROLES[suite]:
        if role in cli and role != "forget":
            out[role] = RoleSource(cli[role], CLI_FLAGS[role])
        elif role == "forget":
            out[role] = forget
        elif role in RECIPE_ROLES and not overridden and run.get(role) is not None:
            out[role] = RoleSource(run[role], f"the run's data.{role}")
        elif role in derived:
            out[role] = RoleSource(derived[role], f"the builtin:{task} split matching {src.split}")
    for role, base in DEFAULTS.items():
        if role in ROLES[suite] and role not in out:
            base_source = out.get(base) or _source_of(base, cli, run, overridden, derived, forget)
            if base_source is not None:
                out[role] = RoleSource(base_source.source, f"the {base} set ({base_source.origin})")
    return out


def _source_of(role, cli, run, overridden, derived, forget) -> RoleSource | None:
    if role == "forget":
        return forget
    if role in cli:
        return RoleSource(cli[role], CLI_FLAGS[role])
    if not overridden and run.get(role) is not None:
        return RoleSource(run[role], f"the run's data.{role}")
    if role in derived:
        return RoleSource(derived[role], f"the split matching {forget.source.split}")
    return None


def load_rows(sources: dict[str, RoleSource], max_samples: int | None = None) -> dict[str, list[dict]]:
    """Each role's rows (``{prompt, completion}`` checked as for training), the first ``max_samples`` of each."""
    import json

    from posttrain.data.sources import load_source

    rows: dict[str, list[dict]] = {}
    loaded: dict[str, list[dict]] = {}  # one list per distinct source: roles reading the same rows share them
    for role, rs in sources.items():
        srcs = rs.source if isinstance(rs.source, list) else [rs.source]
        key = json.dumps([s.model_dump() for s in srcs], sort_keys=True, default=str)
        if key not in loaded:
            flag = CLI_FLAGS.get(role, role) if rs.origin.startswith("--") else f"data.{role}"
            ds = load_source(rs.source, flag, "unlearning")
            loaded[key] = [ds[i] for i in range(len(ds) if max_samples is None else min(max_samples, len(ds)))]
        rows[role] = loaded[key]
    return rows


def describe(sources: dict[str, RoleSource], rows: dict[str, list[dict]]) -> dict[str, str]:
    """``{role: "SOURCE (N rows; where it came from)"}`` for the output."""
    return {role: f"{rs.describe()} ({len(rows[role])} rows; {rs.origin})" for role, rs in sources.items()}


def cli_sources(args) -> dict[str, Any]:
    """The sources given on the ``posttrain eval`` command line (``--data`` is the forget set of a suite)."""
    if getattr(args, "data", None) is not None and getattr(args, "forget", None) is not None:
        raise UserError("--data: with --suite tofu/unlearning --data is the forget set; give --data or --forget, "
                        "not both")
    out = {"forget": args.forget if getattr(args, "forget", None) is not None else getattr(args, "data", None)}
    for role in ("retain", "holdout", "forget_qa", "retain_qa"):
        out[role] = getattr(args, role, None)
    return {role: parse_source(value, "--data" if role == "forget" and args.forget is None else CLI_FLAGS[role])
            for role, value in out.items() if value is not None}
