"""NPO and its retain variants NPO+RT and NPO+KL (Zhang et al. 2024, arXiv 2404.05868). Page: docs/methods/npo.md.

``npo`` is the paper's pure NPO (alpha 0); open-unlearning's ``NPO`` trainer (alpha 1, NLL) is ``npo_rt``."""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

from pydantic import Field

from posttrain.families.unlearning.methods.ga import NPO_PAPER, UnlearningParams
from posttrain.families.unlearning.objective import (
    FORGET_LOGPS,
    FORGET_REF_LOGPS,
    RETAIN_KL,
    RETAIN_LOGPS,
    UNLEARNING_OBJECTIVES,
    UnlearningForward,
    forget_retain_objective,
    term_needs,
)
from posttrain.registry import MethodInfo, register


class NPOParams(UnlearningParams):
    """NPO: (2/beta) softplus(beta * (s_theta - s_ref)) per forget sequence, against a frozen reference."""

    beta: float = Field(0.1, gt=0.0, description="NPO inverse temperature; beta -> 0 recovers GA.")
    precompute_ref_log_probs: bool = Field(
        False, description="Compute the reference's forget log-probs once before training, cached on disk (a rerun "
        "reads them); npo / npo_rt keep no reference in memory, npo_kl keeps it for the retain KL.")

    def objective_weights(self):
        return replace(super().objective_weights(), beta=float(self.beta))


class NPORTParams(NPOParams):
    """NPO + retain NLL (open-unlearning's NPO trainer)."""

    alpha: float = Field(1.0, ge=0.0, description="Weight of the retain NLL.")

    def objective_weights(self):
        return replace(super().objective_weights(), alpha=float(self.alpha))


class NPOKLParams(NPOParams):
    """NPO + KL(pi_ref || pi_theta) on the retain set."""

    alpha: float = Field(1.0, ge=0.0, description="Weight of the retain KL (NPO reference: KL_coeff).")
    retain_kl_mask: Literal["completion", "none"] = Field(
        "completion",
        description="completion: KL on answer tokens only; none: every position incl. prompt and padding "
        "(the reference code and open-unlearning).",
    )

    def objective_weights(self):
        return replace(super().objective_weights(), alpha=float(self.alpha))

    @property
    def retain_kl_every_position(self) -> bool:
        return self.retain_kl_mask == "none"


for _name, _params, _summary in (
    ("npo", NPOParams, "Negative Preference Optimisation: bounded, adaptively weighted forgetting against a "
     "reference."),
    ("npo_rt", NPORTParams, "NPO plus the retain-set NLL (NPO+RT)."),
    ("npo_kl", NPOKLParams, "NPO plus KL(reference || policy) on the retain set (NPO+KL)."),
):
    register(MethodInfo(name=_name, doc="docs/methods/npo.md", family="unlearning", summary=_summary, paper=NPO_PAPER,
                        recipe=f"recipes/unlearn_{_name}.yaml", params=_params, reference="required"))


@UNLEARNING_OBJECTIVES.register("npo", doc="docs/methods/npo.md#objectives", forget="npo", retain=None, gamma=1.0,
                                alpha=0.0, beta=0.1, needs=term_needs({FORGET_LOGPS, FORGET_REF_LOGPS}))
def npo_objective(p: NPOParams, f: UnlearningForward):
    """NPO (Zhang et al. 2024, arXiv 2404.05868): ``(2/beta) softplus(beta (s_theta - s_ref))`` per forget sequence."""
    return forget_retain_objective("npo", p, f)


@UNLEARNING_OBJECTIVES.register("npo_rt", doc="docs/methods/npo.md#objectives", forget="npo", retain="nll",
                                gamma=1.0, alpha=1.0, beta=0.1,
                                needs=term_needs({FORGET_LOGPS, FORGET_REF_LOGPS}, {RETAIN_LOGPS}))
def npo_rt_objective(p: NPORTParams, f: UnlearningForward):
    """NPO+RT (arXiv 2404.05868): NPO plus ``alpha`` times the retain NLL."""
    return forget_retain_objective("npo_rt", p, f)


@UNLEARNING_OBJECTIVES.register("npo_kl", doc="docs/methods/npo.md#objectives", forget="npo", retain="kl",
                                gamma=1.0, alpha=1.0, beta=0.1,
                                needs=term_needs({FORGET_LOGPS, FORGET_REF_LOGPS}, {RETAIN_KL}))
def npo_kl_objective(p: NPOKLParams, f: UnlearningForward):
    """NPO+KL (arXiv 2404.05868): NPO plus ``alpha`` times KL(pi_ref || pi_theta) on the retain set."""
    return forget_retain_objective("npo_kl", p, f)
