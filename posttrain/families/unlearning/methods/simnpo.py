"""SimNPO: reference-free, length-normalised NPO plus the retain NLL (Fan et al. 2024, arXiv 2410.07163), with
open-unlearning's SimNPO defaults. Page: docs/methods/simnpo.md."""

from __future__ import annotations

from dataclasses import replace

from pydantic import Field

from posttrain.families.unlearning.methods.ga import UnlearningParams
from posttrain.families.unlearning.objective import (
    FORGET_LOGPS,
    RETAIN_LOGPS,
    UNLEARNING_OBJECTIVES,
    UnlearningForward,
    forget_retain_objective,
    term_needs,
)
from posttrain.registry import MethodInfo, register


class SimNPOParams(UnlearningParams):
    """SimNPO: reference-free, length-normalised NPO, plus the retain NLL (open-unlearning's SimNPO defaults)."""

    gamma: float = Field(0.125, ge=0.0, description="Weight of the forget loss.")
    alpha: float = Field(1.0, ge=0.0, description="Weight of the retain NLL.")
    beta: float = Field(4.5, gt=0.0, description="Inverse temperature beta of the length-normalised forget loss.")
    delta: float = Field(0.0, description="Length-normalised margin (the SimNPO paper's gamma = beta * delta).")

    def objective_weights(self):
        return replace(super().objective_weights(), alpha=float(self.alpha), beta=float(self.beta),
                       delta=float(self.delta))


register(
    MethodInfo(
        name="simnpo",
        doc="docs/methods/simnpo.md",
        family="unlearning",
        summary="SimNPO: reference-free, length-normalised NPO plus the retain NLL.",
        paper="Fan et al., Simplicity Prevails: Rethinking Negative Preference Optimization for LLM Unlearning "
        "(arXiv 2410.07163)",
        recipe="recipes/unlearn_simnpo.yaml",
        params=SimNPOParams,
    )
)


@UNLEARNING_OBJECTIVES.register("simnpo", doc="docs/methods/simnpo.md#objective", forget="simnpo", retain="nll",
                                gamma=0.125, alpha=1.0, beta=4.5, delta=0.0,
                                needs=term_needs({FORGET_LOGPS}, {RETAIN_LOGPS}))
def simnpo_objective(p: SimNPOParams, f: UnlearningForward):
    """SimNPO (Fan et al. 2024, arXiv 2410.07163): reference-free, length-normalised NPO plus the retain NLL."""
    return forget_retain_objective("simnpo", p, f)
