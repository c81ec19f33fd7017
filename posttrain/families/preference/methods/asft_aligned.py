"""Aligned SFT through absolute likelihood (Wang et al. 2024, arXiv 2409.10571).

The method's hyperparameters (the keys next to ``method.name: asft_aligned``), its registration and its pure objective
(docs/methods/asft_aligned.md).
"""

from __future__ import annotations

from pydantic import Field

from posttrain.families.preference.forward import PREFERENCE_LOSSES, PreferenceForward
from posttrain.registry import MethodInfo, MethodParams, register


class ASFTAlignedParams(MethodParams):
    """Aligned SFT: -c_sft*lbar_w + lam*[-logsig(beta*odds_w) - logsig(-beta*odds_l)], no reference model."""

    beta: float = Field(1.0, gt=0.0, description="Scale beta of the log-odds in the alignment term.")
    asft_lambda: float = Field(1.0, ge=0.0, description="Weight lam of the absolute-likelihood alignment term.")
    sft_coef: float = Field(1.0, ge=0.0, description="Weight c_sft of the chosen per-sequence mean NLL.")
    prob_clamp: float = Field(1e-7, gt=0.0, lt=1.0, description="pibar is clamped to <= 1 - prob_clamp.")


register(
    MethodInfo(
        name="asft_aligned",
        doc="docs/methods/asft_aligned.md",
        family="preference",
        summary="Aligned SFT through absolute likelihood: pointwise log-odds on chosen and rejected, no reference.",
        paper="Wang et al., ASFT: Aligned Supervised Fine-Tuning through Absolute Likelihood (arXiv 2409.10571)",
        recipe="recipes/asft_aligned.yaml",
        params=ASFTAlignedParams,
    )
)


@PREFERENCE_LOSSES.register("asft_aligned", doc="docs/methods/asft_aligned.md#objective")
def asft_aligned_objective(p, f: PreferenceForward):
    """Aligned SFT (Wang et al. 2024, arXiv 2409.10571): absolute-likelihood log-odds on chosen and rejected plus
    the chosen NLL; no reference model."""
    from posttrain.losses.preference import asft_aligned_loss, asft_metrics, mean_logps

    gather = f.comm.gather
    lbar_c, lbar_r = mean_logps(f.logps, f.mask).chunk(2, dim=0)
    out = asft_aligned_loss(lbar_c, lbar_r, p.beta, p.asft_lambda, p.sft_coef, p.prob_clamp)
    loss = out.losses.mean()
    gathered = type(out)(*(gather(getattr(out, name).detach()) for name in out.__dataclass_fields__))
    metrics = asft_metrics(gathered, gather(lbar_c.detach()), gather(lbar_r.detach()))
    metrics["logps/chosen_sum"] = gather(f.chosen_logps.detach()).mean().item()
    metrics["logps/rejected_sum"] = gather(f.rejected_logps.detach()).mean().item()
    return loss, metrics
