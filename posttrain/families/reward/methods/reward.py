"""Reward model: a Bradley-Terry sequence classifier (Ouyang et al. 2022, arXiv 2203.02155; Stiennon et al. 2020,
arXiv 2009.01325).

The method's hyperparameters (the keys next to ``method.name: reward``) and its registration (docs/methods/reward.md);
the loss is :func:`posttrain.losses.reward.bradley_terry_loss`, called by ``trainer.py``.
"""

from __future__ import annotations

from pydantic import Field

from posttrain.registry import MethodInfo, MethodParams, register


class RewardParams(MethodParams):
    """Bradley-Terry reward model: a scalar score per sequence, trained so that the chosen response scores higher."""

    margin: bool = Field(
        False, description="Ask each pair's score gap to exceed its `margin` column (a number per pair; Llama 2's "
        "preference-strength margin, TRL's margin column).")
    center_rewards_coef: float = Field(
        0.0, ge=0.0, description="Weight of mean (s_c + s_r)^2, pulling the scores towards zero mean (TRL's "
        "center_rewards_coefficient; Eisenstein et al., arXiv 2312.09244); 0: off.")


register(
    MethodInfo(
        name="reward",
        doc="docs/methods/reward.md",
        family="reward",
        summary="Reward model: a sequence-classification head trained on preference pairs (Bradley-Terry), scored "
        "by pairwise accuracy; usable as method.rewards[].model of GRPO and online DPO.",
        paper="Ouyang et al., Training language models to follow instructions with human feedback (arXiv 2203.02155); "
        "Stiennon et al., Learning to summarize from human feedback (arXiv 2009.01325)",
        recipe="recipes/reward.yaml",
        params=RewardParams,
    )
)
