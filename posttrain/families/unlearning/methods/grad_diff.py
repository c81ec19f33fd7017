"""GradDiff: gradient ascent on the forget set plus the retain NLL (Liu et al., arXiv 2203.12817; NPO arXiv
2404.05868). Page: docs/methods/grad_diff.md."""

from __future__ import annotations

from dataclasses import replace

from pydantic import Field

from posttrain.families.unlearning.methods.ga import NPO_PAPER, UnlearningParams
from posttrain.families.unlearning.objective import (
    FORGET_LOGPS,
    RETAIN_LOGPS,
    UNLEARNING_OBJECTIVES,
    UnlearningForward,
    forget_retain_objective,
    term_needs,
)
from posttrain.registry import MethodInfo, register


class GradDiffParams(UnlearningParams):
    """GradDiff: GA on the forget set plus the token-mean NLL of the retain set."""

    alpha: float = Field(1.0, ge=0.0, description="Weight of the retain loss (NPO reference: grad_diff_coeff).")

    def objective_weights(self):
        return replace(super().objective_weights(), alpha=float(self.alpha))


register(
    MethodInfo(
        name="grad_diff",
        doc="docs/methods/grad_diff.md",
        family="unlearning",
        summary="GradDiff: gradient ascent on the forget set plus NLL on the retain set.",
        paper="Liu et al., Continual Learning and Private Unlearning (arXiv 2203.12817); " + NPO_PAPER,
        recipe="recipes/unlearn_grad_diff.yaml",
        params=GradDiffParams,
    )
)


@UNLEARNING_OBJECTIVES.register("grad_diff", doc="docs/methods/grad_diff.md#objective", forget="ga", retain="nll",
                                gamma=1.0, alpha=1.0, needs=term_needs({FORGET_LOGPS}, {RETAIN_LOGPS}))
def grad_diff_objective(p: GradDiffParams, f: UnlearningForward):
    """GradDiff (Liu et al., arXiv 2203.12817): GA on the forget set plus ``alpha`` times the retain NLL."""
    return forget_retain_objective("grad_diff", p, f)
