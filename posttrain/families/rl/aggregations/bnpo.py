"""BNPO: the token mean over the local micro-batch (TRL ``loss_type="bnpo"``; DAPO's token-level mean, arXiv
2503.14476, normalised per micro-batch).

docs/methods/grpo_aggregation.md#aggregations.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from posttrain.families.rl.parts import AGGREGATIONS

if TYPE_CHECKING:
    import torch

    from posttrain.families.rl.common import Normalizer


@AGGREGATIONS.register("bnpo", doc="docs/methods/grpo_aggregation.md#aggregations", per_micro_batch=True,
                       trl_loss_type="bnpo", recipe=("recipes/grpo.yaml", ["method.aggregation=bnpo"]))
def bnpo(per_token_loss: torch.Tensor, mask: torch.Tensor, normalizer: Normalizer) -> torch.Tensor:
    """``sum(mask*l) / max(sum(mask), 1)`` over the local micro-batch (TRL ``loss_type="bnpo"``).

    The token-level mean of DAPO (arXiv 2503.14476), normalised per local micro-batch instead of the global batch; the
    normaliser is unused (the trainer divides by the accumulation steps, ``per_micro_batch``)."""
    mask = mask.to(per_token_loss.dtype)
    return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
