"""Verifiable rewards for RLVR and the answer checking shared with evaluation.

Every reward function has TRL's reward-function signature
``fn(prompts, completions, completion_ids=None, **columns) -> list[float | None]`` (one value per completion; ``None``
means "not applicable" and becomes NaN), so built-in and user rewards plug into ``trl.GRPOTrainer`` unchanged.

**Only the model's final answer is scored.** Every built-in reward and the evaluators (``posttrain eval``,
``data.test``) read a completion through :func:`extract_final_answer` (docs/rlvr.md "Which answer is scored"):

1. the model's final text: the completion itself, or for a conversational completion (a list of messages, e.g. a
   tool-calling rollout) the content of the last ``assistant`` message (tool results never count);
2. in it, the content of the last ``\boxed{...}``; else of the last ``<answer>...</answer>`` tag; else of the last
   inline math span (``$...$``, ``\(...\)``, ``\[...\]``), taking the part after its last ``=``; else the last number
   of the text, searched only after the text's last ``=`` when there is one;
3. a number that is an operand of an arithmetic expression (the ``20`` of ``43+20``) is not an answer, and
   ``math_verify`` refuses an extracted answer that is itself an expression over numbers (``43+20``), so an echo of
   the question scores 0 instead of being evaluated to the answer.

Built-ins (``method.rewards: [{name: ...}]``):

* ``exact_match``: 1.0 if the final answer equals the ``answer`` column (numbers compared as numbers, thousands
  separators and whitespace ignored), else 0.0; ``options: {strict: true}``: the whole final text, stripped, must
  equal the answer.
* ``math_verify``: 1.0 if HF ``math-verify`` finds the final answer equivalent to ``answer``, else 0.0.
* ``format``: 1.0 if the final text holds a non-empty ``<answer>...</answer>`` tag (option ``tag``), else 0.0.

:func:`load_reward_functions` turns the recipe's reward specs (built-in ``name``, ``function``: ``module:function`` or
``path/to/file.py:function``, or a sequence-classification reward ``model``) into what ``GRPOTrainer`` takes; a
function is wrapped by :class:`CheckedReward`, which turns a reward that raises, or returns the wrong number of values
or a non-number, into a one-line :class:`~posttrain.errors.UserError` naming the recipe key and the function.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
import logging
import math
import re
import sys
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any, NamedTuple

from posttrain.errors import UserError, did_you_mean

logger = logging.getLogger("posttrain")

# ----------------------------------------------------------------------------------------------------------------
# the final answer of a completion

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_MATH_SPAN = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.DOTALL)
# a number: optional sign, digits (thousands groups allowed), optional decimals, optional /denominator
_NUMBER = re.compile(r"[-+\u2212]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?")
_OPERATORS = "+-*/×÷^\u2212"


def final_text(completion: Any) -> str:
    """The model's final text: a string as is; a message: its content; a list of messages (conversational or
    tool-calling rollout): the content of the last ``assistant`` message ("" if there is none)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return _content(completion)
    if isinstance(completion, Sequence):
        for message in reversed(completion):
            if isinstance(message, dict) and message.get("role", "assistant") == "assistant":
                return _content(message)
            if isinstance(message, str):
                return message
        return ""
    return str(completion)


