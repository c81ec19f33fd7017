"""Positive Sample Reinforcement (Zhu et al., "The Surprising Effectiveness of Negative Reinforcement in LLM
Reasoning", arXiv 2506.01347): reinforce the correct rows only.

docs/methods/grpo_advantages.md#psr-nsr-and-w-reinforce.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from posttrain.families.rl.parts import ADVANTAGES

if TYPE_CHECKING:
    import torch

    from posttrain.families.rl.common import AdvantageOutput, Groups


@ADVANTAGES.register("psr", doc="docs/methods/grpo_advantages.md#psr-nsr-and-w-reinforce",
                     defaults={"entropy_coef": 1e-4}, refuses={"scale_rewards": "uses no group baseline or std scaling"},
                     recipe=("recipes/grpo_nsr.yaml", ["method.advantage=psr"]))
def psr_advantage(rewards: torch.Tensor, groups: Groups, opts) -> AdvantageOutput:
    """Positive Sample Reinforcement (Zhu et al., arXiv 2506.01347): ``A = +1`` on correct rows, the others dropped.

    L_PSR: correct means combined reward ``== correct_reward`` (or a bool correctness tensor); every other row is
    dropped (``keep`` False: no tokens in any denominator). No baseline, no std scaling; the groups are unused."""
    import torch

    from posttrain.families.rl.common import AdvantageOutput, correctness

    correct, _ = correctness(rewards, opts.correct_reward)
    return AdvantageOutput(correct.to(torch.get_default_dtype()), correct)
