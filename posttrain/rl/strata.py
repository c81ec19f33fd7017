"""Stratum-key functions for stratified advantages (``method.stratum_key: module:function``).

A key function is called once per rollout as ``fn(prompt=..., completion=..., **row)`` (``row``: the dataset
columns of the example) and returns a hashable key; rollouts of one prompt with equal keys form a stratum
(Stratified GRPO, arXiv 2510.06214; docs/methods/grpo_advantages.md#stratum-keys). The default key, the number of tool calls,
is :func:`count_tool_calls`: 0 for free text, so one stratum per group (GRPO exactly).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from posttrain.rl.rewards import completion_text

__all__ = ["completion_length", "count_tool_calls", "tool_calls"]


def count_tool_calls(completion: Any, marker: str = "<tool_call>") -> int:
    """Default stratum key: number of tool calls in a completion (docs/methods/grpo_advantages.md#stratum-keys).

    The paper (arXiv 2510.06214) stratifies search agents by the number of search calls. Accepts a completion string
    (counts occurrences of ``marker``) or a conversational completion (list of message dicts, TRL's format): counts
    the entries of each message's ``tool_calls`` plus ``marker`` occurrences in string contents.
    """
    if completion is None:
        return 0
    if isinstance(completion, str):
        return completion.count(marker)
    if isinstance(completion, dict):
        n = len(completion.get("tool_calls") or [])
        content = completion.get("content")
        if isinstance(content, str):
            n += content.count(marker)
        elif isinstance(content, list):  # multimodal content parts
            n += sum(p.get("text", "").count(marker) for p in content if isinstance(p, dict))
        return n
    if isinstance(completion, Iterable):
        return sum(count_tool_calls(m, marker) for m in completion)
    raise TypeError(f"cannot count tool calls in {type(completion).__name__}")


def tool_calls(prompt: Any = None, completion: Any = None, **row: Any) -> int:
    """Number of tool calls in the completion (the paper's key for search agents)."""
    return count_tool_calls(completion)


def completion_length(prompt: Any = None, completion: Any = None, **row: Any) -> int:
    """Length of the completion text in characters, stripped. Only for very short answers (the arithmetic task: how
    many digits were emitted): on free text nearly every rollout gets its own stratum, whose SAN advantage is 0, so the
    advantage shrinks to (1 - san_alpha) * A_GRPO (the trainer warns; docs/rlvr.md "Stratum keys")."""
    return len(completion_text(completion).strip())
