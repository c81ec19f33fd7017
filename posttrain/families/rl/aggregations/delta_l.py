"""ΔL Normalization (He et al., arXiv 2509.07558): row weights ``∝ L_i^-alpha`` with the Dr. GRPO normaliser, an
unbiased minimum-variance aggregation of per-token losses over rows of different lengths.

docs/methods/grpo_aggregation.md#delta-l-normalisation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from posttrain.families.rl.parts import AGGREGATIONS, PartOptions

if TYPE_CHECKING:
    import torch

    from posttrain.families.rl.common import Normalizer


class DeltaLOptions(PartOptions):
    delta_l_alpha: float = Field(0.75, ge=0.0, le=1.0, description="delta_l: row weights proportional to L^-alpha.")
    delta_l_scope: Literal["batch", "group"] = Field(
        "batch", description="delta_l: normalise the row weights over the generation batch or within each group.")


def delta_l_weights(
    mask_or_lengths: torch.Tensor,
    alpha: float = 0.75,
    scope: str = "batch",
    num_generations: int | None = None,
) -> torch.Tensor:
    """ΔL row weights ``w_i = u_i / mean_{j in S} u_j`` with ``u_i = (L_i / mean L)^-alpha`` (detached ``[B]``).

    ΔL Normalization, He et al., arXiv 2509.07558 (x_i = (1/M) L_i^-alpha / sum_j L_j^-alpha). ``mask_or_lengths`` is
    a ``[B, T]`` mask or ``[B]`` lengths ``L_i``. ``scope="batch"`` normalises over all rows; ``"group"`` within each
    contiguous block of ``num_generations``. Rows with ``L_i = 0`` get weight 0 and are left out of the means (no
    NaN/inf). ``mean_S w = 1`` over the valid rows of each scope. The trainer computes them once per generation batch
    (``Normalizer.row_weights``) and reuses them across ``num_iterations``.
    """
    import torch

    if scope not in ("batch", "group"):
        raise ValueError(f"delta_l scope must be 'batch' or 'group', got {scope!r}")
    x = torch.as_tensor(mask_or_lengths).detach()
    dtype = x.dtype if torch.is_floating_point(x) else torch.get_default_dtype()
    lengths = (x.sum(-1) if x.dim() == 2 else x).to(dtype)
    B = lengths.numel()
    if scope == "group":
        if num_generations is None or num_generations < 1 or B % num_generations:
            raise ValueError("delta_l scope='group' needs num_generations dividing the batch size")
        seg = torch.arange(B, device=lengths.device) // num_generations
        nseg = B // num_generations
    else:
        seg = torch.zeros(B, dtype=torch.long, device=lengths.device)
        nseg = 1
    valid = lengths > 0
    zeros = torch.zeros(nseg, dtype=dtype, device=lengths.device)
    count = zeros.index_add(0, seg, valid.to(dtype)).clamp(min=1.0)
    mean_len = zeros.index_add(0, seg, torch.where(valid, lengths, 0.0)) / count
    # Rescale by the mean length before the power, as the reference does, for fp32 stability; it cancels.
    u = torch.where(valid, (lengths / mean_len[seg].clamp(min=1e-12)).clamp(min=1e-12) ** (-alpha), 0.0)
    mean_u = zeros.index_add(0, seg, u) / count
    return torch.where(valid, u / mean_u[seg].clamp(min=1e-30), 0.0)


@AGGREGATIONS.register("delta_l", doc="docs/methods/grpo_aggregation.md#delta-l-normalisation",
                       options_model=DeltaLOptions, row_weights=True, trl_loss_type="dr_grpo")
def delta_l(per_token_loss: torch.Tensor, mask: torch.Tensor, normalizer: Normalizer) -> torch.Tensor:
    """ΔL aggregation: ``sum_i w_i sum_t mask*l / (B * max_completion_length)`` (``B`` as in ``dr_grpo``).

    ΔL Normalization, arXiv 2509.07558, with ``w`` = ``normalizer.row_weights`` (:func:`delta_l_weights` of the
    generation batch, sliced to the micro-batch).

    Over a full batch this is ``sum_i x_i sum_t(...)`` with ``x_i = (1/T_max) L_i^-alpha / sum_j L_j^-alpha``.
    ``alpha=0`` is exactly ``dr_grpo``; ``alpha=1`` is ``grpo`` times ``B / (T_max * sum_j 1/L_j)``. Multiplying the
    per-row surrogate by ``w_i > 0`` equals scaling the advantage (clip masks unchanged). With a KL term the trainer
    keeps the KL term unweighted (docs/methods/grpo_aggregation.md#kl-term-under-delta-l).
    """
    from posttrain.families.rl.aggregations.dr_grpo import dr_grpo

    if normalizer.row_weights is None:
        raise ValueError("delta_l needs Normalizer.row_weights (delta_l_weights of the generation batch)")
    weights = normalizer.row_weights.detach().to(per_token_loss.dtype).reshape(-1, 1)
    return dr_grpo(per_token_loss * weights, mask, normalizer)