def _content(message: dict) -> str:
    content = message.get("content", "")
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content or "")


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (balanced braces), or None."""
    start = text.rfind("\\boxed")
    while start != -1:
        i = text.find("{", start)
        if i != -1 and text[start + len("\\boxed"): i].strip() == "":
            depth = 0
            for j in range(i, len(text)):
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                if depth == 0:
                    return text[i + 1: j]
        start = text.rfind("\\boxed", 0, start)
    return None


def _last_number(text: str) -> str | None:
    """The last number of ``text`` (after its last ``=`` when there is one), unless it is an operand of an
    arithmetic expression (``43+20``: the ``20`` is not an answer)."""
    if "=" in text:
        text = text.rsplit("=", 1)[1]
    matches = list(_NUMBER.finditer(text))
    if not matches:
        return None
    m = matches[-1]
    number, before, after = m.group(), text[: m.start()].rstrip(), text[m.end():].lstrip()
    if number[0] in "-+\u2212":  # a sign right after an operand is a binary operator: 43-20
        if before[-1:].isdigit() or before.endswith(")"):
            return None
    elif before[-1:] and before[-1] in _OPERATORS:
        rest = before[:-1].rstrip()
        if rest[-1:].isdigit() or rest.endswith(")"):
            return None
    if after[:1] and after[0] in _OPERATORS and after[1:].lstrip()[:1].isdigit():
        return None
    return number


def extract_final_answer(completion: Any) -> str | None:
    """The final answer of a completion, or None when it gives none (module docstring, docs/rlvr.md):
    last ``\\boxed{}`` > last ``<answer>`` tag > last inline math span (after its last ``=``) > last number (after the
    last ``=``), never an operand of an expression."""
    text = final_text(completion)
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    tags = _ANSWER_TAG.findall(text)
    if tags:
        return tags[-1].strip()
    spans = [next(g for g in m.groups() if g is not None) for m in _MATH_SPAN.finditer(text)]
    if spans:
        return spans[-1].rsplit("=", 1)[-1].strip()
    return _last_number(text)


def _as_number(text: str) -> Fraction | None:
    t = text.replace("\u2212", "-")
    if not re.fullmatch(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?", t):
        return None
    try:
        return Fraction(t.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def _normalize(text: str) -> str:
    t = "".join(str(text).split())
    t = t.strip("$")
    return t[:-1] if t.endswith(".") else t


def answers_equal(predicted: str | None, answer: Any) -> bool:
    """Whether an extracted answer equals a reference answer: as numbers when both are numbers (``1,234`` ==
    ``1234``, ``63.0`` == ``63``, ``1/2`` == ``0.5``), else as strings with whitespace removed."""
    if predicted is None:
        return False
    p, a = _normalize(predicted), _normalize(str(answer))
    if not p:
        return False
    pn, an = _as_number(p), _as_number(a)
    if pn is not None and an is not None:
        return pn == an
    return p == a


def answers_match(completion: Any, answer: Any, strict: bool = False) -> bool:
    """Whether a completion's final answer (:func:`extract_final_answer`) equals ``answer``; ``strict``: the whole
    final text, stripped, must equal the answer, stripped. Used by ``exact_match``, greedy accuracy and pass@k."""
    if strict:
        return final_text(completion).strip() == str(answer).strip()
    return answers_equal(extract_final_answer(completion), answer)


def completion_text(completion: Any) -> str:
    """All text of a completion: a string as is; a conversational completion (list of messages): the contents
    joined (tool results included; rewards use :func:`final_text` instead)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return _content(completion)
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


def make_exact_match(strict: bool = False) -> Callable[..., list[float]]:
    """``exact_match``: 1.0 where the final answer equals the ``answer`` column (:func:`answers_match`), else 0.0.
    ``strict``: the whole final text must equal the answer (no extraction)."""

    def exact_match(prompts, completions, completion_ids=None, **kwargs) -> list[float]:
        answers = _answers(kwargs, len(completions), "exact_match")
        return [float(answers_match(c, a, strict=strict)) for c, a in zip(completions, answers, strict=True)]

    return exact_match


exact_match = make_exact_match()


def question_numbers(prompt: Any) -> set[Fraction] | None:
    """The absolute values of the numbers a prompt holds (text, or the contents of a conversational prompt); None
    when there is no prompt."""
    if prompt is None:
        return None
    out = set()
    for m in _NUMBER.finditer(completion_text(prompt)):
        value = _as_number(m.group().lstrip("+-\u2212"))
        if value is not None:
            out.add(value)
    return out


