"""ORPO: Monolithic Preference Optimization without Reference Model (Hong et al. 2024, arXiv 2403.07691).

The method's hyperparameters (the keys next to ``method.name: orpo``), its registration and its pure objective
(docs/methods/orpo.md).
"""

from __future__ import annotations

from pydantic import Field

from posttrain.families.preference.forward import PREFERENCE_LOSSES, PreferenceForward, chosen_nll
from posttrain.registry import MethodInfo, MethodParams, register


class ORPOParams(MethodParams):
    """ORPO: the chosen NLL plus beta * -logsig(log odds ratio of the length-normalised likelihoods), no reference."""

    beta: float = Field(0.1, gt=0.0, description="Weight lambda of the odds-ratio term (TRL's beta).")
    nll_on_prompt: bool = Field(
        True, description="The SFT term also scores the prompt tokens (the ORPO code's and TRL's default); false: the "
        "chosen response only (the ORPO code's --disable_prompt_loss).")
    prob_clamp: float = Field(1e-7, gt=0.0, lt=1.0, description="pibar is clamped to <= 1 - prob_clamp in the log-odds.")

    @property
    def scores_prompt_tokens(self) -> bool:
        return self.nll_on_prompt


register(
    MethodInfo(
        name="orpo",
        doc="docs/methods/orpo.md",
        family="preference",
        summary="ORPO: SFT plus an odds-ratio preference term in one stage, no reference model.",
        paper="Hong et al., ORPO: Monolithic Preference Optimization without Reference Model (arXiv 2403.07691)",
        recipe="recipes/orpo.yaml",
        params=ORPOParams,
    )
)


@PREFERENCE_LOSSES.register("orpo", doc="docs/methods/orpo.md#objective")
def orpo_objective(p, f: PreferenceForward):
    """ORPO (Hong et al. 2024, arXiv 2403.07691): the chosen rows' token-mean NLL (prompt included with
    ``nll_on_prompt``) plus ``beta`` times the mean odds-ratio loss (:func:`posttrain.losses.preference.orpo_loss`)."""
    from posttrain.losses.preference import mean_logps, orpo_loss, preference_metrics

    gather = f.comm.gather
    lbar_c, lbar_r = mean_logps(f.logps, f.mask).chunk(2, dim=0)
    nll, logged_nll = chosen_nll(f.comm, f.logps.chunk(2, dim=0)[0], f.scored_mask.chunk(2, dim=0)[0])
    out = orpo_loss(lbar_c, lbar_r, nll, beta=p.beta, prob_clamp=p.prob_clamp)
    metrics = preference_metrics(gather(out.chosen_rewards), gather(out.rejected_rewards), gather(lbar_c.detach()),
                                 gather(lbar_r.detach()))
    # TRL's ORPO names: log_odds_ratio = mean logsig(log OR), log_odds_chosen = mean log OR
    metrics["nll_loss"] = logged_nll
    metrics["log_odds_ratio"] = -gather(out.odds_ratio_losses).mean().item()
    metrics["log_odds_chosen"] = gather(out.log_odds_ratio).mean().item()
    return out.loss, metrics
