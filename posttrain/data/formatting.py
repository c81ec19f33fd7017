"""How a data row becomes text for the model: the one place that applies chat templates.

Every trainer and evaluator reads rows in TRL's formats, either plain text or conversational (lists of
``{"role", "content"}`` messages). Prompts to generate from (``data.test`` accuracy, ``posttrain eval``, the
expected-reward check) go through :func:`render_prompt` (``trl.data_utils.maybe_apply_chat_template``, as TRL's GRPO
renders them). Every path that scores the completion of a conversational row (SFT on ``messages`` or conversational
completions, the preference family on conversational pairs, the unlearning family, ``posttrain eval --suite tofu``,
``posttrain poft-score``) takes its tokens and its mask from :func:`assistant_token_mask` (through
:func:`tokenize_prompt_completion` for prompt/completion rows): the assistant turns and each one's end-of-turn
token, for any chat template (docs/chat_sft.md).

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

import collections
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


def tokenize_prompt_completion(prompt: Any, completion: Any, tokenizer, where: str = "data", turns: str = "all",
                               tools: list | None = None) -> MaskedTokens:
    """The tokens of a prompt/completion pair and the mask of the completion tokens that are scored. Plain text: the
    prompt's tokens, then the completion's with the tokenizer's EOS appended (TOFU's training format), all of them
    scored. Conversational (either side; a plain side is wrapped as the user / assistant turn): the assistant turns
    of the completion and each one's end-of-turn token, found by :func:`assistant_token_mask` (tool results and the
    template's text between turns are not scored); the ids stop after the last scored token."""
    if not is_conversation(prompt) and not is_conversation(completion):
        p = tokenizer("" if prompt is None else str(prompt), add_special_tokens=False)["input_ids"]
        c = tokenizer(str(completion) + (tokenizer.eos_token or ""), add_special_tokens=False)["input_ids"]
        return MaskedTokens(p + c, [0] * len(p) + [1] * len(c), ((len(p), len(p) + len(c)),), "text")
    if not is_conversation(prompt):
        prompt = [{"role": "user", "content": "" if prompt is None else str(prompt)}]
    if not is_conversation(completion):
        completion = [{"role": "assistant", "content": str(completion)}]
    out = assistant_token_mask(list(prompt) + list(completion), tokenizer, first_message=len(prompt), turns=turns,
                               tools=tools, where=where)
    end = out.spans[-1][1] if out.spans else len(out.input_ids)
    return MaskedTokens(out.input_ids[:end], out.mask[:end], out.spans, out.source)


# --------------------------------------------------------------------------------------------------------------------
# Assistant-only loss for any chat template
# --------------------------------------------------------------------------------------------------------------------

ASSISTANT_TURNS = ("all", "last")
_PROBE = {"role": "user", "content": "Hi"}  # a next message, to see where a final assistant turn ends


@dataclasses.dataclass(frozen=True)
class MaskedTokens:
    """The token ids of a rendered row, and ``mask`` (1 on the tokens a loss or score is on)."""

    input_ids: list[int]
    mask: list[int]
    spans: tuple[tuple[int, int], ...] = ()  # [start, end) of each scored part, in order
    source: str = "prefix"  # how the spans were found: "text" | "prefix" | "generation markers"

    def labels(self) -> list[int]:
        """The ids, with ``-100`` where the mask is 0 (Hugging Face's label convention)."""
        return [t if m else -100 for t, m in zip(self.input_ids, self.mask, strict=True)]


class _NotPrefixConsistent(Exception):
    def __init__(self, message_index: int, reason: str):
        super().__init__(reason)
        self.message_index, self.reason = message_index, reason


