"""The preference family's training config (``training:`` of a preference recipe): TRL's ``DPOConfig`` and the
log-prob engine's two keys (docs/logprob_engine.md)."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import DPOConfig

from posttrain.registry import LogprobHead, logprob_head_field


@dataclass
class PreferenceConfig(DPOConfig):
    """``DPOConfig`` plus ``logprob_head`` and ``share_prompts``."""

    logprob_head: LogprobHead = logprob_head_field()
    share_prompts: bool = field(
        default=True,
        metadata={"help": "Compute each pair's prompt once for chosen and rejected (policy and reference), under a "
                          "block attention mask; false: every row runs whole (same losses)."})
