"""The RL family's training config (``training:`` of a GRPO recipe): TRL's ``GRPOConfig`` and the log-prob engine's
two keys, the same as the preference family's (docs/logprob_engine.md)."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import GRPOConfig

from posttrain.registry import LogprobHead, logprob_head_field


@dataclass
class RLConfig(GRPOConfig):
    """``GRPOConfig`` plus ``logprob_head`` and ``share_prompts``."""

    logprob_head: LogprobHead = logprob_head_field()
    share_prompts: bool = field(
        default=True,
        metadata={"help": "Compute each prompt once for the completions of its group (policy, old policy and "
                          "reference) under a block attention mask; false: every completion runs with its own copy of "
                          "the prompt (same losses)."})
