"""The unpaired family's training config (``training:`` of a ``kto`` recipe): TRL's ``KTOConfig`` and the log-prob
engine's head (docs/logprob_engine.md)."""

from __future__ import annotations

from dataclasses import dataclass

from trl import KTOConfig

from posttrain.registry import LogprobHead, logprob_head_field


@dataclass
class UnpairedConfig(KTOConfig):
    """``KTOConfig`` plus ``logprob_head``."""

    logprob_head: LogprobHead = logprob_head_field()
