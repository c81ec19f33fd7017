"""How a data row becomes text for the model: the one place that applies chat templates.

Every trainer and evaluator reads rows in TRL's formats, either plain text or conversational (lists of
``{"role", "content"}`` messages). TRL's trainers (SFT, DPO, GRPO) apply the chat template themselves; everything
posttrain tokenises on its own (the unlearning family, ``data.test`` accuracy, ``posttrain eval`` (accuracy, pass@k,
``--suite tofu``), ``posttrain poft-score``, the expected-reward check) calls :func:`render_prompt` /
:func:`render_prompt_completion` here, which use ``trl.data_utils`` (``is_conversational``,
``maybe_apply_chat_template``), so a conversational row is rendered exactly as TRL renders it for training.

``data.chat_template`` decides what happens to *plain-text* prompts on a model that has a chat template
(:func:`resolve_chat_format`):

* ``auto`` (default): wrapped as one user turn (and the completion as the assistant turn) when the tokenizer has a
  chat template, except on the built-in tiny models, which were trained on raw ``a+b=`` text (their template is for
  conversational rows);
* ``none``: plain text stays plain text (conversational rows still use the template: they cannot be read otherwise);
* ``path/to/template.jinja``: that template replaces the tokenizer's (saved with the model) and prompts are wrapped.

``data.system_prompt`` is put first in every conversational prompt (and every wrapped one) that has no system turn.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path
from typing import Any

from posttrain.errors import UserError

logger = logging.getLogger("posttrain")

# columns that hold a conversation turn (or a whole conversation: ``messages``)
COMPLETION_COLUMNS = ("completion", "chosen", "rejected")
GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")


@dataclasses.dataclass(frozen=True)
class ChatFormat:
    """The resolved ``data.chat_template`` / ``data.system_prompt`` of a run."""

    wrap: bool = False  # plain-text prompts become a user turn
    system_prompt: str | None = None
    mode: str = "none"  # the recipe value it was resolved from (auto | none | path)
    reason: str = ""

    def describe(self) -> str:
        effect = ("plain-text prompts are wrapped as a user turn of the chat template" if self.wrap
                  else "plain-text prompts are used as they are (conversational rows still use the chat template)")
        why = f" ({self.reason})" if self.reason else ""
        system = f"; system prompt: {self.system_prompt!r}" if self.system_prompt else ""
        return f"data.chat_template: {self.mode}{why}: {effect}{system}"


PLAIN = ChatFormat()


def is_conversation(value: Any) -> bool:
    """A list of ``{"role", "content"}`` messages (TRL's conversational form)."""
    return isinstance(value, list) and len(value) > 0 and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) for m in value
    )


def content_text(value: Any) -> str:
    """The text of a completion: plain text as it is, a conversation's last message content."""
    if is_conversation(value):
        content = value[-1].get("content")
        return content if isinstance(content, str) else str(content or "")
    return "" if value is None else str(value)


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def has_generation_markers(tokenizer) -> bool:
    """Whether the chat template marks assistant turns with ``{% generation %}`` (TRL's ``assistant_only_loss``)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):
        template = " ".join(template.values())
    return bool(GENERATION_MARKER.search(template))


def _need_template(tokenizer, where: str) -> None:
    if not has_chat_template(tokenizer):
        raise UserError(
            f"{where}: conversational rows need a chat template, and the model's tokenizer has none; set "
            "data.chat_template: path/to/template.jinja (or give the rows as plain text)"
        )


def render_prompt(prompt: Any, tokenizer, where: str = "data") -> str:
    """The text a model is given for ``prompt``: a conversation goes through the chat template with the generation
    prompt (``trl.data_utils.maybe_apply_chat_template``); plain text is returned as it is."""
    if not is_conversation(prompt):
        return "" if prompt is None else str(prompt)
    from trl.data_utils import maybe_apply_chat_template

    _need_template(tokenizer, where)
    return maybe_apply_chat_template({"prompt": prompt}, tokenizer)["prompt"]


def render_prompts(prompts, tokenizer, where: str = "data") -> list[str]:
    return [render_prompt(p, tokenizer, where) for p in prompts]


def render_prompt_completion(prompt: Any, completion: Any, tokenizer, where: str = "data") -> tuple[str, str]:
    """``(prompt text, completion text)`` of a prompt/completion pair. Plain text: as given, with the tokenizer's EOS
    appended to the completion (TOFU's training format). Conversational (either side; a plain side is wrapped as the
    user / assistant turn): TRL's rendering, whose completion ends with the template's end-of-turn."""
    if not is_conversation(prompt) and not is_conversation(completion):
        return ("" if prompt is None else str(prompt)), str(completion) + (tokenizer.eos_token or "")
    from trl.data_utils import maybe_apply_chat_template

    _need_template(tokenizer, where)
    if not is_conversation(prompt):
        prompt = [{"role": "user", "content": "" if prompt is None else str(prompt)}]
    if not is_conversation(completion):
        completion = [{"role": "assistant", "content": str(completion)}]
    out = maybe_apply_chat_template({"prompt": prompt, "completion": completion}, tokenizer)
    return out["prompt"], out["completion"]


# --------------------------------------------------------------------------------------------------------------------
# data.chat_template / data.system_prompt
# --------------------------------------------------------------------------------------------------------------------


def template_path(mode: str, base_dir: Path | None = None) -> Path | None:
    """The ``.jinja`` file of ``data.chat_template`` (looked up next to the recipe, then in the working directory);
    ``None`` for ``auto`` / ``none``. A missing file is an error."""
    if mode in ("auto", "none"):
        return None
    path = Path(mode).expanduser()
    candidates = [path] if path.is_absolute() else [p for p in ((base_dir / path) if base_dir else None, path) if p]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise UserError(f"data.chat_template: template file '{mode}' not found (auto, none, or a .jinja file)")


def resolve_chat_format(data_spec, model_path: str, tokenizer, base_dir: Path | None = None) -> ChatFormat:
    """Resolve ``data.chat_template`` for a loaded tokenizer (a ``.jinja`` file is installed on it) and log the effect
    once."""
    mode = data_spec.chat_template
    system = data_spec.system_prompt
    path = template_path(mode, base_dir)
    if path is not None:
        from posttrain.recipe import read_text

        tokenizer.chat_template = read_text(path)
        fmt = ChatFormat(True, system, mode, f"template from {path}")
    elif mode == "none":
        fmt = ChatFormat(False, system, mode, "")
    elif not has_chat_template(tokenizer):
        fmt = ChatFormat(False, system, "auto", "the tokenizer has no chat template")
    elif str(model_path).startswith("builtin:") or is_builtin_template(tokenizer):
        fmt = ChatFormat(False, system, "auto", "the built-in tiny models are trained on raw text prompts")
    else:
        fmt = ChatFormat(True, system, "auto", "the tokenizer has a chat template")
    if system and not has_chat_template(tokenizer):
        raise UserError("data.system_prompt: the model's tokenizer has no chat template to put a system turn in; set "
                        "data.chat_template: path/to/template.jinja or remove data.system_prompt")
    return fmt


def is_builtin_template(tokenizer) -> bool:
    """Whether the tokenizer carries the built-in tiny models' chat template (their fine-tunes and run folders too)."""
    from posttrain.builtin import __file__ as builtin_init

    path = Path(builtin_init).parent / "assets" / "tokenizer" / "chat_template.jinja"
    try:
        return path.read_text().strip() == str(getattr(tokenizer, "chat_template", "") or "").strip()
    except OSError:
        return False


