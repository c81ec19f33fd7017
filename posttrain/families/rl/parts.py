"""The GRPO family's selectable parts, one registry per recipe key, importable without torch.

``method.advantage`` (:data:`ADVANTAGES`), ``method.aggregation`` (:data:`AGGREGATIONS`), ``method.clipping``
(:data:`CLIPPINGS`) and ``method.loss`` (:data:`POLICY_LOSSES`: the clipped surrogate built from the three, or PACS).
Each entry (:mod:`posttrain.registry`) owns the pydantic model of the method keys it reads (``options_model``);
:class:`posttrain.methods.GRPOParams` is assembled from those models, and a key is refused when no selected part owns
it. The math lives in :mod:`posttrain.rl.advantages`, :mod:`posttrain.rl.aggregation`, :mod:`posttrain.rl.clipping`
and :mod:`posttrain.rl.pacs`; entries name it with :class:`~posttrain.registry.Lazy`, imported (with torch) on the
first call. Pages: docs/methods/grpo_advantages.md, grpo_aggregation.md, grpo_clipping.md, pacs.md.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from posttrain.registry import (
    AdvantageEntry,
    AggregationEntry,
    ClippingEntry,
    Lazy,
    PolicyLossEntry,
    Registry,
)


class PartOptions(BaseModel):
    """The method keys one part reads (strict, as every method key: no coercion, no NaN or infinities)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


# --------------------------------------------------------------------------------------------------------------------
# method.advantage (docs/methods/grpo_advantages.md): fn(rewards, num_generations, **options) -> AdvantageOutput
# --------------------------------------------------------------------------------------------------------------------


class GroupOptions(PartOptions):
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="group / stratified: std scaling of the group advantage (none = Dr. GRPO)."
    )


class StratifiedOptions(PartOptions):
    stratum_key: str = Field(
        "tool_calls",
        description="stratified: 'tool_calls' (count of <tool_call> / message tool_calls; 0 for free text, so one "
        "stratum per group = GRPO), a dataset column, or 'module:function' (or 'file.py:function') called as "
        "fn(prompt=, completion=, **row) -> hashable.",
    )
    san_alpha: float = Field(0.8, ge=0.0, le=1.0, description="stratified: blend alpha*A_SAN + (1-alpha)*A_GRPO.")
    san_scale: Literal["stratum", "none"] = Field(
        "stratum", description="stratified: divide by each stratum's std (stratum) or only centre (none).")
    san_scope: Literal["group", "batch"] = Field(
        "group", description="stratified: a stratum is (prompt group, key) or the key across the whole batch.")
    san_eps: float = Field(1e-4, ge=0.0, description="stratified: added to each stratum's std (tied to GRPO's 1e-4, so "
                           "one stratum per group equals GRPO exactly; the paper's unit-variance claims use 0).")


class WReinforceOptions(PartOptions):
    w_reinforce_lambda: float = Field(0.1, ge=0.0, description="w_reinforce: advantage of correct rows (+lambda).")


class RLOOOptions(PartOptions):
    rloo_normalize_advantages: bool = Field(
        False, description="rloo: then standardise the advantages over the generation batch (TRL's RLOOConfig "
        "normalize_advantages).")


class ReinforcePPOptions(PartOptions):
    reinforce_pp_baseline: bool = Field(
        True, description="reinforce_pp: subtract each prompt's mean reward before the batch whitening "
        "(REINFORCE++-baseline); false: the global whitening alone (REINFORCE++).")


class SPOOptions(PartOptions):
    """SPO (docs/methods/spo.md): one completion per prompt, a per-prompt success-rate tracker, prioritized sampling."""

    spo_offline_n: int = Field(
        8, ge=0, le=1024, description="spo: offline samples per prompt before training (n0) that set each prompt's "
        "starting estimate; at most n0 scores are kept; 0: Jeffreys prior (0.5, 0.5) for every prompt.")
    spo_offline_scores: str | None = Field(
        None, description="spo: a JSON file {prompt_key: [scores]} (an earlier run's spo_offline_scores.json) "
        "instead of sampling the offline pass again.")
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


ADVANTAGES: Registry[AdvantageEntry] = Registry("advantage estimator", AdvantageEntry)
"""``method.advantage`` -> :class:`posttrain.registry.AdvantageEntry` (its fields say what each one needs)."""

_ADV = "posttrain.rl.advantages:"
_NEGATIVE_REINFORCEMENT: dict[str, Any] = dict(
    defaults={"entropy_coef": 1e-4}, refuses={"scale_rewards": "uses no group baseline or std scaling"})

