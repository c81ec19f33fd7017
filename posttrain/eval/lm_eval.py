"""Utility benchmarks through lm-evaluation-harness (``posttrain eval MODEL --lm-eval mmlu,wmdp_bio``; the optional
extra ``pip install -e '.[lm-eval]'``).

The loaded model goes to lm-eval's ``HFLM`` wrapper as an instance (the same weights the rest of the evaluation
scores, adapters included) and ``lm_eval.simple_evaluate`` runs the tasks. Task names are lm-eval's (``mmlu``,
``wmdp_bio``, ``wmdp_cyber``, ...; their data come from the Hugging Face hub on first use), plus the tasks in
:data:`LOCAL_TASKS` (shipped with posttrain, offline) and in any ``--lm-eval-include`` folder of task YAMLs. Each
task's headline metrics come back as ``lm_eval/<task>/<metric>`` with the direction that is better: higher, except
for WMDP, whose hazardous knowledge is what unlearning removes (lower, down to chance 0.25).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from posttrain.errors import UserError

logger = logging.getLogger("posttrain")

LOCAL_TASKS = Path(__file__).resolve().parent / "lm_eval_tasks"
LOWER_IS_BETTER_PREFIXES = ("wmdp",)  # hazardous-knowledge benchmarks: the unlearning target
HEADLINE_METRICS = ("acc", "acc_norm", "exact_match")


def parse_tasks(text: str) -> list[str]:
    """``"mmlu,wmdp_bio"`` -> ``["mmlu", "wmdp_bio"]`` (one error line for an empty list)."""
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    if not tasks:
        raise UserError("--lm-eval: give comma-separated lm-evaluation-harness task names, e.g. mmlu,wmdp_bio")
    return tasks


def check_available() -> None:
    """lm-eval is installed (checked before any model loads)."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError("--lm-eval: lm-evaluation-harness is not installed; pip install -e '.[lm-eval]' "
                        "(or pip install lm-eval)") from None


def task_manager(tasks: list[str], include: str | None = None):
    """lm-eval's ``TaskManager`` over posttrain's tasks, ``include`` and, unless every task is found in those,
    lm-eval's own (indexing those ~15k task files takes a while)."""
    from lm_eval.tasks import TaskManager

    if include and not Path(include).expanduser().is_dir():
        raise UserError(f"--lm-eval-include: folder '{include}' not found")
    paths = [str(LOCAL_TASKS)] + ([str(Path(include).expanduser())] if include else [])
    local = TaskManager(include_path=paths, include_defaults=False)
    if all(task in local.all_tasks for task in tasks):
        return local
    return TaskManager(include_path=paths)


def check_tasks(tasks: list[str], manager) -> None:
    known = set(manager.all_tasks)
    for task in tasks:
        if task not in known:
            from posttrain.errors import did_you_mean

            raise UserError(f"--lm-eval: unknown lm-evaluation-harness task '{task}'{did_you_mean(task, known)}")


def better(task: str) -> str:
    return "lower (hazardous knowledge; chance 0.25)" if task.startswith(LOWER_IS_BETTER_PREFIXES) else "higher"


def summarise(results: dict[str, Any], tasks: list[str]) -> dict[str, float]:
    """``{"lm_eval/<task>/<metric>": value}`` of each requested task (a group's aggregate when it is a group,
    e.g. ``mmlu``), for the headline metrics (``acc``, ``acc_norm``, ``exact_match``; lm-eval's ``,none`` filter
    suffix dropped)."""
    out: dict[str, float] = {}
    for task in tasks:
        block = (results.get("groups") or {}).get(task) or (results.get("results") or {}).get(task) or {}
        for key, value in block.items():
            metric, _, _filter = key.partition(",")
            if metric in HEADLINE_METRICS and isinstance(value, int | float):
                out[f"lm_eval/{task}/{metric}"] = float(value)
    return out


def run_lm_eval(model, tokenizer, tasks: list[str], *, include: str | None = None, limit: int | None = None,
                batch_size: int = 8, apply_chat_template: bool = False) -> dict[str, float]:
    """Run lm-eval ``tasks`` on a loaded ``model``; returns :func:`summarise` of the results."""
    check_available()
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    manager = task_manager(tasks, include)
    check_tasks(tasks, manager)
    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    was_training = model.training
    model.eval()
    try:
        results = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit,
                                          apply_chat_template=apply_chat_template, log_samples=False)
    finally:
        model.train(was_training)
    return summarise(results, tasks)


def cli_lm_eval(args) -> int:
    """``posttrain eval MODEL --lm-eval TASKS [--lm-eval-include DIR] [--lm-eval-limit N] [--output FILE]``."""
    import json

    from posttrain.data.formatting import command_chat_format
    from posttrain.loading import load_model_or_run
    from posttrain.models import load_tokenizer

    tasks = parse_tasks(args.lm_eval)
    check_available()
    tok = load_tokenizer(args.model, key="MODEL")
    chat = command_chat_format(args.model, tok, args.chat_template, args.system_prompt)
    model = load_model_or_run(args.model, key="MODEL")
    scores = run_lm_eval(model, tok, tasks, include=args.lm_eval_include, limit=args.lm_eval_limit,
                         batch_size=args.batch_size, apply_chat_template=chat.wrap)
    result = {"model": args.model, "lm_eval": scores, "limit": args.lm_eval_limit,
              "better": {name: better(name.split("/")[1]) for name in scores}}
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"lm-evaluation-harness on {args.model}" + (f" (at most {args.lm_eval_limit} examples per task)"
                                                     if args.lm_eval_limit else ""))
    for name, value in scores.items():
        print(f"{name:<40}{value:>8.4f}  better: {result['better'][name]}")
    return 0
