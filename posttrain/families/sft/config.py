"""The SFT family's training config (``training:`` of an SFT-family recipe): TRL's ``SFTConfig`` and the log-prob
engine's head (docs/logprob_engine.md)."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import SFTConfig

from posttrain.registry import LogprobHead


@dataclass
class SFTFamilyConfig(SFTConfig):
    """``SFTConfig`` plus ``logprob_head``."""

    logprob_head: LogprobHead = field(
        default="auto",
        metadata={"help": "The LM head that turns completion rows into log-probs: auto (chunked on CPU, TRL's fused "
                          "Triton kernel on CUDA), chunked, fused or liger (CUDA, pip install liger-kernel)."})