ADVANTAGES.add("group", Lazy(_ADV + "group_advantage"), doc="docs/methods/grpo_advantages.md#group-advantage",
               options_model=GroupOptions, normalize_then_sum=True,
               options=lambda p, strata: {"scale_rewards": p.scale_rewards})
ADVANTAGES.add("stratified", Lazy(_ADV + "stratified_advantage"),
               doc="docs/methods/grpo_advantages.md#stratified-advantage-san", options_model=StratifiedOptions,
               needs_strata=True, refuses={"scale_rewards": "scales with method.san_scale, not scale_rewards"},
               options=lambda p, strata: {"strata": strata, "alpha": p.san_alpha, "scale": p.san_scale,
                                          "scope": p.san_scope, "eps": p.san_eps})
ADVANTAGES.add("psr", Lazy(_ADV + "psr_advantage"), doc="docs/methods/grpo_advantages.md#psr-nsr-and-w-reinforce",
               **_NEGATIVE_REINFORCEMENT, recipe=("recipes/grpo_nsr.yaml", ["method.advantage=psr"]),
               options=lambda p, strata: {"correct_value": p.correct_reward})
ADVANTAGES.add("nsr", Lazy(_ADV + "nsr_advantage"), doc="docs/methods/grpo_advantages.md#psr-nsr-and-w-reinforce",
               **_NEGATIVE_REINFORCEMENT, options=lambda p, strata: {"correct_value": p.correct_reward})
ADVANTAGES.add("w_reinforce", Lazy(_ADV + "w_reinforce_advantage"),
               doc="docs/methods/grpo_advantages.md#psr-nsr-and-w-reinforce", options_model=WReinforceOptions,
               **_NEGATIVE_REINFORCEMENT,
               options=lambda p, strata: {"lam": p.w_reinforce_lambda, "correct_value": p.correct_reward})
ADVANTAGES.add("rloo", Lazy(_ADV + "rloo_advantage"), doc="docs/methods/rloo.md#advantage", options_model=RLOOOptions,
               refuses={"scale_rewards": "uses no std scaling (rloo_normalize_advantages: true standardises over "
                                         "the batch)"},
               options=lambda p, strata: {"normalize": p.rloo_normalize_advantages})
ADVANTAGES.add("reinforce_pp", Lazy(_ADV + "reinforce_pp_advantage"), doc="docs/methods/reinforce_pp.md#advantage",
               options_model=ReinforcePPOptions, needs_lengths=True,
               refuses={"scale_rewards": "whitens over the batch's completion tokens, not with scale_rewards"},
               options=lambda p, strata: {"baseline": p.reinforce_pp_baseline})
ADVANTAGES.add("spo", Lazy(_ADV + "spo_advantage"), doc="docs/methods/spo.md#advantage", options_model=SPOOptions,
               check=check_spo_settings, single_stream=True, trainer="posttrain.trainers.spo:SPOGRPOTrainer",
               refuses={"scale_rewards": "z-scores r - p_hat over the whole batch (method.spo_adv_eps), not with "
                                         "scale_rewards"},
               options=lambda p, strata: {"eps": p.spo_adv_eps, "baseline": p.spo_baseline})


# --------------------------------------------------------------------------------------------------------------------
# method.aggregation (docs/methods/grpo_aggregation.md): fn(per_token_loss, mask, **options)
# --------------------------------------------------------------------------------------------------------------------


class DeltaLOptions(PartOptions):
    delta_l_alpha: float = Field(0.75, ge=0.0, le=1.0, description="delta_l: row weights proportional to L^-alpha.")
    delta_l_scope: Literal["batch", "group"] = Field(
        "batch", description="delta_l: normalise the row weights over the generation batch or within each group.")


AGGREGATIONS: Registry[AggregationEntry] = Registry("loss aggregation", AggregationEntry)
"""``method.aggregation`` -> :class:`posttrain.registry.AggregationEntry`."""

_AGG = "posttrain.rl.aggregation:"
_AGG_DOC = "docs/methods/grpo_aggregation.md#aggregations"


def _rows(n) -> dict[str, Any]:  # the kept rows of the accumulated global batch
    return {"num_rows": n.num_rows, "num_processes": n.num_processes}


def _rows_t_max(n) -> dict[str, Any]:  # B * T_max (Dr. GRPO)
    return {**_rows(n), "max_completion_length": n.max_completion_length}


AGGREGATIONS.add("grpo", Lazy(_AGG + "grpo"), doc=_AGG_DOC, normalize=_rows, trl_loss_type="grpo",
                 recipe=("recipes/grpo.yaml", ["method.aggregation=grpo"]))