def command_chat_format(model_path: str, tokenizer, chat_template: str | None = None,
                        system_prompt: str | None = None) -> ChatFormat:
    """The chat format of a command that is given a model (``posttrain eval``, ``poft-score``): ``chat_template`` /
    ``system_prompt`` when given, else the run's ``recipe.yaml`` values for a run folder, else ``auto``. A run's
    ``.jinja`` template is already installed on the tokenizer saved with it."""
    import types

    mode, system = "auto", None
    recipe_file = Path(model_path).expanduser() / "recipe.yaml"
    if recipe_file.is_file():
        import yaml

        data = (yaml.safe_load(recipe_file.read_text()) or {}).get("data") or {}
        mode, system = data.get("chat_template") or "auto", data.get("system_prompt")
        if mode not in ("auto", "none"):
            mode = "auto"  # the template the run used is the tokenizer's now
    if chat_template is not None:
        mode = chat_template
    if system_prompt is not None:
        system = system_prompt
    spec = types.SimpleNamespace(chat_template=mode, system_prompt=system)
    fmt = resolve_chat_format(spec, model_path, tokenizer)
    logger.info("%s", fmt.describe())
    return fmt


def _wrap_row(row: dict[str, Any], fmt: ChatFormat) -> dict[str, Any]:
    out = {}
    system = [{"role": "system", "content": fmt.system_prompt}] if fmt.system_prompt else []
    prompt = row.get("prompt")
    wrapped = False
    if "prompt" in row:
        if is_conversation(prompt):
            if system and prompt[0].get("role") != "system":
                out["prompt"] = system + list(prompt)
        elif fmt.wrap and isinstance(prompt, str):
            out["prompt"] = system + [{"role": "user", "content": prompt}]
            wrapped = True
        for col in COMPLETION_COLUMNS:
            if col in row and isinstance(row[col], str) and (wrapped or is_conversation(prompt)):
                out[col] = [{"role": "assistant", "content": row[col]}]
    if "messages" in row and is_conversation(row["messages"]) and system and row["messages"][0].get("role") != "system":
        out["messages"] = system + list(row["messages"])
    return out


def apply_chat_format(rows, fmt: ChatFormat):
    """``rows`` (a ``datasets.Dataset`` or a list of dicts) with plain-text prompts wrapped as a user turn (their
    completions as the assistant turn) when ``fmt.wrap``, and the system prompt put first in every conversational
    prompt without one. Rows that are already conversational keep their turns; ``text`` rows are left as they are."""
    if fmt is None or (not fmt.wrap and not fmt.system_prompt):
        return rows
    if isinstance(rows, list):
        return [{**row, **_wrap_row(row, fmt)} for row in rows]
    columns = set(rows.column_names)
    if not columns & {"prompt", "messages"}:
        return rows
    changed = [_wrap_row(rows[i], fmt) for i in range(len(rows))]
    if not any(changed):
        return rows
    import datasets

    data = rows.to_list()
    return datasets.Dataset.from_list([{**row, **change} for row, change in zip(data, changed, strict=True)])
