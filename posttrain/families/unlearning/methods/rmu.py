"""RMU: representation misdirection (Li et al., the WMDP benchmark, arXiv 2403.03218). Page: docs/methods/rmu.md.

Its objective works on the hidden states of one decoder layer (``steers_activations``): the forget term ``rmu`` and
the retain term ``activations`` (``terms/``), combined by :func:`posttrain.losses.unlearning.rmu_loss`."""

from __future__ import annotations

from dataclasses import replace

from pydantic import Field, model_validator

from posttrain.families.unlearning.methods.ga import UnlearningParams
from posttrain.families.unlearning.objective import (
    FORGET_ACTIVATIONS,
    RETAIN_ACTIVATIONS,
    UNLEARNING_OBJECTIVES,
    UnlearningForward,
    term_needs,
)
from posttrain.registry import MethodInfo, register


class RMUParams(UnlearningParams):
    """RMU: steer one layer's hidden states on forget answers to a fixed random vector, keep them on retain answers."""

    gamma: float = Field(1.0, ge=0.0, description="Weight of the forget (steering) loss.")
    alpha: float = Field(1.0, ge=0.0, description="Weight of the retain loss (activations kept equal to the frozen "
                         "model's; open-unlearning's 1, WMDP's code 1200 on Zephyr-7B).")
    rmu_layer: int = Field(7, ge=0, le=2**31 - 1, description="0-based decoder layer whose output is steered and "
                           "kept (WMDP and open-unlearning: 7).")
    steering_coeff: float = Field(2.0, gt=0.0, description="Norm c of the control vector c*u (open-unlearning: 2; "
                                  "WMDP: 6.5 on Zephyr-7B); set it above the layer's activation norm.")
    trainable_params: list[str] | None = Field(
        None, description="Regexes (full match on parameter names) of the weights that move; null: the paper's, the "
        "MLP down-projections of layers rmu_layer-2 .. rmu_layer; ['.*']: every weight (open-unlearning's config).")

    @model_validator(mode="after")
    def _check_rmu(self):
        import re

        from posttrain.errors import UserError

        if self.mask != "none":
            raise UserError("method.mask: RMU picks the weights that move with method.trainable_params; remove mask")
        for i, pattern in enumerate(self.trainable_params or []):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise UserError(f"method.trainable_params[{i}]: not a regular expression ({exc})") from None
        if self.trainable_params == []:
            raise UserError("method.trainable_params: empty, nothing would train; null selects the paper's weights")
        return self

    def objective_weights(self):
        return replace(super().objective_weights(), alpha=float(self.alpha))

    def trainable_patterns(self) -> list[str]:
        """The regexes of the weights that move (the paper's default: down_proj of the three layers up to rmu_layer)."""
        if self.trainable_params is not None:
            return list(self.trainable_params)
        layers = "|".join(str(i) for i in range(max(self.rmu_layer - 2, 0), self.rmu_layer + 1))
        return [rf"(.*\.)?layers\.({layers})\.mlp\.down_proj\.weight"]


register(
    MethodInfo(
        name="rmu",
        doc="docs/methods/rmu.md",
        family="unlearning",
        summary="RMU: forget activations steered to a random vector at one layer, retain activations kept; few "
        "weights move.",
        paper="Li et al., The WMDP Benchmark: Measuring and Reducing Malicious Use With Unlearning (arXiv 2403.03218)",
        recipe="recipes/unlearn_rmu.yaml",
        params=RMUParams,
        reference="required",
    )
)


@UNLEARNING_OBJECTIVES.register("rmu", doc="docs/methods/rmu.md#objective", forget="rmu", retain="activations",
                                gamma=1.0, alpha=1.0, steers_activations=True,
                                needs=term_needs({FORGET_ACTIVATIONS}, {RETAIN_ACTIVATIONS}))
def rmu_objective(p: RMUParams, f: UnlearningForward):
    """RMU (Li et al., the WMDP benchmark, arXiv 2403.03218): :func:`posttrain.losses.unlearning.rmu_loss` on the
    hidden states of layer ``rmu_layer`` (the trainer captures them: ``steers_activations``)."""
    from posttrain.losses.unlearning import rmu_loss

    w = p.objective_weights()
    return rmu_loss(f.forget_activations, f.forget_mask, f.control_vector, f.retain_activations,
                    f.retain_ref_activations, f.retain_mask, gamma=w.gamma, alpha=w.alpha)
