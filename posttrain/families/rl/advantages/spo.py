"""SPO's single-stream advantage (Xu & Ding, "Single-stream Policy Optimization", arXiv 2509.13232): one completion
per prompt, ``r - p_hat`` against each prompt's tracked success rate, z-scored over the batch.

docs/methods/spo.md#advantage. The options model, its cross-key check and the registration are here; the tracker,
sampler and the advantage's math are in :mod:`posttrain.families.rl.spo_tracker`, wired by
:mod:`posttrain.families.rl.spo_trainer`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from posttrain.families.rl.parts import ADVANTAGES, PartOptions

if TYPE_CHECKING:
    import torch

    from posttrain.families.rl.common import AdvantageOutput, Groups


class SPOOptions(PartOptions):
    """SPO (docs/methods/spo.md): one completion per prompt, a per-prompt success-rate tracker, prioritized sampling."""

    spo_offline_n: int = Field(
        8, ge=0, le=1024, description="spo: offline samples per prompt before training (n0) that set each prompt's "
        "starting estimate; at most n0 scores are kept; 0: Jeffreys prior (0.5, 0.5) for every prompt.")
    spo_offline_scores: str | None = Field(
        None, description="spo: a scores file (what `posttrain spo-init` writes) read instead of sampling the offline "
        "pass, with a warning when it records another pass; null: output_dir/spo_offline_scores.json when it exists "
        "and records this run's pass, else the pass is sampled before the first step and written there.")
    spo_rho: Literal["kl", "constant"] = Field(
        "kl", description="spo: forgetting factor from the policy's shift on each prompt's stored response (kl), "
        "or spo_rho_value for every visit.")
    spo_rho_value: float = Field(0.875, gt=0.0, lt=1.0, description="spo: the constant forgetting factor.")
    spo_rho_min: float = Field(0.875, gt=0.0, lt=1.0, description="spo: lower clip of rho; 1 / (1 - rho_min) is "
                               "the offline prior's weight.")
    spo_rho_max: float = Field(0.96, gt=0.0, lt=1.0, description="spo: upper clip of rho (a first visit's rho).")
    spo_d_half: float = Field(0.06, gt=0.0, description="spo: the policy shift D that halves the memory "
                              "(rho = 2^(-D / d_half)).")
    spo_sampling_eps: float = Field(0.05, gt=0.0, description="spo: sampling weight sqrt(p (1 - p)) + eps.")
    spo_prioritized: bool = Field(True, description="spo: sample prompts by that weight; false: uniformly.")
    spo_candidate_pool: int | None = Field(
        None, ge=1, description="spo: each generation batch is drawn from the next this-many prompts of a shuffled "
        "pass over data.train (the reference's gen_batch_size); null: from the whole training set.")
    spo_adv_eps: float = Field(1e-8, ge=0.0, description="spo: added to the batch std of r - p_hat.")
    spo_baseline: bool = Field(True, description="spo: subtract p_hat; false: the z-scored reward alone (the "
                               "paper's no-baseline ablation).")
    spo_reward_range: list[float] | None = Field(
        None, min_length=2, max_length=2, description="spo: [low, high] rescaling the combined reward to [0, 1] "
        "(clipped) for the success-rate tracker; null: rewards must already lie in [0, 1].")


def check_spo_settings(p) -> str | None:
    """SPO's cross-key settings: ``spo_rho_min <= spo_rho_max``, ``spo_reward_range`` as ``[low, high]``."""
    if p.spo_rho_min > p.spo_rho_max:
        return f"method.spo_rho_min: {p.spo_rho_min} is above method.spo_rho_max ({p.spo_rho_max})"
    if p.spo_reward_range is not None and not p.spo_reward_range[0] < p.spo_reward_range[1]:
        return f"method.spo_reward_range: expected [low, high] with low < high, got {p.spo_reward_range}"
    if p.spo_offline_scores is not None and p.spo_offline_n == 0:
        return ("method.spo_offline_scores: spo_offline_n is 0 (no offline scores are kept); set it to the number "
                "of scores per prompt to keep (n0)")
    return None


@ADVANTAGES.register("spo", doc="docs/methods/spo.md#advantage", options_model=SPOOptions, check=check_spo_settings,
                     single_stream=True, trainer="posttrain.families.rl.spo_trainer:SPOGRPOTrainer",
                     refuses={"scale_rewards": "z-scores r - p_hat over the whole batch (method.spo_adv_eps), not with "
                                               "scale_rewards"})
def spo_advantage(rewards: torch.Tensor, groups: Groups, opts) -> AdvantageOutput:
    """Single-stream advantage (SPO, Xu & Ding 2025, arXiv 2509.13232), every row kept.

    ``r - p_hat`` (``r`` alone without ``spo_baseline``) z-scored over the batch
    (:func:`posttrain.families.rl.spo_tracker.spo_advantages`), with ``groups.p_hat`` each row's tracked success
    rate read before this visit's update (SPO's trainer gives it); one row per group."""
    import torch

    from posttrain.families.rl.common import keep_all
    from posttrain.families.rl.spo_tracker import spo_advantages

    if groups.p_hat is None:
        raise ValueError("spo advantages need Groups.p_hat, each row's tracked success rate")
    rewards = torch.as_tensor(rewards)
    adv = spo_advantages(rewards, groups.p_hat, eps=opts.spo_adv_eps, baseline=opts.spo_baseline)
    return keep_all(adv.to(rewards.dtype))
