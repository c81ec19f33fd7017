"""WPO: Weighted Preference Optimization (Zhou et al. 2024, arXiv 2406.11827).

The method's hyperparameters (the keys next to ``method.name: wpo``), its registration and its pure objective
(docs/methods/wpo.md).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from posttrain.families.preference.forward import LOG_ALIGNMENT, PREFERENCE_LOSSES, REF_LOGPS, PreferenceForward
from posttrain.families.preference.methods.dpo import DPOParams, _dpo_terms
from posttrain.registry import MethodInfo, register


class WPOParams(DPOParams):
    """WPO: each pair's DPO loss weighted by the detached, length-normalised policy probability of both responses."""

    beta: float = Field(0.01, gt=0.0, description="KL strength (the WPO reference configs use 0.01).")
    use_weighting: bool = Field(True, description="Apply the WPO pair weights (false gives plain DPO).")
    wpo_alignment: Literal["sampled", "greedy", "none"] = Field(
        "sampled", description="Weight alignment: sampled (reference code, TRL), greedy (paper ablation) or none."
    )
    wpo_weight_clamp_max: float | None = Field(
        1.0, gt=0.0, description="Clamp W <= this (reference code, TRL <= 0.28); null = no clamp (TRL >= 0.29)."
    )

    @property
    def needs_hidden_states(self) -> bool:  # greedy alignment: full-vocab logits from the policy's hidden states
        return self.use_weighting and self.wpo_alignment == "greedy"

    @property
    def fused_weighting(self) -> bool:
        return self.use_weighting


register(
    MethodInfo(
        name="wpo",
        doc="docs/methods/wpo.md",
        family="preference",
        summary="Weighted Preference Optimization: DPO with pairs weighted by their (aligned) policy probability.",
        paper="Zhou et al., WPO: Enhancing RLHF with Weighted Preference Optimization (arXiv 2406.11827)",
        recipe="recipes/wpo.yaml",
        params=WPOParams,
        reference="required",
    )
)


@PREFERENCE_LOSSES.register(
    "wpo", doc="docs/methods/wpo.md#objective",
    needs=lambda p: frozenset({REF_LOGPS, LOG_ALIGNMENT} if p.use_weighting else {REF_LOGPS}))
def wpo_objective(p, f: PreferenceForward):
    """WPO (Zhou et al. 2024, arXiv 2406.11827): DPO pair losses weighted by the detached, length-normalised policy
    probability of both responses (plain DPO with ``use_weighting: false``)."""
    from posttrain.losses.preference import wpo_metrics, wpo_pair_weights, wpo_sequence_weights

    out, metrics = _dpo_terms(p, f)
    if not p.use_weighting:
        return out.losses.mean(), metrics
    seq_w = wpo_sequence_weights(f.logps.detach(), f.mask, f.log_alignment)
    w_c, w_r = seq_w.chunk(2, dim=0)
    pair_w = wpo_pair_weights(w_c, w_r, p.wpo_weight_clamp_max)
    loss = (pair_w * out.losses).mean()
    metrics.update(wpo_metrics(f.comm.gather(w_c), f.comm.gather(w_r), p.wpo_weight_clamp_max))
    return loss, metrics
