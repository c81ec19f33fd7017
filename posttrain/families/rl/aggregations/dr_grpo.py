"""Dr. GRPO's constant normaliser (Liu et al., "Understanding R1-Zero-Like Training", arXiv 2503.20783; TRL
``loss_type="dr_grpo"``).

docs/methods/grpo_aggregation.md#aggregations.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from posttrain.families.rl.parts import AGGREGATIONS

if TYPE_CHECKING:
    import torch

    from posttrain.families.rl.common import Normalizer


@AGGREGATIONS.register("dr_grpo", doc="docs/methods/grpo_aggregation.md#aggregations", trl_loss_type="dr_grpo",
                       recipe=("recipes/grpo.yaml", ["method.aggregation=dr_grpo", "method.scale_rewards=none"]))
def dr_grpo(per_token_loss: torch.Tensor, mask: torch.Tensor, normalizer: Normalizer) -> torch.Tensor:
    """``sum(mask*l) / (B * max_completion_length)`` (TRL ``loss_type="dr_grpo"``).

    Dr. GRPO, arXiv 2503.20783 (docs/methods/grpo_aggregation.md#aggregations). ``B`` is ``B_mb`` (every row of the
    micro-batch, masked or not; TRL), or with ``normalizer.num_rows`` the kept rows per process
    (:func:`posttrain.families.rl.aggregations.grpo.row_normalizer`)."""
    from posttrain.families.rl.aggregations.grpo import row_normalizer

    if normalizer.max_completion_length is None:
        raise ValueError("dr_grpo needs Normalizer.max_completion_length")
    mask = mask.to(per_token_loss.dtype)
    rows = row_normalizer(per_token_loss, normalizer)
    return (per_token_loss * mask).sum() / (rows * normalizer.max_completion_length)
