"""GRPO's group-relative advantage (DeepSeekMath, arXiv 2402.03300; Dr. GRPO's unscaled variant, arXiv 2503.20783).

docs/methods/grpo_advantages.md#group-advantage.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from posttrain.families.rl.parts import ADVANTAGES, PartOptions

if TYPE_CHECKING:
    import torch

    from posttrain.families.rl.common import AdvantageOutput, Groups


class GroupOptions(PartOptions):
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="group / stratified: std scaling of the group advantage (none = Dr. GRPO)."
    )


def group_relative(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group",
                   eps: float | None = None) -> torch.Tensor:
    """GRPO group-relative advantages, TRL ``GRPOTrainer`` semantics (DeepSeekMath, arXiv 2402.03300).

    With ``mu_g`` the NaN-aware group mean and ``std`` the unbiased (n-1) NaN-aware std:

    * ``"group"``: ``A_i = (r_i - mu_g) / (std_g + eps)``
    * ``"batch"``: ``A_i = (r_i - mu_g) / (std_all + eps)`` (std over all B rewards, mean still per group)
    * ``"none"`` (Dr. GRPO, arXiv 2503.20783): ``A_i = r_i - mu_g``

    ``eps`` (default 1e-4, TRL's) is added to the std (not a max). NaN rewards are excluded from the statistics and get
    ``A = 0``. A group whose rewards are all equal gets ``A = 0`` exactly. Returns a detached ``[B]`` tensor.
    """
    import torch

    from posttrain.families.rl.common import DEFAULT_EPS, as_float, group_index, nanstd_all, segment_stats

    if scale_rewards not in ("group", "batch", "none"):
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale_rewards!r}")
    eps = DEFAULT_EPS if eps is None else eps
    r = as_float(rewards)
    gidx = group_index(r.numel(), num_generations, r.device)
    mean, std_g, _ = segment_stats(r, gidx, r.numel() // num_generations)
    adv = r - mean
    if scale_rewards == "group":
        adv = adv / (std_g + eps)
    elif scale_rewards == "batch":
        adv = adv / (nanstd_all(r) + eps)
    return torch.nan_to_num(adv, nan=0.0)


@ADVANTAGES.register("group", doc="docs/methods/grpo_advantages.md#group-advantage", options_model=GroupOptions,
                     normalize_then_sum=True)
def group_advantage(rewards: torch.Tensor, groups: Groups, opts) -> AdvantageOutput:
    """GRPO group-relative advantages (DeepSeekMath, arXiv 2402.03300), every row kept.

    ``(r - mean_g) / (std_g + 1e-4)`` over each prompt's completions, scaled as ``scale_rewards`` says
    (:func:`group_relative`)."""
    from posttrain.families.rl.common import keep_all

    return keep_all(group_relative(rewards, groups.size, opts.scale_rewards))
