"""Built-in arithmetic task: procedurally generated, seeded, with verifiable answers.

A problem is ``"a+b="`` (or ``-``) with the integer answer as the completion. The full problem space for the given
operand range is shuffled once with ``seed``; a fixed slice is held out as the ``test`` split, so train and test never
share a problem. Three formats come from the same problems:

- ``sft``:        ``{"prompt": "12+7=", "completion": "19"}``
- ``rl``:         ``{"prompt": "12+7=", "answer": "19"}``
- ``preference``: ``{"prompt": "12+7=", "chosen": "19", "rejected": "18"}`` (a plausible wrong answer)

and :func:`arithmetic_chat_rows` strings them into multi-turn ``messages`` conversations for chat SFT.
"""

from __future__ import annotations

import random
from typing import Literal

Format = Literal["sft", "rl", "preference"]


def _problems(max_operand: int, ops: str, seed: int) -> list[tuple[int, str, int]]:
    problems = [(a, op, b) for op in ops for a in range(max_operand + 1) for b in range(max_operand + 1)]
    if "-" in ops:  # keep answers non-negative
        problems = [(a, op, b) for (a, op, b) in problems if op != "-" or a >= b]
    random.Random(seed).shuffle(problems)
    return problems


def _answer(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b


def _wrong_answer(correct: int, rng: random.Random) -> int:
    """A plausible wrong answer: off by a small amount or by ten, never negative, never the correct one."""
    while True:
        delta = rng.choice([-10, -2, -1, 1, 2, 10])
        wrong = correct + delta
        if wrong >= 0 and wrong != correct:
            return wrong


def arithmetic_rows(
    fmt: Format = "sft",
    split: str = "train",
    num_samples: int | None = None,
    max_operand: int = 30,
    ops: str = "+",
    test_size: int = 200,
    seed: int = 0,
) -> list[dict[str, str]]:
    """Rows of the arithmetic task.

    Args:
        fmt: ``sft``, ``rl`` or ``preference``.
        split: ``train`` or ``test`` (disjoint problems).
        num_samples: number of rows; train rows cycle over the train problems if more are asked than exist.
        max_operand: operands are drawn from ``0..max_operand``.
        ops: operators to use, a subset of ``"+-"``.
        test_size: problems held out for the ``test`` split.
        seed: shuffles the problem space and draws the wrong answers.
    """
    if split not in {"train", "test"}:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not ops or set(ops) - set("+-"):
        raise ValueError(f"ops must be a non-empty subset of '+-', got {ops!r}")
    problems = _problems(max_operand, ops, seed)
    if test_size >= len(problems):
        raise ValueError(f"test_size={test_size} leaves no training problems (only {len(problems)} exist)")
    pool = problems[:test_size] if split == "test" else problems[test_size:]
    if num_samples is None:
        num_samples = len(pool)
    rng = random.Random(seed + (1 if split == "test" else 2))
    rows = []
    for i in range(num_samples):
        a, op, b = pool[i % len(pool)]
        correct = _answer(a, op, b)
        prompt = f"{a}{op}{b}="
        if fmt == "sft":
            rows.append({"prompt": prompt, "completion": str(correct)})
        elif fmt == "rl":
            rows.append({"prompt": prompt, "answer": str(correct)})
        elif fmt == "preference":
            rows.append({"prompt": prompt, "chosen": str(correct), "rejected": str(_wrong_answer(correct, rng))})
        else:
            raise ValueError(f"unknown format {fmt!r}")
    return rows


def arithmetic_chat_rows(split: str = "train", num_samples: int | None = None, turns: int = 2, **options) -> list[dict]:
    """The problems as conversations for chat SFT: ``{"messages": [user "12+7=", assistant "19", user "3+4=",
    assistant "7", ...]}``, ``turns`` exchanges per row (consecutive problems of :func:`arithmetic_rows`, same
    ``split`` and options), ``num_samples`` rows."""
    count = None if num_samples is None else num_samples * turns
    rows = arithmetic_rows("rl", split=split, num_samples=count, **options)
    return [
        {"messages": [m for r in rows[i : i + turns] for m in ({"role": "user", "content": r["prompt"]},
                                                                {"role": "assistant", "content": r["answer"]})]}
        for i in range(0, len(rows) - turns + 1, turns)
    ]


def corpus(max_operand: int = 99) -> list[str]:
    """Texts the built-in tokenizer is trained on (every problem with its answer)."""
    return [f"{a}{op}{b}={_answer(a, op, b)}" for (a, op, b) in _problems(max_operand, "+-", 0)]


def arithmetic_tool_rows(
    fmt: Literal["sft", "rl"] = "rl",
    split: str = "train",
    num_samples: int | None = None,
    max_operand: int = 99,
    ops: str = "+",
    test_size: int = 200,
    tool_fraction: float = 0.5,
    tool: Literal["calculate", "calculator"] = "calculate",
    seed: int = 0,
) -> list[dict]:
    """The arithmetic problems as a tool-calling task.

    - ``rl``: ``{"prompt": [{"role": "user", "content": "43+20="}], "answer": "63"}``: conversational prompts, as
      TRL's tool loop needs; train with ``method.environment: posttrain.rl.tools:ArithmeticEnv`` (its ``calculate()``
      tool works on the rollout's problem) or ``method.tools: [posttrain.rl.tools:calculator]``.
    - ``sft``: ``{"prompt", "completion"}`` text rendered with posttrain's ChatML tool template
      (:data:`posttrain.rl.tools.CHATML_TOOL_TEMPLATE`, the format the GRPO run renders and parses): a fraction
      ``tool_fraction`` of the rows call ``tool`` (``calculate()``, or ``calculator(expression)``) and copy its
      result, the others answer directly, so that a model fine-tuned on them does both and its rollouts hold 0 or 1
      tool calls.
    """
    if not 0.0 <= tool_fraction <= 1.0:
        raise ValueError(f"tool_fraction must be in [0, 1], got {tool_fraction}")
    if tool not in ("calculate", "calculator"):
        raise ValueError(f"tool must be 'calculate' or 'calculator', got {tool!r}")
    rows = arithmetic_rows("rl", split=split, num_samples=num_samples, max_operand=max_operand, ops=ops,
                           test_size=test_size, seed=seed)
    if fmt == "rl":
        return [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]} for r in rows]
    if fmt != "sft":
        raise ValueError(f"unknown format {fmt!r}")
    from posttrain.rl.tools import ArithmeticEnv, calculator, render_tool_chat

    # the two shapes of trace, rendered once with placeholders (rendering every row costs ~10 ms)
    expr, result, answer = "@@EXPR@@", "@@RESULT@@", "@@ANSWER@@"
    user = {"role": "user", "content": f"{expr}="}
    fn = calculator if tool == "calculator" else ArithmeticEnv().calculate
    arguments = {"expression": expr} if tool == "calculator" else {}
    call = {"type": "function", "function": {"name": tool, "arguments": arguments}}
    with_tool = [{"role": "assistant", "content": "", "tool_calls": [call]},
                 {"role": "tool", "name": tool, "content": result},
                 {"role": "assistant", "content": answer}]
    prompt = render_tool_chat([user], tools=[fn], add_generation_prompt=True)
    shapes = [render_tool_chat([user, *turns], tools=[fn])[len(prompt):]
              for turns in (with_tool, [{"role": "assistant", "content": answer}])]

    def fill(text: str, r: dict) -> str:
        e = r["prompt"].rstrip("=")
        return text.replace(expr, e).replace(result, calculator(e)).replace(answer, r["answer"])

    rng = random.Random(seed + 3)
    return [{"prompt": fill(prompt, r), "completion": fill(shapes[0] if rng.random() < tool_fraction else shapes[1], r)}
            for r in rows]
