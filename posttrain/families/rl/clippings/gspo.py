"""GSPO: the PPO clip on the length-normalised sequence ratio (Zheng et al., "Group Sequence Policy Optimization",
arXiv 2507.18071; TRL ``importance_sampling_level="sequence"``).

docs/methods/gspo.md#objective.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from posttrain.families.rl.clippings.ppo import ClipRangeOptions, check_clip_range
from posttrain.families.rl.parts import CLIPPINGS

if TYPE_CHECKING:
    import torch

    from posttrain.families.rl.common import ClipOutput


@CLIPPINGS.register("gspo", doc="docs/methods/gspo.md#objective", options_model=ClipRangeOptions,
                    defaults={"epsilon": 3e-4, "epsilon_high": 4e-4}, check=check_clip_range)
def gspo(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
         opts) -> ClipOutput:
    """GSPO: the PPO clip on the sequence ratio ``s_i = exp((1/|y_i|) sum_t mask * (logps - old_logps))``.

    Zheng et al., arXiv 2507.18071, Eqs. 5-7. Every token of row ``i`` gets the row's loss ``-min(s_i*A_i, clip(s_i,
    1-eps_low, 1+eps_high)*A_i)`` (the ``grpo`` aggregation then gives the paper's per-sequence mean), and clipping
    acts on whole sequences. Gradient w.r.t. ``logps[i, t]`` on an unclipped row: ``-A_i * s_i / |y_i|`` (scaled by
    the aggregation). ``ratio`` and the clip masks are the row's, broadcast over its tokens; rows with no mask token
    have ``s_i = 1``. Default ranges are the paper's 3e-4 / 4e-4.
    """
    import torch

    from posttrain.families.rl.clippings.ppo import clipped_surrogate

    m = mask.to(logps.dtype)
    seq = ((logps - old_logps.detach()) * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)
    seq = seq.expand_as(logps)
    return clipped_surrogate(seq, torch.zeros_like(seq), advantages, opts.epsilon, opts.epsilon_high, opts.dual_clip_c)