class _Renderer:
    """Renders (text, token ids) of ``messages[:k]``, cached; ids exactly as ``apply_chat_template`` tokenises."""

    def __init__(self, tokenizer, messages: list[dict], tools, where: str):
        self.tokenizer, self.messages, self.tools, self.where = tokenizer, messages, tools, where
        self.cache: dict[tuple[int, bool], tuple[str, list[int]]] = {}
        self.markers = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
        self.blank: dict[int, bool] = {}

    def text(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tools=self.tools, tokenize=False,
                                                  add_generation_prompt=generation_prompt)

    def ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prefetch(self, keys: list[tuple[int, bool]]) -> None:
        """Render ``keys`` and tokenise them in one batch (renders that fail are left to :meth:`__call__`)."""
        texts = {}
        for key in dict.fromkeys(keys):
            if key not in self.cache:
                try:
                    texts[key] = self.text(self.messages[: key[0]], key[1])
                except _template_errors():
                    continue
        if texts:
            ids = self.tokenizer(list(texts.values()), add_special_tokens=False)["input_ids"]
            self.cache.update({k: (t, list(x)) for (k, t), x in zip(texts.items(), ids, strict=True)})

    def __call__(self, k: int, generation_prompt: bool) -> tuple[str, list[int]]:
        if (k, generation_prompt) not in self.cache:
            text = self.text(self.messages[:k], generation_prompt)
            self.cache[k, generation_prompt] = text, self.ids(text)
        return self.cache[k, generation_prompt]

    def is_blank(self, token_id: int) -> bool:
        if token_id not in self.blank:
            self.blank[token_id] = self.tokenizer.decode([token_id]).strip() == ""
        return self.blank[token_id]

    def is_marker_or_blank(self, token_id: int) -> bool:
        return token_id in self.markers or self.is_blank(token_id)


def _template_errors() -> tuple[type[Exception], ...]:
    """What a chat template raises on a conversation it refuses (``raise_exception``, a missing key, ...)."""
    from jinja2 import TemplateError

    return (TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError)


def _prefix_span(r: _Renderer, i: int, full_text: str, full_ids: list[int]) -> tuple[int, int]:
    """[start, end) of assistant message ``i`` in ``full_ids``: it starts where ``messages[:i]`` rendered with the
    generation prompt ends and ends where ``messages[:i+1]`` stops agreeing with the whole conversation (after the
    last message: with the conversation plus a probe user turn), so text the template adds only at the end of a
    conversation (Phi-3's EOS) or between turns (ChatML's newline) is not part of it."""
    from trl.data_utils import common_prefix_length

    if i == 0:
        raise _NotPrefixConsistent(i, "has no conversation before it to render with the generation prompt")
    try:
        prefix_text, prefix_ids = r(i, True)
        turn_ids = r(i + 1, False)[1]
    except _template_errors() as exc:
        raise _NotPrefixConsistent(i, f"cannot be rendered without the turns after it ({exc})") from None
    if i + 1 < len(r.messages):
        next_ids, probe = full_ids, False
    else:
        try:
            next_ids, probe = r.ids(r.text([*r.messages, _PROBE], False)), True
        except _template_errors():
            next_ids, probe = None, True
    if not full_text.startswith(prefix_text):
        raise _NotPrefixConsistent(i, "follows a prompt that renders differently alone (with the generation prompt) "
                                      "than inside the whole conversation")
    start = common_prefix_length(prefix_ids, full_ids)  # a token merged across the boundary belongs to the turn
    end = len(turn_ids)
    if next_ids is not None:
        agree = common_prefix_length(turn_ids, next_ids)
        if agree >= start and all(r.is_marker_or_blank(t) for t in turn_ids[agree:]):
            end = agree  # what follows is end-of-conversation text (special tokens, whitespace)
        elif not probe:
            raise _NotPrefixConsistent(i, "is rendered differently once later messages follow")
    if full_ids[:end] != turn_ids[:end]:
        raise _NotPrefixConsistent(i, "is rendered differently once later messages follow")
    last = end - 1
    while last >= start and r.is_blank(turn_ids[last]):
        last -= 1
    if last >= start and turn_ids[last] in r.markers:
        end = last + 1  # the end-of-turn token, not the whitespace the template puts after it
    return start, end


