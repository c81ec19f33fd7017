"""REINFORCE++ (Hu et al., "REINFORCE++: Stabilizing Critic-Free Policy Optimization with Global Advantage
Normalization", arXiv 2501.03262): the group mean subtracted (the "baseline" variant), then whitened over every
completion token of the batch (verl's ``masked_whiten``).

docs/methods/reinforce_pp.md#advantage.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from posttrain.families.rl.parts import ADVANTAGES, PartOptions

if TYPE_CHECKING:
    import torch

    from posttrain.families.rl.common import AdvantageOutput, Groups

WHITEN_EPS = 1e-8  # verl's masked_whiten


class ReinforcePPOptions(PartOptions):
    reinforce_pp_baseline: bool = Field(
        True, description="reinforce_pp: subtract each prompt's mean reward before the batch whitening "
        "(REINFORCE++-baseline); false: the global whitening alone (REINFORCE++).")


@ADVANTAGES.register("reinforce_pp", doc="docs/methods/reinforce_pp.md#advantage", options_model=ReinforcePPOptions,
                     needs_lengths=True,
                     refuses={"scale_rewards": "whitens over the batch's completion tokens, not with scale_rewards"})
def reinforce_pp_advantage(rewards: torch.Tensor, groups: Groups, opts) -> AdvantageOutput:
    """REINFORCE++ (-baseline) (Hu et al. 2025, arXiv 2501.03262), every row kept.

    ``A_i = (x_i - mu) / sqrt(var + 1e-8)``, with an outcome reward and gamma = 1 (every completion token's return is
    ``r_i``).

    ``x_i = r_i - mean_g(r)`` with ``reinforce_pp_baseline`` (REINFORCE++-baseline, verl
    ``reinforce_plus_plus_baseline``), else ``x_i = r_i`` (verl ``reinforce_plus_plus``). ``mu`` and ``var`` are the
    token-weighted mean and unbiased variance over the batch, as verl's ``masked_whiten`` over the response mask: with
    ``L_i`` = ``groups.lengths`` (completion tokens; 1 per row when None), ``mu = sum L x / sum L`` and ``var = sum L
    (x - mu)^2 / (sum L - 1)``. NaN rewards are left out of every statistic and get 0. Worked example (baseline,
    lengths ``[1, 2, 3, 2]``, one group ``[1, 0, 0, 1]``): ``x = [.5, -.5, -.5, .5]``, ``mu = -1/8``, ``var =
    0.267857``, ``A = [1.207615, -0.724569, -0.724569, 1.207615]``.
    """
    import torch

    from posttrain.families.rl.common import as_float, keep_all, segment_stats

    r = as_float(rewards)
    if opts.reinforce_pp_baseline:
        mean_g, _, _ = segment_stats(r, groups.index(r.numel(), r.device), r.numel() // groups.size)
        r = r - mean_g
    valid = ~torch.isnan(r)
    lengths = groups.lengths
    w = torch.ones_like(r) if lengths is None else torch.as_tensor(lengths, device=r.device).to(r.dtype)
    w = torch.where(valid, w, 0.0)
    x = torch.where(valid, r, 0.0)
    n = w.sum()
    mu = (w * x).sum() / n.clamp(min=1e-12)
    var = torch.where(n > 1, (w * (x - mu) ** 2).sum() / (n - 1).clamp(min=1e-12), 0.0)
    adv = (x - mu) * torch.rsqrt(var + WHITEN_EPS)
    return keep_all(torch.where(valid, adv, 0.0))
