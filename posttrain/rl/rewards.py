"""Verifiable rewards for RLVR and the answer checking shared with evaluation.

Every reward function has TRL's reward-function signature
``fn(prompts, completions, completion_ids=None, **columns) -> list[float | None]`` (one value per completion; ``None``
means "not applicable" and becomes NaN), so built-in and user rewards (``module:function``) plug into
``trl.GRPOTrainer`` unchanged. Built-ins (``method.rewards: [{name: ...}]``):

* ``exact_match``: 1.0 if the extracted answer equals the ``answer`` column (the built-in arithmetic task), else 0.0.
* ``math_verify``: 1.0 if HF ``math-verify`` finds the completion's final answer equivalent to ``answer``, else 0.0.
* ``format``: 1.0 if the completion holds an ``<answer>...</answer>`` tag (option ``tag``), else 0.0.

:func:`load_reward_functions` turns the recipe's reward specs into callables wrapped by :class:`CheckedReward`, which
turns a reward that raises, or returns the wrong number of values or a non-number, into a one-line
:class:`~posttrain.errors.UserError` naming the recipe key and the function.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

from posttrain.errors import UserError, did_you_mean

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def extract_answer(completion: str) -> str:
    """The answer part of a completion: inside ``<answer>...</answer>`` if present, else the first line, stripped."""
    match = _ANSWER_TAG.search(completion)
    text = match.group(1) if match else completion
    return text.strip().split("\n", 1)[0].strip()


def answers_match(completion: str, answer: str) -> bool:
    """Exact match of the extracted answer against the reference answer (whitespace-insensitive)."""
    return extract_answer(completion).replace(" ", "") == str(answer).strip().replace(" ", "")


def completion_text(completion: Any) -> str:
    """Text of a completion: a string as is; a conversational completion (list of messages): the contents joined."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        content = completion.get("content", "")
        if isinstance(content, list):
            return "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return str(content or "")
    if isinstance(completion, Sequence):
        return "\n".join(completion_text(m) for m in completion)
    return str(completion)


# ----------------------------------------------------------------------------------------------------------------
# built-in rewards


def _answers(kwargs: dict[str, Any], n: int, reward: str) -> list[Any]:
    if "answer" not in kwargs:
        raise KeyError(f"reward '{reward}' needs an 'answer' column in the training data")
    answers = kwargs["answer"]
    if len(answers) != n:
        raise ValueError(f"got {len(answers)} answers for {n} completions")
    return answers


def exact_match(prompts, completions, completion_ids=None, **kwargs) -> list[float]:
    """1.0 where :func:`answers_match` (extracted answer == ``answer``, whitespace-insensitive), else 0.0."""
    answers = _answers(kwargs, len(completions), "exact_match")
    return [float(answers_match(completion_text(c), a)) for c, a in zip(completions, answers, strict=True)]


def math_verify(prompts, completions, completion_ids=None, **kwargs) -> list[float]:
    """1.0 where ``math_verify.verify(parse(answer), parse(completion))`` holds, else 0.0.

    HF Math-Verify (https://github.com/huggingface/Math-Verify) extracts the final answer (LaTeX, boxed or plain
    expressions) and compares it symbolically. A gold answer it cannot parse scores ``None`` (not applicable).
    """
    from math_verify import parse, verify

    answers = _answers(kwargs, len(completions), "math_verify")
    out: list[float | None] = []
    for c, a in zip(completions, answers, strict=True):
        gold = parse(str(a))
        if not gold:
            gold = parse(f"${a}$")
        if not gold:
            out.append(None)
            continue
        pred = parse(completion_text(c))
        out.append(float(bool(pred) and verify(gold, pred)))
    return out


def make_format_reward(tag: str = "answer") -> Callable[..., list[float]]:
    """A reward of 1.0 when the completion contains ``<tag>...</tag>`` (non-empty), else 0.0."""
    pattern = re.compile(rf"<{re.escape(tag)}>\s*\S.*?</{re.escape(tag)}>", re.DOTALL)

    def format_reward(prompts, completions, completion_ids=None, **kwargs) -> list[float]:
        return [1.0 if pattern.search(completion_text(c)) else 0.0 for c in completions]

    return format_reward