def parse_final_answer(predicted: str | None):
    """math-verify's canonical parse of an extracted final answer, read as math (LaTeX normalised: ``\\left``,
    ``\\,``, ``\\!``, braces, ``\\times``, ``\\cdot``, ...): a list ``[sympy expression, text]``, or ``[]``."""
    if not predicted:
        return []
    from math_verify import parse

    return parse(f"${predicted}$")


def is_unevaluated_expression(parsed, question: set[Fraction] | None) -> bool:
    """Whether a parsed final answer is arithmetic left for the verifier to do: a compound expression of numbers
    only whose value is rational (``19 - (2)``, ``19 + (-2)``, ``5\\times{3}``, ``(4)+(10)``), not a single number
    (``-3``, ``\\frac{1}{2}``, ``0.5``) nor an irrational closed form (``2\\sqrt{2}``, ``\\frac{\\pi}{2}``). With the
    question's numbers (:func:`question_numbers`), only such an expression that uses one of them (an echo of the
    question) counts; without them, every one does."""
    import sympy

    expr = parsed[0] if parsed else None
    if not isinstance(expr, sympy.Basic) or isinstance(expr, sympy.Number) or expr.free_symbols:
        return False
    if not (expr.is_number and expr.is_rational):
        return False
    if question is None:
        return True
    used = {Fraction(str(abs(n))) for n in expr.atoms(sympy.Rational)}
    return bool(used & question)


def math_verify(prompts, completions, completion_ids=None, **kwargs) -> list[float | None]:
    """1.0 where HF Math-Verify (https://github.com/huggingface/Math-Verify) finds the completion's final answer
    (:func:`extract_final_answer`, parsed by :func:`parse_final_answer`) equivalent to ``answer``, else 0.0.

    Only the extracted final answer is parsed, never the whole completion (math-verify alone would find and evaluate
    an expression copied from the question: ``43+20`` scored 1.0 against ``63``), and an answer that is an
    unevaluated expression using the question's numbers (:func:`is_unevaluated_expression`: ``\\boxed{19 - (2)}``)
    scores 0. A gold answer math-verify cannot parse scores ``None`` (not applicable).
    """
    from math_verify import parse, verify

    answers = _answers(kwargs, len(completions), "math_verify")
    questions = list(prompts) if prompts is not None else [None] * len(completions)
    out: list[float | None] = []
    for c, a, q in zip(completions, answers, questions, strict=True):
        gold = parse_final_answer(str(a)) or parse(str(a))  # read as math first: 2\sqrt{2} is not 2
        if not gold:
            out.append(None)
            continue
        pred = parse_final_answer(extract_final_answer(c))
        if not pred or is_unevaluated_expression(pred, question_numbers(q)):
            out.append(0.0)
            continue
        out.append(float(verify(gold, pred)))
    return out


def make_format_reward(tag: str = "answer") -> Callable[..., list[float]]:
    """A reward of 1.0 when the model's final text (:func:`final_text`) contains ``<tag>...</tag>`` (non-empty),
    else 0.0."""
    pattern = re.compile(rf"<{re.escape(tag)}>\s*\S.*?</{re.escape(tag)}>", re.DOTALL)

    def format_reward(prompts, completions, completion_ids=None, **kwargs) -> list[float]:
        return [1.0 if pattern.search(final_text(c)) else 0.0 for c in completions]

    return format_reward


BUILTIN_REWARDS: dict[str, tuple[Callable[..., Callable], str]] = {
    "exact_match": (make_exact_match, "final answer == the `answer` column (option: strict)"),
    "math_verify": (lambda: math_verify, "math-verify equivalence of the final answer with the `answer` column"),
    "format": (make_format_reward, "final text holds an <answer>...</answer> tag (option: tag)"),
}
NEEDS_ANSWER = {"exact_match", "math_verify"}


# ----------------------------------------------------------------------------------------------------------------
# wiring


def split_function_path(path: str) -> tuple[str, str]:
    """``module:function`` or ``path/to/file.py:function`` -> (module or file, attribute); ValueError otherwise."""
    target, sep, attr = str(path).rpartition(":")
    if not sep or not target or not attr or (":" in target and not target.endswith(".py")):
        raise ValueError(f"expected 'module:function' or 'path/to/file.py:function', got '{path}'")
    return target, attr