def _marker_spans(r: _Renderer, targets: list[int], full_ids: list[int]) -> list[tuple[int, int]]:
    """The spans of the template's ``{% generation %}`` blocks, one per assistant message, for ``targets``."""
    out = r.tokenizer.apply_chat_template(r.messages, tools=r.tools, tokenize=True, return_dict=True,
                                          return_assistant_tokens_mask=True)
    if list(out["input_ids"]) != full_ids:
        raise UserError(f"{r.where}: the chat template tokenises differently with return_assistant_tokens_mask")
    mask = list(out["assistant_masks"])
    runs, start = [], None
    for t, bit in enumerate([*mask, 0]):
        if bit and start is None:
            start = t
        elif not bit and start is not None:
            runs.append((start, t))
            start = None
    assistants = [i for i, m in enumerate(r.messages) if m.get("role") == "assistant"]
    if len(runs) != len(assistants):
        raise UserError(f"{r.where}: the chat template's {{% generation %}} blocks ({len(runs)}) do not match the "
                        f"conversation's assistant messages ({len(assistants)})")
    spans = dict(zip(assistants, runs, strict=True))
    return [spans[i] for i in targets]


def assistant_token_mask(messages: list[dict], tokenizer, *, first_message: int = 0, turns: str = "all",
                         tools: list | None = None, where: str = "data") -> MaskedTokens:
    """The token ids of ``messages`` rendered by the tokenizer's chat template (exactly ``apply_chat_template``'s),
    and the mask of the assistant turns at index ``first_message`` or later (``turns="last"``: the last one only):
    each one's content (tool calls included) plus its end-of-turn token. Tool results, other roles, the template's
    headers and the text between turns are never in the mask; the loss on assistant turns only, for any template
    (docs/chat_sft.md).

    Each turn is found by rendering the conversation prefix by prefix and diffing token ids, as LLaMA-Factory and
    axolotl do: assistant message ``i`` starts after ``messages[:i]`` rendered with the generation prompt, and ends
    where ``messages[:i+1]`` parts from the whole conversation (the last message: from the conversation plus a probe
    user turn), less the whitespace after its end-of-turn token. That needs a prefix-consistent template (rendering a
    conversation does not change how its earlier turns render); one that is not (e.g. it strips the reasoning of
    earlier turns, or moves the system prompt to the last user turn) falls back to the template's
    ``{% generation %}`` markers, and without them raises a :class:`UserError` naming the turn. A conversation with
    no assistant turn to score gets an empty mask (callers skip it with a count)."""
    _need_template(tokenizer, where)
    if turns not in ASSISTANT_TURNS:
        raise ValueError(f"turns must be one of {ASSISTANT_TURNS}, got {turns!r}")
    messages = list(messages)
    r = _Renderer(tokenizer, messages, tools, where)
    try:
        full_text, full_ids = r(len(messages), False)
    except _template_errors() as exc:
        raise UserError(f"{where}: the chat template refuses this conversation: {exc}") from None
    targets = [i for i, m in enumerate(messages) if i >= first_message and m.get("role") == "assistant"]
    if turns == "last":
        targets = targets[-1:]
    r.prefetch([key for i in targets if i > 0 for key in ((i, True), (i + 1, False))])
    try:
        spans, source = [_prefix_span(r, i, full_text, full_ids) for i in targets], "prefix"
    except _NotPrefixConsistent as exc:
        if not has_generation_markers(tokenizer):
            turn = sum(1 for m in messages[: exc.message_index + 1] if m.get("role") == "assistant")
            raise UserError(
                f"{where}: the chat template is not prefix-consistent: assistant turn {turn} (message "
                f"{exc.message_index}) {exc.reason}, so its tokens cannot be told apart, and the template has no "
                "{% generation %} markers to fall back on; set data.assistant_turns: last to train on the final "
                "assistant turn only, give a template with markers (data.chat_template: path/to/template.jinja), or "
                "set training.assistant_only_loss: false to put the loss on every token"
            ) from None
        spans, source = _marker_spans(r, targets, full_ids), "generation markers"
    mask = [0] * len(full_ids)
    for start, end in spans:
        mask[start:end] = [1] * (end - start)
    return MaskedTokens(full_ids, mask, tuple(spans), source)


