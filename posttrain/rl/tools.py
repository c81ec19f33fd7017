"""Tool calling for GRPO rollouts (TRL 1.16's ``GRPOTrainer(tools=..., environment_factory=..., rollout_func=...)``).

TRL runs the multi-turn loop: it renders conversational prompts with the tools, parses each completion's tool calls
with the tokenizer's response template, calls the tools, appends their results (masked out of the loss by
``tool_mask``) and lets the model continue. For that the tokenizer needs a chat template that renders tool calls and
tool results, and a response template that parses them. TRL ships both for the chat models it knows (Qwen2.5/3,
Llama 3.1/3.2, ...). For a ChatML tokenizer whose template has no tool format (the built-in tiny models' tokenizer,
and some small chat models), :func:`prepare_tool_tokenizer` installs :data:`CHATML_TOOL_TEMPLATE`: the same ChatML
turns with Qwen's tool-call format (``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` in the assistant turn,
``<tool_response>...</tool_response>`` in a user turn) and TRL's parser for that format. docs/rlvr.md "Tool calling".

:func:`calculator` (a tool function, ``method.tools``) and :class:`ArithmeticEnv` (a TRL environment,
``method.environment``, whose ``calculate`` tool works on the problem of its rollout) are the examples of the built-in
``arithmetic-tool-rl`` / ``-sft`` tasks (docs/rlvr.md "Tool calling").
"""

from __future__ import annotations

import ast
import logging
import operator
from typing import Any

from posttrain.errors import UserError

logger = logging.getLogger("posttrain")

# ChatML with Qwen's tool-call format. Turns are not separated by a newline, so that a rollout (prompt, completion up
# to <|im_end|>, tool-result turn, next assistant header) is token for token what this template renders; the tools'
# names are listed in a short system turn (a tiny model has no room for JSON schemas).
CHATML_TOOL_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nTools: {% for tool in tools %}"
    "{{ tool.function.name if tool.function is defined else tool.name }}{% if not loop.last %}, {% endif %}"
    "{% endfor %}<|im_end|>{% endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}<|im_start|>assistant\n{% generation %}"
    "{{ message.content or '' }}"
    "{%- for call in message.tool_calls or [] %}"
    "{%- set f = call.function if call.function is defined else call %}"
    '<tool_call>\n{"name": "{{ f.name }}", "arguments": {{ f.arguments | tojson }}}\n</tool_call>'
    "{%- endfor %}<|im_end|>{% endgeneration %}"
    "{%- elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}\n"
    "</tool_response><|im_end|>"
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>{% endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def render_tool_chat(messages: list[dict], tools: list | None = None, add_generation_prompt: bool = False) -> str:
    """Render ``messages`` with :data:`CHATML_TOOL_TEMPLATE` as text (the SFT traces of the ``arithmetic-tool-sft``
    task are rendered this way, so they match what a GRPO run with tools renders)."""
    from transformers.utils import get_json_schema
    from transformers.utils.chat_template_utils import render_jinja_template

    schemas = [get_json_schema(t) if callable(t) else t for t in tools or []] or None
    rendered, _ = render_jinja_template(conversations=[messages], tools=schemas, chat_template=CHATML_TOOL_TEMPLATE,
                                        add_generation_prompt=add_generation_prompt)
    return rendered[0]


def prepare_tool_tokenizer(tokenizer, model=None, key: str = "method.tools") -> Any:
    """Make ``tokenizer`` able to render and parse tool calls for TRL's tool loop, or stop with one error line.

    * a tokenizer with a response template or schema, or whose chat template renders tool calls in a format TRL
      can parse: left as it is (TRL sets the parser itself);
    * a ChatML tokenizer whose template cannot render tool calls: :data:`CHATML_TOOL_TEMPLATE` and TRL's Qwen
      parser are installed (logged), and ``<|im_end|>`` is added to the model's generation stop tokens;
    * anything else: :class:`UserError` naming ``key``.
    """
    import copy

    from trl.chat_template_utils import add_response_schema, qwen3_template, supports_tool_calling

    if getattr(tokenizer, "response_template", None) is not None or getattr(tokenizer, "response_schema", None):
        return tokenizer
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    if template and supports_tool_calling(tokenizer):
        try:
            add_response_schema(copy.copy(tokenizer))  # does TRL know how to parse this template's tool calls?
        except ValueError:
            raise UserError(
                f"{key}: the tokenizer's chat template renders tool calls, but TRL has no parser for its format; set "
                "tokenizer.response_template (transformers response parsing) on the model's tokenizer"
            ) from None
        return tokenizer
    if template and "<|im_start|>" in template and "<|im_end|>" in tokenizer.get_vocab():
        tokenizer.chat_template = CHATML_TOOL_TEMPLATE
        tokenizer.response_template = qwen3_template
        if model is not None:
            _stop_at(model, tokenizer.convert_tokens_to_ids("<|im_end|>"))
        logger.info("tools: the tokenizer's ChatML template has no tool-call format; using posttrain's ChatML tool "
                    "template (Qwen's <tool_call> JSON format, docs/rlvr.md 'Tool calling')")
        return tokenizer
    raise UserError(
        f"{key}: the model's tokenizer has no chat template that renders and parses tool calls (TRL knows Qwen2.5/3, "
        "Llama 3.1/3.2, GLM-4-MoE, GPT-OSS, ...; posttrain adds one for ChatML templates); set "
        "tokenizer.response_template on a model whose template renders tool calls"
    )


def _stop_at(model, token_id: int) -> None:
    config = model.generation_config
    eos = config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if token_id not in eos:
        config.eos_token_id = [*eos, token_id]


# ----------------------------------------------------------------------------------------------------------------
# the example tool

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}


def _evaluate(node: ast.AST) -> float:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return _BINARY[type(node.op)](_evaluate(node.left), _evaluate(node.right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    raise ValueError("only numbers, + - * / and parentheses are allowed")


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression.

    Args:
        expression: Numbers with + - * / and parentheses, e.g. "437+285".
    """
    text = str(expression).strip().rstrip("=").strip()
    if len(text) > 100:
        raise ValueError("expression too long")
    value = _evaluate(ast.parse(text, mode="eval"))
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


class ArithmeticEnv:
    """A TRL environment for ``builtin:arithmetic-tool-rl`` (``method.environment: posttrain.rl.tools:ArithmeticEnv``).

    TRL makes one instance per rollout and calls :meth:`reset` with the dataset row; the public method
    :meth:`calculate` is the tool the model may call. It evaluates the rollout's problem (the last user message, e.g.
    ``43+20=``) with :func:`calculator`, so the call takes no argument: a tiny model only has to learn to call it and
    copy the result, not to copy the operands into JSON.
    """

    def reset(self, prompt: Any = None, **row: Any) -> None:
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": str(prompt or "")}]
        self.problem = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")
        self.calls = 0

    def calculate(self) -> str:
        """Compute the result of the current arithmetic problem."""
        self.calls += 1
        return calculator(self.problem)
