"""GA: gradient ascent on the forget set (the unlearning baseline; NPO paper, arXiv 2404.05868; TOFU arXiv 2401.06121).

The parameters every unlearning method shares (:class:`UnlearningParams`: the forget weight and the WAGLE mask,
docs/methods/wagle.md), method ``ga`` and the objective ``ga_kl`` (GA + retain KL, a loss-module objective only,
docs/methods/npo.md#the-ga_kl-objective). Page: docs/methods/ga.md.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from posttrain.families.unlearning.objective import (
    FORGET_LOGPS,
    RETAIN_KL,
    UNLEARNING_OBJECTIVES,
    ObjectiveWeights,
    UnlearningForward,
    forget_retain_objective,
    term_needs,
)
from posttrain.registry import MethodInfo, MethodParams, register

_MASK_KEYS = ("mask_sparsity", "mask_gamma", "mask_num_batches", "mask_before_clip", "mask_decay_masked")
NPO_PAPER = (
    "Zhang et al., Negative Preference Optimization: From Catastrophic Collapse to Effective Unlearning "
    "(arXiv 2404.05868)"
)


class UnlearningParams(MethodParams):
    """Gradient ascent (GA): minus the token-mean NLL of the forget set.

    Every unlearning method also takes a weight mask (docs/methods/wagle.md): ``mask: wagle`` lets only the weights
    selected by WAGLE's attribution score move."""

    gamma: float = Field(1.0, ge=0.0, description="Weight of the forget loss (NPO reference code: npo_coeff).")
    mask: Literal["none", "wagle"] = Field(
        "none", description="wagle: update only the weights chosen by the WAGLE score (arXiv 2410.17509), computed "
        "once before training from forget and retain gradients; needs data.retain.")
    mask_sparsity: float | None = Field(
        None, ge=0.0, lt=1.0, description="wagle: fraction of the weights frozen (the rest, floor((1 - s) N), move).")
    mask_gamma: float = Field(1e-6, gt=0.0, description="wagle: Hessian estimate gamma in |(theta - g_r/gamma) g_f|.")
    mask_num_batches: int | None = Field(
        None, ge=1, le=2**31 - 1, description="wagle: forget (and as many retain) batches scored; null: the whole "
        "forget set.")
    mask_before_clip: bool = Field(
        False, description="wagle: mask the gradients before the global norm clip (false: after it, as the authors' "
        "loop does).")
    mask_decay_masked: bool = Field(
        False, description="wagle: let weight decay still shrink frozen weights (the authors' code); false: frozen "
        "weights stay bit-identical.")

    @property
    def retain_kl_every_position(self) -> bool:
        """The retain KL term scores every position, prompt and padding included (NPO+KL's ``retain_kl_mask: none``)."""
        return False

    def objective_weights(self) -> ObjectiveWeights:
        """The objective's weights these params set (the others: the objective's defaults); a method with more
        weights extends it."""
        return ObjectiveWeights(gamma=float(self.gamma))

    @property
    def retain_weight(self) -> float:
        """``alpha``, the weight of the objective's retain term (0.0 for a method without one, such as GA)."""
        alpha = self.objective_weights().alpha
        return 0.0 if alpha is None else float(alpha)

    @property
    def uses_weight_mask(self) -> bool:
        """A WAGLE weight mask is computed before training and applied to every update (``mask: wagle``)."""
        return self.mask != "none"

    @model_validator(mode="after")
    def _check_mask(self):
        from posttrain.errors import UserError

        if self.mask == "none":
            for key in _MASK_KEYS:
                if key in self.model_fields_set:
                    raise UserError(f"method.{key}: only used with method.mask: wagle")
        elif self.mask_sparsity is None:
            raise UserError("method.mask_sparsity: required with mask: wagle (fraction of weights frozen, in [0, 1))")
        return self


register(
    MethodInfo(
        name="ga",
        doc="docs/methods/ga.md",
        family="unlearning",
        summary="Gradient ascent on the forget set (the unlearning baseline; collapses the model).",
        paper=NPO_PAPER + "; TOFU: Maini et al. (arXiv 2401.06121)",
        recipe="recipes/unlearn_ga.yaml",
        params=UnlearningParams,
    )
)


@UNLEARNING_OBJECTIVES.register("ga", doc="docs/methods/ga.md#objective", forget="ga", retain=None, gamma=1.0,
                                alpha=0.0, needs=term_needs({FORGET_LOGPS}))
def ga_objective(p: UnlearningParams, f: UnlearningForward):
    """Gradient ascent (NPO paper, arXiv 2404.05868; TOFU arXiv 2401.06121): ``gamma`` times minus the forget NLL."""
    return forget_retain_objective("ga", p, f)


@UNLEARNING_OBJECTIVES.register("ga_kl", doc="docs/methods/npo.md#the-ga_kl-objective", recipe_method=False,
                                forget="ga", retain="kl", gamma=1.0, alpha=1.0,
                                needs=term_needs({FORGET_LOGPS}, {RETAIN_KL}))
def ga_kl_objective(p, f: UnlearningForward):
    """GA plus KL(pi_ref || pi_theta) on the retain set (NPO paper, arXiv 2404.05868)."""
    return forget_retain_objective("ga_kl", p, f)
