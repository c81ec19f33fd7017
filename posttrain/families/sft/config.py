"""The SFT family's training config (``training:`` of an SFT-family recipe): TRL's ``SFTConfig`` and the log-prob
engine's head (docs/logprob_engine.md)."""

from __future__ import annotations

from dataclasses import dataclass

from trl import SFTConfig

from posttrain.registry import LogprobHead, logprob_head_field


@dataclass
class SFTFamilyConfig(SFTConfig):
    """``SFTConfig`` plus ``logprob_head``."""

    logprob_head: LogprobHead = logprob_head_field()
