"""Weighted-REINFORCE (Zhu et al., "The Surprising Effectiveness of Negative Reinforcement in LLM Reasoning", arXiv
2506.01347): ``lambda * L_PSR + L_NSR``.

docs/methods/grpo_advantages.md#psr-nsr-and-w-reinforce.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from posttrain.families.rl.parts import ADVANTAGES, PartOptions

if TYPE_CHECKING:
    import torch

    from posttrain.families.rl.common import AdvantageOutput, Groups


class WReinforceOptions(PartOptions):
    w_reinforce_lambda: float = Field(0.1, ge=0.0, description="w_reinforce: advantage of correct rows (+lambda).")


@ADVANTAGES.register("w_reinforce", doc="docs/methods/grpo_advantages.md#psr-nsr-and-w-reinforce",
                     options_model=WReinforceOptions, defaults={"entropy_coef": 1e-4},
                     refuses={"scale_rewards": "uses no group baseline or std scaling"})
def w_reinforce_advantage(rewards: torch.Tensor, groups: Groups, opts) -> AdvantageOutput:
    """Weighted-REINFORCE (Zhu et al., arXiv 2506.01347): ``A = +lambda`` on correct rows, ``-1`` on incorrect ones.

    ``lambda`` is ``w_reinforce_lambda`` (0.1 in the paper); unscored rows (NaN) are dropped. ``lambda = 1`` is plain
    REINFORCE with +/-1 rewards and no baseline; the groups are unused."""
    import torch

    from posttrain.families.rl.common import AdvantageOutput, correctness

    correct, incorrect = correctness(rewards, opts.correct_reward)
    dtype = torch.get_default_dtype()
    return AdvantageOutput(opts.w_reinforce_lambda * correct.to(dtype) - incorrect.to(dtype), correct | incorrect)
