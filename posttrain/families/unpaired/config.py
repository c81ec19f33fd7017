"""The unpaired family's training config (``training:`` of a ``kto`` recipe): TRL's ``KTOConfig`` and the log-prob
engine's head (docs/logprob_engine.md)."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import KTOConfig

from posttrain.registry import LogprobHead


@dataclass
class UnpairedConfig(KTOConfig):
    """``KTOConfig`` plus ``logprob_head``."""

    logprob_head: LogprobHead = field(
        default="auto",
        metadata={"help": "The LM head that turns completion rows into log-probs: auto (chunked on CPU, TRL's fused "
                          "Triton kernel on CUDA), chunked, fused or liger (CUDA, pip install liger-kernel)."})
