"""KTO: Kahneman-Tversky Optimisation (Ethayarajh et al. 2024, arXiv 2402.01306).

The method's hyperparameters (the keys next to ``method.name: kto``) and its registration (docs/methods/kto.md); the
loss is :func:`posttrain.losses.preference.kto_loss`, called by ``trainer.py``.
"""

from __future__ import annotations

from pydantic import Field

from posttrain.registry import MethodInfo, MethodParams, register


class KTOParams(MethodParams):
    """KTO: a prospect-theoretic value of each completion's implicit reward against a KL reference point."""

    beta: float = Field(0.1, gt=0.0, description="Scale of the implicit reward log pi/pi_ref (TRL's beta).")
    desirable_weight: float = Field(
        1.0, gt=0.0, description="lambda_D: weight of the desirable rows' losses (the paper advises lambda_D n_D / "
        "(lambda_U n_U) in [1, 4/3]).")
    undesirable_weight: float = Field(1.0, gt=0.0, description="lambda_U: weight of the undesirable rows' losses.")
    precompute_ref_log_probs: bool = Field(
        False, description="Compute reference log-probs (rows and KL sequences) once before training; no reference "
        "kept in memory.")


register(
    MethodInfo(
        name="kto",
        doc="docs/methods/kto.md",
        family="unpaired",
        summary="KTO: completions labelled desirable or undesirable (no pairs needed), a prospect-theoretic value "
        "against a KL reference point.",
        paper="Ethayarajh et al., KTO: Model Alignment as Prospect Theoretic Optimization (arXiv 2402.01306)",
        recipe="recipes/kto.yaml",
        params=KTOParams,
        reference="required",
    )
)
