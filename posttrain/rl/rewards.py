"""Verifiable answer checking shared by evaluation and RL rewards."""

from __future__ import annotations

import re

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def extract_answer(completion: str) -> str:
    """The answer part of a completion: inside ``<answer>...</answer>`` if present, else the first line, stripped."""
    match = _ANSWER_TAG.search(completion)
    text = match.group(1) if match else completion
    return text.strip().split("\n", 1)[0].strip()


def answers_match(completion: str, answer: str) -> bool:
    """Exact match of the extracted answer against the reference answer (whitespace-insensitive)."""
    return extract_answer(completion).replace(" ", "") == str(answer).strip().replace(" ", "")