def _load_file_module(target: str, key: str, base_dirs: Sequence[str | Path]):
    """Import a ``.py`` file by path: an absolute path as is; a relative one from the first of ``base_dirs`` (the
    recipe's directory) that holds it, else from the working directory (the path it runs from is logged, once per
    process). This runs the file's code."""
    from posttrain.paths import expand_home

    candidate = expand_home(target, key)
    tried = [candidate] if candidate.is_absolute() else [Path(d) / candidate for d in base_dirs] + [Path.cwd() / candidate]
    found = next((c for c in tried if c.is_file()), None)
    if found is None:
        where = ", ".join(dict.fromkeys(str(c.parent.resolve()) for c in tried))
        raise UserError(f"{key}: file '{target}' not found (looked in {where})")
    beside = not candidate.is_absolute() and found in tried[:-1]
    found = found.resolve()
    import hashlib

    name = f"posttrain_user_{found.stem}_{hashlib.sha1(str(found).encode()).hexdigest()[:10]}"
    if name in sys.modules:  # loaded once per process (the checks before loading the model, then the trainer)
        return sys.modules[name]
    origin = ("" if candidate.is_absolute() else " (next to the recipe)" if beside
              else " (from the working directory: not next to the recipe)")
    logger.info("%s: running code from %s%s", key, found, origin)
    spec = importlib.util.spec_from_file_location(name, found)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    sys.path.insert(0, str(found.parent))  # the file may import its neighbours
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise UserError(f"{key}: cannot load '{found}' ({type(exc).__name__}: {exc})") from None
    finally:
        sys.path.remove(str(found.parent))
    return module


def import_function(path: str, key: str, base_dirs: Sequence[str | Path] = ()) -> Callable:
    """Import ``module:function`` (``module.sub:obj.attr`` allowed) or ``path/to/file.py:function`` (relative paths
    are looked up in ``base_dirs``, then the working directory); errors name ``key``."""
    try:
        target, attr = split_function_path(path)
    except ValueError as exc:
        raise UserError(f"{key}: {exc}") from None
    if target.endswith(".py"):
        module = _load_file_module(target, key, base_dirs)
        where = f"file '{target}'"
    else:
        first = target not in sys.modules
        try:
            module = importlib.import_module(target)
        except Exception as exc:  # ImportError, or the module itself failing
            raise UserError(f"{key}: cannot import module '{target}' ({type(exc).__name__}: {exc})") from None
        if first and not target.startswith("posttrain."):
            logger.info("%s: running code from module %s (%s)", key, target, getattr(module, "__file__", "?"))
        where = f"module '{target}'"
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(module) if not n.startswith("_")]
            raise UserError(f"{key}: {where} has no attribute '{attr}'{did_you_mean(part, names)}")
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


def check_reward_model(path: str, key: str) -> str:
    """Resolve a reward model path and check, from its config only, that it is a sequence-classification model
    (an ``...ForSequenceClassification`` architecture); a causal LM would get a random score head. A LoRA run of
    ``method.name: reward`` (an adapter folder) is accepted when its adapter's task is ``SEQ_CLS``."""
    import json

    from transformers import AutoConfig

    from posttrain.models import resolve_model_path

    resolved = resolve_model_path(path, key)
    adapter = Path(resolved, "adapter_config.json")
    if adapter.is_file() and not Path(resolved, "config.json").exists():
        task = json.loads(adapter.read_text()).get("task_type")
        if task != "SEQ_CLS":
            raise UserError(f"{key}: '{path}' is an adapter for task {task}, not a sequence-classification reward "
                            "model (a `method.name: reward` LoRA run has task SEQ_CLS)")
        return resolved
    try:
        config = AutoConfig.from_pretrained(resolved)
    except (OSError, ValueError) as exc:
        text = " ".join(str(exc).split())[:200]
        raise UserError(f"{key}: cannot load the config of reward model '{path}' ({text})") from None
    architectures = list(getattr(config, "architectures", None) or [])
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise UserError(
            f"{key}: '{path}' is not a sequence-classification reward model (architectures: {architectures}); "
            "its score head would be random"
        )
    return resolved


