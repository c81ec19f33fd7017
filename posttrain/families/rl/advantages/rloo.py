"""RLOO's leave-one-out baseline (Ahmadian et al., "Back to Basics: Revisiting REINFORCE Style Optimization for
Learning from Human Feedback in LLMs", arXiv 2402.14740).

docs/methods/rloo.md#advantage.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from posttrain.families.rl.parts import ADVANTAGES, PartOptions

if TYPE_CHECKING:
    import torch

    from posttrain.families.rl.common import AdvantageOutput, Groups


class RLOOOptions(PartOptions):
    rloo_normalize_advantages: bool = Field(
        False, description="rloo: then standardise the advantages over the generation batch (TRL's RLOOConfig "
        "normalize_advantages).")


@ADVANTAGES.register("rloo", doc="docs/methods/rloo.md#advantage", options_model=RLOOOptions,
                     refuses={"scale_rewards": "uses no std scaling (rloo_normalize_advantages: true standardises over "
                                               "the batch)"})
def rloo_advantage(rewards: torch.Tensor, groups: Groups, opts) -> AdvantageOutput:
    """Leave-one-out baseline (RLOO, Ahmadian et al. 2024, arXiv 2402.14740), every row kept.

    Eq. 5: ``A_i = r_i - mean_{j != i in the group} r_j`` (equivalently ``G/(G-1) * (r_i - mean_g)``).

    As TRL's ``RLOOTrainer``: the baseline averages over the scorable siblings only (NaN rewards left out); a row with
    no scorable sibling, and a NaN row, gets 0. ``rloo_normalize_advantages`` (TRL ``normalize_advantages``): then
    ``(A - mean(A)) / (std(A) + 1e-4)`` over the batch's scorable rows (unbiased std). Worked example: group ``[1, 0,
    0, 1]`` gives ``[2/3, -2/3, -2/3, 2/3]``.
    """
    import torch

    from posttrain.families.rl.common import DEFAULT_EPS, as_float, keep_all, nanstd_all

    r = as_float(rewards)
    gidx = groups.index(r.numel(), r.device)
    valid = ~torch.isnan(r)
    zeros = torch.zeros(r.numel() // groups.size, dtype=r.dtype, device=r.device)
    count = zeros.index_add(0, gidx, valid.to(r.dtype))[gidx]
    total = zeros.index_add(0, gidx, torch.where(valid, r, 0.0))[gidx]
    adv = r - (total - r) / (count - 1)  # NaN for NaN rows and for rows without a scorable sibling (0/0)
    adv = torch.where(count > 1, adv, torch.nan)
    if opts.rloo_normalize_advantages:
        adv = (adv - torch.nanmean(adv)) / (nanstd_all(adv) + DEFAULT_EPS)
    return keep_all(torch.nan_to_num(adv, nan=0.0))
