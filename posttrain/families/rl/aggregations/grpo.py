"""GRPO's sequence-mean aggregation (DeepSeekMath, arXiv 2402.03300; TRL ``loss_type="grpo"``).

docs/methods/grpo_aggregation.md#aggregations.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from posttrain.families.rl.parts import AGGREGATIONS

if TYPE_CHECKING:
    import torch

    from posttrain.families.rl.common import Normalizer


def row_normalizer(per_token_loss: torch.Tensor, n: Normalizer) -> torch.Tensor | float:
    """``B`` of the row-based aggregations: the micro-batch's rows (TRL's ``B_mb``) when ``n.num_rows`` is None, else
    ``max(num_rows, 1) / num_processes``: the kept rows of the optimizer step's global accumulated batch per process
    (dropped rows, PSR / NSR / W-REINFORCE, are not counted; rows kept but fully masked are, as in TRL). The result is
    then the micro-batch's share of the full-batch loss, not to be divided by the accumulation steps."""
    import torch

    if n.num_rows is None:
        return float(per_token_loss.size(0))
    rows = torch.as_tensor(n.num_rows, dtype=per_token_loss.dtype, device=per_token_loss.device)
    return rows.clamp(min=1.0) / n.num_processes


@AGGREGATIONS.register("grpo", doc="docs/methods/grpo_aggregation.md#aggregations", trl_loss_type="grpo",
                       recipe=("recipes/grpo.yaml", ["method.aggregation=grpo"]))
def grpo(per_token_loss: torch.Tensor, mask: torch.Tensor, normalizer: Normalizer) -> torch.Tensor:
    """``(1/B) sum_i (sum_t mask*l) / max(N_i, 1)`` (TRL ``loss_type="grpo"``).

    Per-sequence token mean, then mean over rows (DeepSeekMath GRPO, arXiv 2402.03300). ``B`` as :func:`row_normalizer`
    says. Rows with no mask tokens contribute 0."""
    mask = mask.to(per_token_loss.dtype)
    row_means = (per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    if normalizer.num_rows is None:
        return row_means.mean()
    return row_means.sum() / row_normalizer(per_token_loss, normalizer)
