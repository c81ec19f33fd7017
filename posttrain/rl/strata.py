"""Stratum-key functions for stratified advantages (``method.stratum_key: module:function``).

A key function is called once per rollout as ``fn(prompt=..., completion=..., **row)`` (``row``: the dataset
columns of the example) and returns a hashable key; rollouts of one prompt with equal keys form a stratum
(Stratified GRPO, arXiv 2510.06214; docs/methods/grpo_advantages.md#stratum-keys). The default key, the number of tool calls,
is :func:`posttrain.rl.advantages.count_tool_calls`: 0 for free text, so one stratum per group (GRPO exactly).
"""

from __future__ import annotations

from typing import Any

from posttrain.rl.advantages import count_tool_calls
from posttrain.rl.rewards import completion_text

__all__ = ["completion_length", "tool_calls"]


def tool_calls(prompt: Any = None, completion: Any = None, **row: Any) -> int:
    """Number of tool calls in the completion (the paper's key for search agents)."""
    return count_tool_calls(completion)


def completion_length(prompt: Any = None, completion: Any = None, **row: Any) -> int:
    """Length of the completion text in characters, stripped. Only for very short answers (the arithmetic task: how
    many digits were emitted): on free text nearly every rollout gets its own stratum, whose SAN advantage is 0, so the
    advantage shrinks to (1 - san_alpha) * A_GRPO (the trainer warns; docs/rlvr.md "Stratum keys")."""
    return len(completion_text(completion).strip())
