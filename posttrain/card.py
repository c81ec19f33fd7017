"""The model card (``README.md``) of a run's output folder and of each checkpoint.

Written on every save (checkpoints and the final save, by :class:`posttrain.trainers.common.AtomicCheckpointMixin`)
and once more at the end of the run with the final summary. It names the base model, the method and its paper, the
data sources, the hyperparameters that differ from the defaults, the metrics, and the command that reproduces the
run from the resolved ``recipe.yaml`` saved next to it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Any

# Logged metrics shown in the card's main table (first match wins the order); the others go to a folded table.
KEY_METRICS = [
    r"loss", r"eval_loss", r"eval_test_accuracy", r"eval_test_pass@\d+", r"reward", r"rewards/.+/mean",
    r"rewards/margins", r"rewards/accuracies", r"eval_rewards/margins", r"eval_rewards/accuracies",
    r"eval_mean_token_accuracy", r"mean_token_accuracy", r"forget_answer_prob", r"retain_answer_prob",
    r"eval_forget_Q_A_Prob", r"eval_retain_Q_A_Prob", r"eval_forget_truth_ratio", r"eval_model_utility",
    r"eval_forget_quality",
]
_SKIP = {"step", "epoch", "total_flos", "train_loss", "train_runtime", "train_samples_per_second",
         "train_steps_per_second", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second",
         "eval_periodic_runtime", "step_time"}
_SUMMARY_SKIP = {"method", "output_dir"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclasses.dataclass
class CardContext:
    """What a trainer needs to write the card: the recipe, its method and the command line that ran it."""

    recipe: Any
    info: Any
    command: str | None = None


def _is_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and not Path(name).expanduser().exists()


def last_metrics(log_history: list[dict[str, Any]]) -> dict[str, tuple[int, float]]:
    """The last logged value of every numeric metric, with its step."""
    out: dict[str, tuple[int, float]] = {}
    for row in log_history:
        for key, value in row.items():
            if key in _SKIP or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                out[key] = (int(row.get("step", 0)), float(value))
    return out


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (dict, list)):
        return "`" + json.dumps(value, sort_keys=True) + "`"
    return f"`{value}`" if value is not None else "-"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def model_card(ctx: CardContext, *, metrics: dict[str, tuple[int, float]] | None = None,
               summary: dict[str, Any] | None = None, step: int | None = None, checkpoint: bool = False) -> str:
    """The card's Markdown text (with Hugging Face front matter)."""
    recipe, info = ctx.recipe, ctx.info
    resolved = recipe.resolved()
    name = Path(recipe.output_dir).name or "run"
    base = recipe.model.path
    adapter = recipe.peft.type if recipe.peft is not None else None
    tags = list(dict.fromkeys(["posttrain", info.family, info.name] + ([adapter] if adapter else [])))
    front = ["---", f"library_name: {'peft' if adapter else 'transformers'}"]
    if _is_hub_id(base):
        front.append(f"base_model: {base}")
    sources = [(key if not isinstance(value, list) else f"{key}[{i}]", src)
               for key in ("train", "eval", "test", "forget", "retain", "holdout")
               if (value := getattr(recipe.data, key)) is not None
               for i, src in enumerate(value if isinstance(value, list) else [value])]
    hub_data = sorted({src.source for _, src in sources if _is_hub_id(src.source)})
    if hub_data:
        front.append("datasets:\n" + "\n".join(f"- {d}" for d in hub_data))
    front.append("tags:\n" + "\n".join(f"- {t}" for t in tags))
    front.append("---")

    lines = [*front, "", f"# {name}", ""]
    where = f"checkpoint at step {step}" if checkpoint else (f"after {step} steps" if step is not None else "")
    lines.append(f"`{base}` post-trained with the **{info.name}** method ({info.family} family) by posttrain"
                 + (f", {where}." if where else "."))
    lines += ["", "| | |", "|---|---|"]
    base_note = " (posttrain's built-in tiny model, built offline)" if base.startswith("builtin:") else ""
    lines.append(f"| base model | `{_cell(base)}`{base_note} |")
    ref = recipe.ref_model
    if ref is not None:
        lines.append(f"| reference model | `{_cell(ref if isinstance(ref, str) else ref.path)}` |")
    lines.append(f"| method | `{info.name}`: {_cell(info.summary)} |")
    lines.append(f"| paper | {_cell(info.paper)} |")
    if adapter:
        p = recipe.peft
        lines.append(f"| adapter | {adapter} (r={p.r}, lora_alpha={p.lora_alpha}, target_modules="
                     f"{_cell(str(p.target_modules))}) |")
    lines.append(f"| seed | {recipe.seed} |")

    lines += ["", "## Data", "", "| key | source | split | max_samples | options |", "|---|---|---|---|---|"]
    for key, src in sources:
        opts = json.dumps(src.options, sort_keys=True) if src.options else ""
        lines.append(f"| data.{key} | `{_cell(src.source)}` | {src.split} | {src.max_samples or ''} | {_cell(opts)} |")

    lines += ["", "## Hyperparameters", "", "| key | value |", "|---|---|"]
    for key, value in resolved["method"].items():
        lines.append(f"| method.{key} | {_cell(_fmt(value))} |")
    for key, value in recipe.training.items():
        lines.append(f"| training.{key} | {_cell(_fmt(value))} |")
    ev = recipe.eval
    if ev.steps is not None:  # evaluation during training
        lines.append(f"| eval.steps | {ev.steps} (max_samples {ev.max_samples}) |")
        if ev.pass_k:
            lines.append(f"| eval.pass_k | {ev.pass_k} (num_samples {ev.num_samples or max(ev.pass_k)}, "
                         f"temperature {ev.temperature}) |")
        if ev.retain_model:
            lines.append(f"| eval.retain_model | `{_cell(ev.retain_model)}` |")

    lines += ["", "## Results", ""]
    final = [(k, v) for k, v in (summary or {}).items() if k not in _SUMMARY_SKIP and v is not None]
    if final:
        lines += ["At the end of training (`summary.json`):", "", "| | |", "|---|---|"]
        lines += [f"| {_cell(k)} | {_cell(_fmt(v))} |" for k, v in final]
        lines.append("")
    metrics = metrics or {}
    shown: set[str] = set()
    rows = []
    for pattern in KEY_METRICS:
        for key in sorted(k for k in metrics if re.fullmatch(pattern, k) and k not in shown):
            shown.add(key)
            rows.append((key, str(metrics[key][0]), _fmt(metrics[key][1])))
    if rows:
        lines += ["Last logged values (`metrics.jsonl`):", "", "| metric | step | value |", "|---|---|---|"]
        lines += [f"| {_cell(k)} | {s} | {_cell(v)} |" for k, s, v in rows]
    elif not final:
        lines.append("No metrics logged yet.")
    rest = sorted(k for k in metrics if k not in shown)
    if rest:
        lines += ["", "<details><summary>Every logged metric (last value)</summary>", "",
                  "| metric | step | value |", "|---|---|---|"]
        lines += [f"| {_cell(k)} | {metrics[k][0]} | {_fmt(metrics[k][1])} |" for k in rest]
        lines += ["", "</details>"]
    lines += ["", "Curves: `report.html` in the run folder (`posttrain report RUN_DIR`); every logged value: "
              "`metrics.jsonl`."]

    lines += ["", "## Reproduce", "", "`recipe.yaml` next to this card is the fully resolved recipe (defaults filled "
              "in, overrides applied):", "", "```bash", f"posttrain train recipe.yaml --output-dir {name}-again",
              "```"]
    if ctx.command:
        lines += ["", "Command that ran it:", "", "```bash", ctx.command, "```"]

    lines += ["", "## Use", "", "```python"]
    if adapter:
        from posttrain.adapters.spec import adapter_variant

        lines += list(adapter_variant(recipe.peft).usage)
    else:
        lines += ["from transformers import AutoModelForCausalLM",
                  'model = AutoModelForCausalLM.from_pretrained("PATH")']
    lines += ["from transformers import AutoTokenizer", 'tokenizer = AutoTokenizer.from_pretrained("PATH")', "```", ""]
    return "\n".join(lines)


def minimal_card(method: str | None, base: str | None) -> str:
    """Card of a trainer used from Python without a recipe (no :class:`CardContext`)."""
    text = ["---", "library_name: transformers", "tags:", "- posttrain", "---", "",
            f"# {method or 'posttrain'} run", ""]
    text.append(f"Trained by posttrain{f' with method `{method}`' if method else ''}"
                f"{f' from `{base}`' if base else ''}. Metrics: `metrics.jsonl` when run with `posttrain train`.")
    return "\n".join(text) + "\n"


def write_card(directory: str | Path, text: str) -> Path:
    """Write ``README.md`` atomically (a reader never sees half a card)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / ".README.md.tmp"
    tmp.write_text(text)
    os.replace(tmp, directory / "README.md")
    return directory / "README.md"