AGGREGATIONS.add("bnpo", Lazy(_AGG + "bnpo"), doc=_AGG_DOC, per_micro_batch=True, trl_loss_type="bnpo",
                 recipe=("recipes/grpo.yaml", ["method.aggregation=bnpo"]))
AGGREGATIONS.add("dr_grpo", Lazy(_AGG + "dr_grpo"), doc=_AGG_DOC, normalize=_rows_t_max, trl_loss_type="dr_grpo",
                 recipe=("recipes/grpo.yaml", ["method.aggregation=dr_grpo", "method.scale_rewards=none"]))
AGGREGATIONS.add("dapo", Lazy(_AGG + "dapo"), doc="docs/methods/grpo_aggregation.md#the-dapo-normaliser",
                 normalize=lambda n: {"num_items_in_batch": n.num_items_in_batch, "num_processes": n.num_processes},
                 trl_loss_type="dapo")
AGGREGATIONS.add("delta_l", Lazy(_AGG + "delta_l"), doc="docs/methods/grpo_aggregation.md#delta-l-normalisation",
                 options_model=DeltaLOptions, row_weights=True, trl_loss_type="dr_grpo",
                 normalize=lambda n: {**_rows_t_max(n), "weights": n.row_weights})


# --------------------------------------------------------------------------------------------------------------------
# method.clipping (docs/methods/grpo_clipping.md): fn(logps, old_logps, advantages, **options) -> ClipOutput
# --------------------------------------------------------------------------------------------------------------------


class ClipRangeOptions(PartOptions):
    epsilon: float | None = Field(
        None, gt=0.0, lt=1.0, description="Lower clip range (and upper, unless epsilon_high); default 0.2, gspo 3e-4.")
    epsilon_high: float | None = Field(None, gt=0.0, description="Upper clip range; gppo default 0.28, gspo 4e-4.")
    dual_clip_c: float | None = Field(None, gt=1.0, description="Dual clip for A<0 (verl); off by default.")


class GPPOOptions(ClipRangeOptions):
    gppo_beta1: float = Field(1.0, ge=0.0, description="gppo: gradient scale of low-clipped tokens.")
    gppo_beta2: float = Field(1.0, ge=0.0, description="gppo: gradient scale of high-clipped tokens.")
    gppo_only_high: bool = Field(False, description="gppo: keep the gradient of high-clipped tokens only.")


class CISPOOptions(PartOptions):
    cispo_weight_max: float = Field(
        5.0, gt=0.0, description="cispo: upper bound of the importance weight, 1 + eps_high^IS (TRL's epsilon_high for "
        "loss_type cispo).")
    cispo_weight_min: float | None = Field(
        None, ge=0.0, description="cispo: lower bound of the importance weight, 1 - eps_low^IS; null: none (the paper).")


def check_clip_range(p) -> str | None:
    """The clip range ``[1 - epsilon, 1 + epsilon_high]``: clip-higher (DAPO, arXiv 2503.14476) widens the upper side;
    an upper range narrower than the lower one is refused as swapped values."""
    if p.epsilon_high is not None and p.epsilon_high < p.epsilon:
        if "epsilon_high" not in p.model_fields_set:  # the selected rule's default upper range
            return (f"method.epsilon: {p.epsilon:g} is above the upper clip range of clipping {p.clipping} "
                    f"(epsilon_high {p.epsilon_high:g}, its default); set method.epsilon_high as well")
        return (f"method.epsilon_high: {p.epsilon_high:g} is below method.epsilon {p.epsilon:g}: the upper clip range "
                "would be narrower than the lower one (clip-higher widens it; swapped values?)")
    return None


def check_cispo_bounds(p) -> str | None:
    """CISPO's importance-weight bounds: ``cispo_weight_min`` (when given) at most ``cispo_weight_max``."""
    if p.cispo_weight_min is not None and p.cispo_weight_min > p.cispo_weight_max:
        return (f"method.cispo_weight_min: {p.cispo_weight_min} is above method.cispo_weight_max "
                f"({p.cispo_weight_max})")
    return None


def _ppo_range(p) -> dict[str, Any]:
    return {"epsilon": p.epsilon, "epsilon_high": p.epsilon_high, "dual_clip_c": p.dual_clip_c}


CLIPPINGS: Registry[ClippingEntry] = Registry("clipping rule", ClippingEntry)
"""``method.clipping`` -> :class:`posttrain.registry.ClippingEntry`."""

_CLIP = "posttrain.rl.clipping:"
CLIPPINGS.add("ppo", Lazy(_CLIP + "ppo_clip"), doc="docs/methods/grpo_clipping.md#ppo-clip-higher",
              options_model=ClipRangeOptions, options=_ppo_range, check=check_clip_range)
