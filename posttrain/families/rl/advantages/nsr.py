"""Negative Sample Reinforcement (Zhu et al., "The Surprising Effectiveness of Negative Reinforcement in LLM
Reasoning", arXiv 2506.01347): push down the incorrect rows only.

docs/methods/grpo_advantages.md#psr-nsr-and-w-reinforce.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from posttrain.families.rl.parts import ADVANTAGES

if TYPE_CHECKING:
    import torch

    from posttrain.families.rl.common import AdvantageOutput, Groups


@ADVANTAGES.register("nsr", doc="docs/methods/grpo_advantages.md#psr-nsr-and-w-reinforce",
                     defaults={"entropy_coef": 1e-4}, refuses={"scale_rewards": "uses no group baseline or std scaling"})
def nsr_advantage(rewards: torch.Tensor, groups: Groups, opts) -> AdvantageOutput:
    """Negative Sample Reinforcement (Zhu et al., arXiv 2506.01347): ``A = -1`` on incorrect rows, the others dropped.

    L_NSR: incorrect means any scored reward other than ``correct_reward``; correct and unscored rows are dropped. No
    baseline; the groups are unused."""
    import torch

    from posttrain.families.rl.common import AdvantageOutput, correctness

    _, incorrect = correctness(rewards, opts.correct_reward)
    return AdvantageOutput(-incorrect.to(torch.get_default_dtype()), incorrect)
