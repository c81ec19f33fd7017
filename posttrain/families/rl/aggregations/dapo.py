"""DAPO's token-level mean over the global batch (Yu et al., DAPO, arXiv 2503.14476; TRL ``loss_type="dapo"``).

docs/methods/grpo_aggregation.md#the-dapo-normaliser.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from posttrain.families.rl.parts import AGGREGATIONS

if TYPE_CHECKING:
    import torch

    from posttrain.families.rl.common import Normalizer


@AGGREGATIONS.register("dapo", doc="docs/methods/grpo_aggregation.md#the-dapo-normaliser", trl_loss_type="dapo")
def dapo(per_token_loss: torch.Tensor, mask: torch.Tensor, normalizer: Normalizer) -> torch.Tensor:
    """Token mean over the global batch: ``sum(mask*l) / (N_glob / num_processes)`` (TRL ``loss_type="dapo"``).

    DAPO, arXiv 2503.14476 (token-level policy gradient loss).

    ``normalizer.num_items_in_batch`` is ``N_glob``, the mask-token count of the optimizer step's global accumulated
    batch (all processes, all micro-batches); when None, the local ``mask.sum()`` is used (one process, one
    micro-batch). With DDP gradient averaging over ``num_processes`` the gradient is ``sum over all tokens of grad(l) /
    N_glob``. Not divided by the accumulation steps. The normaliser is clamped to at least 1, so an empty batch gives 0.
    """
    import torch

    mask = mask.to(per_token_loss.dtype)
    if normalizer.num_items_in_batch is None:
        total = mask.sum()
    else:
        total = torch.as_tensor(normalizer.num_items_in_batch, dtype=per_token_loss.dtype,
                                device=per_token_loss.device)
    total = total.clamp(min=1.0) / normalizer.num_processes
    return (per_token_loss * mask).sum() / total