BUILTIN_REWARDS: dict[str, tuple[Callable[..., Callable], str]] = {
    "exact_match": (lambda: exact_match, "extracted answer == the `answer` column (built-in arithmetic task)"),
    "math_verify": (lambda: math_verify, "math-verify equivalence of the final answer with the `answer` column"),
    "format": (make_format_reward, "completion holds an <answer>...</answer> tag (option: tag)"),
}
NEEDS_ANSWER = {"exact_match", "math_verify"}


# ----------------------------------------------------------------------------------------------------------------
# wiring


def import_function(path: str, key: str) -> Callable:
    """Import ``module:function`` (``module.sub:obj.attr`` allowed); errors name ``key``."""
    if path.count(":") != 1 or not all(path.split(":")):
        raise UserError(f"{key}: expected 'module:function', got '{path}'")
    module_name, attr = path.split(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or the module itself failing
        raise UserError(f"{key}: cannot import module '{module_name}' ({type(exc).__name__}: {exc})") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(module) if not n.startswith("_")]
            raise UserError(f"{key}: module '{module_name}' has no attribute '{attr}'{did_you_mean(part, names)}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserError(f"{key}: '{path}' is not callable")
    return obj


class CheckedReward:
    """Wraps a reward function: a raised exception, a wrong-length result, a non-numeric or infinite value becomes a
    :class:`UserError` naming the recipe key (``method.rewards[i]``) and the function. ``__name__`` is the display
    name TRL uses in its metrics (``rewards/<name>/mean``)."""

    def __init__(self, fn: Callable, name: str, key: str):
        self.fn, self.__name__, self.key = fn, name, key

    def __call__(self, prompts, completions, completion_ids=None, **kwargs) -> list[float | None]:
        where = f"{self.key} ({self.__name__})"
        try:
            out = self.fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
            if inspect.isawaitable(out):
                out = asyncio.run(out)
        except UserError:
            raise
        except Exception as exc:
            raise UserError(f"{where}: reward function raised {type(exc).__name__}: {exc}") from exc
        try:
            values = list(out)
        except TypeError:
            raise UserError(f"{where}: reward function returned {type(out).__name__}, expected a list") from None
        if len(values) != len(completions):
            raise UserError(
                f"{where}: reward function returned {len(values)} values for {len(completions)} completions "
                "(expected one per completion)"
            )
        checked: list[float | None] = []
        for i, v in enumerate(values):
            if v is None:
                checked.append(None)
                continue
            try:
                f = float(v)
            except (TypeError, ValueError):
                raise UserError(f"{where}: value {i} is {v!r}, expected a number or None") from None
            if math.isinf(f):  # would make every advantage of its group NaN -> 0: nothing learned, silently
                raise UserError(f"{where}: value {i} is {f}; rewards must be finite (None or NaN: not applicable)")
            checked.append(None if math.isnan(f) else f)
        return checked


def load_reward_functions(specs: Sequence[Any], key: str = "method.rewards") -> tuple[list[CheckedReward], list[float]]:
    """Reward callables and weights from recipe reward specs (``name`` built-in or ``function`` path, ``weight``,
    ``options``). Duplicate display names get a ``_<i>`` suffix so their metrics stay apart."""
    funcs, weights, seen = [], [], set()
    for i, spec in enumerate(specs):
        k = f"{key}[{i}]"
        if spec.name is not None:
            factory, _ = BUILTIN_REWARDS[spec.name]
            try:
                fn = factory(**spec.options)
            except TypeError as exc:
                raise UserError(f"{k}.options: {exc}") from None
            name = spec.name
        else:
            if spec.options:
                fn0 = import_function(spec.function, f"{k}.function")
                fn = _bind_options(fn0, spec.options)
            else:
                fn = import_function(spec.function, f"{k}.function")
            name = spec.function.split(":")[1].split(".")[-1]
        if name in seen:
            name = f"{name}_{i}"
        seen.add(name)
        funcs.append(CheckedReward(fn, name, k))
        weights.append(float(spec.weight))
    return funcs, weights


def _bind_options(fn: Callable, options: dict[str, Any]) -> Callable:
    def bound(prompts, completions, completion_ids=None, **kwargs):
        return fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs, **options)

    return bound