CLIPPINGS.add("gppo", Lazy(_CLIP + "gppo_clip"), doc="docs/methods/grpo_clipping.md#gppo", options_model=GPPOOptions,
              defaults={"epsilon_high": 0.28, "sft_coef": 0.1}, gradient_preserved=True, check=check_clip_range,
              options=lambda p: {**_ppo_range(p), "beta1": p.gppo_beta1, "beta2": p.gppo_beta2,
                                 "only_high": p.gppo_only_high})
# ``sequence_level``: the rule also takes the loss ``mask`` (GSPO's length-normalised sequence ratio)
CLIPPINGS.add("gspo", Lazy(_CLIP + "gspo_clip"), doc="docs/methods/gspo.md#objective", options_model=ClipRangeOptions,
              defaults={"epsilon": 3e-4, "epsilon_high": 4e-4}, sequence_level=True, options=_ppo_range,
              check=check_clip_range)
CLIPPINGS.add("cispo", Lazy(_CLIP + "cispo_clip"), doc="docs/methods/cispo.md#objective", options_model=CISPOOptions,
              gradient_preserved=True, check=check_cispo_bounds,
              options=lambda p: {"weight_max": p.cispo_weight_max, "weight_min": p.cispo_weight_min})


# --------------------------------------------------------------------------------------------------------------------
# method.loss: the clipped surrogate of the parts above, or PACS (docs/methods/pacs.md)
# --------------------------------------------------------------------------------------------------------------------


class SurrogateOptions(PartOptions):
    """The clipped surrogate's own terms besides its parts: the GPPO SFT term, the KL to the reference, the entropy
    bonus."""

    sft_coef: float | None = Field(
        None, ge=0.0, description="GPPO's NLL term on correct rollouts; default 0.1 with gppo, else 0."
    )
    beta: float = Field(
        0.0, ge=0.0, description="KL (k3) coefficient against the reference: `ref_model` when given, else a frozen "
        "copy of the initial policy (the adapter-disabled base with peft); no reference is loaded when 0."
    )
    use_bias_correction_kl: bool = Field(
        False, description="Multiply the per-token k3 by the importance ratio exp(logp - old_logp) (DeepSeek-V3.2, "
        "arXiv 2512.02556; TRL's GRPOConfig default). false: plain k3 as in DeepSeekMath GRPO. Needs beta > 0."
    )
    entropy_coef: float | None = Field(
        None, ge=0.0, description="Entropy bonus (loss -= coef * token-mean entropy); default 1e-4 for psr/nsr/w_reinforce "
        "(the paper's), else 0."
    )


class PACSOptions(PartOptions):
    pacs_beta: float = Field(1.0, gt=0.0, description="pacs: scale of the log-ratio reward proxy.")
    pacs_reward_method: Literal["ratio", "avg_logp"] = Field(
        "ratio", description="pacs: r = beta * summed log-ratio to the generating policy, or beta * mean log-prob.")
    pacs_score: Literal["rloo", "grpo", "naive"] = Field(
        "rloo", description="pacs: the logit psi: r minus the other rows' mean (rloo), group-standardised, or r.")
    pacs_weight: Literal["question", "only_positive", "only_negative", "none"] = Field(
        "question", description="pacs: row weights; question = balanced class weights within each group.")


POLICY_LOSSES: Registry[PolicyLossEntry] = Registry("policy loss", PolicyLossEntry)
"""``method.loss`` -> :class:`posttrain.registry.PolicyLossEntry`."""

# the surrogate has no function of its own: the trainer composes it from the selected parts
POLICY_LOSSES.add("grpo", None, doc="docs/methods/grpo.md#advantages-aggregation-and-clipping",
                  options_model=SurrogateOptions)
POLICY_LOSSES.add("pacs", Lazy("posttrain.rl.pacs:pacs_objective"), doc="docs/methods/pacs.md#loss",
                  options_model=PACSOptions, uses_parts=False,
                  replaces="its own RLOO score, no clipping, no KL, a row mean",
                  options=lambda p: {"beta": p.pacs_beta, "reward_method": p.pacs_reward_method,
                                     "score": p.pacs_score, "weight": p.pacs_weight})

# (recipe key, registry) of the surrogate's parts, in the order GRPOParams lists them
SURROGATE_PARTS: tuple[tuple[str, Registry], ...] = (
    ("advantage", ADVANTAGES), ("aggregation", AGGREGATIONS), ("clipping", CLIPPINGS))