def end_of_turn_ids(tokenizer) -> list[int]:
    """The token the chat template ends an assistant turn with (Qwen's ``<|im_end|>``, Llama-3's ``<|eot_id|>``,
    Phi-3's ``<|end|>``): the last masked token of a probe conversation, when it is a special or added token. Empty
    without a chat template, or when the template refuses the probe."""
    if not has_chat_template(tokenizer):
        return []
    try:
        out = assistant_token_mask([{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}],
                                   tokenizer, where="chat template")
    except UserError:
        return []
    markers = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    last = out.input_ids[out.spans[-1][1] - 1] if out.spans else None
    return [last] if last in markers else []


def row_tools(row: dict[str, Any]) -> list | None:
    """A row's ``tools`` column (TRL's format: a list of JSON schemas, or that list as a JSON string)."""
    import json

    tools = row.get("tools")
    return json.loads(tools) if isinstance(tools, str) else tools


def _mask_row(row: dict[str, Any], i: int, tokenizer, key: str, turns: str) -> dict[str, Any]:
    where = f"{key}: row {i}"
    if "messages" in row:
        out = assistant_token_mask(row["messages"], tokenizer, turns=turns, tools=row_tools(row), where=where)
    else:
        out = tokenize_prompt_completion(row["prompt"], row["completion"], tokenizer, where, turns, row_tools(row))
    return {"input_ids": out.input_ids, "assistant_masks": out.mask, "_mask_source": out.source}


def mask_conversational_rows(rows, tokenizer, key: str, turns: str = "all", num_proc: int | None = None):
    """SFT rows with the loss on their assistant turns, tokenised for TRL's ``SFTTrainer`` (which then builds the
    labels from ``assistant_masks`` and truncates): ``messages`` rows (:func:`assistant_token_mask`) and
    conversational prompt/completion rows (:func:`tokenize_prompt_completion`). Columns ``input_ids`` and
    ``assistant_masks`` are added; rows with no assistant token to train on are dropped with a logged count.
    ``num_proc``: worker processes (``training.dataset_num_proc``; rendering costs grow with the square of the
    number of turns)."""
    rows = rows.map(_mask_row, with_indices=True, num_proc=num_proc,
                    fn_kwargs={"tokenizer": tokenizer, "key": key, "turns": turns})
    keep = [i for i, mask in enumerate(rows["assistant_masks"]) if any(mask)]
    if len(keep) < len(rows):
        first = next(i for i, k in enumerate([*keep, None]) if k != i)
        logger.warning("%s: skipped %d of %d rows with no assistant turn to train on (first: row %d)",
                       key, len(rows) - len(keep), len(rows), first)
    if not keep:
        raise UserError(f"{key}: no row has an assistant turn to train on")
    sources = collections.Counter(rows.select(keep)["_mask_source"])
    how = {"prefix": "rendering each conversation turn by turn", "generation markers": "the template's "
           "{% generation %} markers (it is not prefix-consistent)"}
    logger.info("%s: loss on %s assistant turn%s of %d rows, found by %s", key, turns, "s" if turns == "all" else "",
                len(keep), "; ".join(f"{how[k]} ({n} rows)" if len(sources) > 1 else how[k]
                                     for k, n in sources.items()))
    rows = rows.select(keep) if len(keep) < len(rows) else rows
    return rows.remove_columns("_mask_source")


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
        from posttrain.paths import read_text

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
