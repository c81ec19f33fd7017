"""SimPO: Simple Preference Optimization (Meng et al. 2024, arXiv 2405.14734).

The method's hyperparameters (the keys next to ``method.name: simpo``), its registration and its pure objective
(docs/methods/simpo.md).
"""

from __future__ import annotations

from pydantic import Field

from posttrain.families.preference.forward import PREFERENCE_LOSSES, PreferenceForward, chosen_nll
from posttrain.registry import MethodInfo, MethodParams, register


class SimPOParams(MethodParams):
    """SimPO: -logsig(beta * (lbar_w - lbar_l - gamma_beta_ratio)) on length-normalised log-probs, no reference model."""

    beta: float = Field(2.0, gt=0.0, description="Scale beta of the length-normalised implicit reward (SimPO code default).")
    gamma_beta_ratio: float = Field(
        0.25, ge=0.0, description="Target reward margin gamma divided by beta (SimPO code default; TRL's "
        "simpo_gamma = beta * gamma_beta_ratio).")
    sft_coef: float = Field(
        0.0, ge=0.0, description="Weight of the chosen responses' token-mean NLL (SimPO's sft_weight; TRL's cpo_alpha, "
        "whose default there is 1).")


register(
    MethodInfo(
        name="simpo",
        doc="docs/methods/simpo.md",
        family="preference",
        summary="SimPO: length-normalised log-likelihood margin with a target margin, no reference model.",
        paper="Meng et al., SimPO: Simple Preference Optimization with a Reference-Free Reward (arXiv 2405.14734)",
        recipe="recipes/simpo.yaml",
        params=SimPOParams,
    )
)


@PREFERENCE_LOSSES.register("simpo", doc="docs/methods/simpo.md#objective")
def simpo_objective(p, f: PreferenceForward):
    """SimPO (Meng et al. 2024, arXiv 2405.14734): the mean of :func:`posttrain.losses.preference.simpo_loss` over the
    pairs, plus ``sft_coef`` times the chosen responses' token-mean NLL; no reference model."""
    from posttrain.losses.preference import mean_logps, preference_metrics, simpo_loss

    gather = f.comm.gather
    lbar_c, lbar_r = mean_logps(f.logps, f.mask).chunk(2, dim=0)
    out = simpo_loss(lbar_c, lbar_r, beta=p.beta, gamma_beta_ratio=p.gamma_beta_ratio)
    loss = out.losses.mean()
    metrics = preference_metrics(gather(out.chosen_rewards), gather(out.rejected_rewards), gather(lbar_c.detach()),
                                 gather(lbar_r.detach()))
    if p.sft_coef > 0:
        nll, metrics["nll_loss"] = chosen_nll(f.comm, f.logps.chunk(2, dim=0)[0], f.mask.chunk(2, dim=0)[0])
        loss = loss + p.sft_coef * nll
    return loss, metrics
