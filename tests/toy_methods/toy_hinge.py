"""A toy preference loss in one file, as docs/contributing.md adds one: params, method registration and a pure
objective. Reference-free hinge on the length-normalised log-likelihood margin (the SLiC-HF calibration loss, Zhao et
al. 2023, arXiv 2305.10425, with SimPO's length normalisation, arXiv 2405.14734). tests/test_add_a_method.py loads
this file and trains it."""

from __future__ import annotations

from pydantic import Field

from posttrain.families.preference.forward import PREFERENCE_LOSSES, PreferenceForward
from posttrain.registry import MethodInfo, MethodParams, register


class ToyHingeParams(MethodParams):
    """Toy hinge: ``max(0, 1 - beta * (mean log p(chosen) - mean log p(rejected))``)."""

    beta: float = Field(1.0, gt=0.0, description="Scale of the length-normalised margin.")


register(
    MethodInfo(
        name="toy_hinge",
        doc="docs/contributing.md",
        family="preference",
        summary="Toy: hinge on the length-normalised log-likelihood margin, no reference model.",
        paper="Zhao et al., SLiC-HF (arXiv 2305.10425)",
        recipe="(none)",
        params=ToyHingeParams,
    )
)


@PREFERENCE_LOSSES.register("toy_hinge", doc="docs/contributing.md")
def toy_hinge_objective(p: ToyHingeParams, f: PreferenceForward):
    """Mean over the pairs of ``relu(1 - beta * margin)`` (SLiC-HF, arXiv 2305.10425), ``margin`` the difference of the
    chosen and rejected token-mean log-probs; logs the gathered mean margin as ``toy/margin``."""
    from posttrain.losses.preference import mean_logps

    lbar_c, lbar_r = mean_logps(f.logps, f.mask).chunk(2, dim=0)
    margin = lbar_c - lbar_r
    loss = (1.0 - p.beta * margin).clamp(min=0.0).mean()
    return loss, {"toy/margin": f.comm.gather(margin.detach()).mean()}