class RewardSet(NamedTuple):
    """What ``GRPOTrainer`` takes: ``reward_funcs`` (callables and reward models), ``reward_weights`` and
    ``reward_processing_classes`` (a tokenizer for each reward model, None for functions)."""

    funcs: list[Any]
    weights: list[float]
    processing_classes: list[Any]


def load_rewards(specs: Sequence[Any], key: str = "method.rewards", base_dirs: Sequence[str | Path] = (),
                 load_models: bool = True, dtype: str = "auto") -> RewardSet:
    """Rewards from recipe reward specs (``name`` built-in, ``function`` path or ``model``; ``weight``; ``options``).

    Functions are wrapped in :class:`CheckedReward`; duplicate display names get a ``_<i>`` suffix so their metrics
    stay apart. Reward models are loaded with ``AutoModelForSequenceClassification`` (``num_labels=1``) and their own
    tokenizer; with ``load_models=False`` they are only checked (:func:`check_reward_model`) and left as paths.
    """
    funcs: list[Any] = []
    weights: list[float] = []
    processing: list[Any] = []
    seen: set[str] = set()
    for i, spec in enumerate(specs):
        k = f"{key}[{i}]"
        weights.append(float(spec.weight))
        if getattr(spec, "model", None) is not None:
            resolved = check_reward_model(spec.model, f"{k}.model")
            if not load_models:
                funcs.append(resolved)
                processing.append(None)
                continue
            model, tokenizer = _load_reward_model(resolved, spec.model, f"{k}.model", dtype)
            funcs.append(model)
            processing.append(tokenizer)
            continue
        if spec.name is not None:
            factory, _ = BUILTIN_REWARDS[spec.name]
            try:
                fn = factory(**spec.options)
            except TypeError as exc:
                raise UserError(f"{k}.options: {exc}") from None
            name = spec.name
        else:
            fn = import_function(spec.function, f"{k}.function", base_dirs)
            if spec.options:
                fn = _bind_options(fn, spec.options)
            name = spec.function.rpartition(":")[2].split(".")[-1]
        if name in seen:
            name = f"{name}_{i}"
        seen.add(name)
        funcs.append(CheckedReward(fn, name, k))
        processing.append(None)
    return RewardSet(funcs, weights, processing)


def load_reward_functions(specs: Sequence[Any], key: str = "method.rewards",
                          base_dirs: Sequence[str | Path] = ()) -> tuple[list[Any], list[float]]:
    """Reward callables (and loaded reward models) and weights from recipe reward specs (:func:`load_rewards`)."""
    rewards = load_rewards(specs, key, base_dirs)
    return rewards.funcs, rewards.weights


def _load_reward_model(resolved: str, path: str, key: str, dtype: str):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from posttrain.models import torch_dtype

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved)
        if Path(resolved, "adapter_config.json").is_file() and not Path(resolved, "config.json").exists():
            from peft import AutoPeftModelForSequenceClassification  # a LoRA reward run: merged on load

            model = AutoPeftModelForSequenceClassification.from_pretrained(
                resolved, num_labels=1, dtype=torch_dtype(dtype)).merge_and_unload()
        else:
            model = AutoModelForSequenceClassification.from_pretrained(resolved, num_labels=1,
                                                                       dtype=torch_dtype(dtype))
    except (OSError, ValueError) as exc:
        text = " ".join(str(exc).split())[:200]
        raise UserError(f"{key}: cannot load reward model '{path}' ({text})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval().requires_grad_(False)
    return model, tokenizer


def _bind_options(fn: Callable, options: dict[str, Any]) -> Callable:
    def bound(prompts, completions, completion_ids=None, **kwargs):
        return fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs, **options)

    return bound
