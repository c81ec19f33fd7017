"""Anchored SFT (Zhu et al. 2025, arXiv 2509.23753).

The method's hyperparameters (the keys next to ``method.name: asft_anchored``), its registration and its pure
objective (docs/methods/asft_anchored.md).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from posttrain.families.sft.forward import ANCHOR_KL, SFT_LOSSES, SFTForward
from posttrain.families.sft.methods.sft import SFTParams
from posttrain.registry import MethodInfo, register


class ASFTAnchoredParams(SFTParams):
    """Anchored SFT: DFT plus a token-level KL to a frozen anchor (the initial policy)."""

    asft_kl_coef: float = Field(0.05, ge=0.0, description="Weight lambda of the KL anchor.")
    kl_direction: Literal["base_to_policy", "policy_to_base"] = Field(
        "base_to_policy", description="KL(pi_base||pi_theta) as the reference code computes, or the paper's reverse."
    )


register(
    MethodInfo(
        name="asft_anchored",
        doc="docs/methods/asft_anchored.md",
        family="sft",
        summary="Anchored SFT: DFT plus a token-level KL anchor to the frozen initial model.",
        paper="Zhu et al., Anchored Supervised Fine-Tuning (arXiv 2509.23753)",
        recipe="recipes/asft_anchored.yaml",
        params=ASFTAnchoredParams,
        reference="required",
    )
)


@SFT_LOSSES.register("asft_anchored", doc="docs/methods/asft_anchored.md#objective",
                     needs=lambda p: frozenset({ANCHOR_KL}))
def asft_anchored_objective(p: ASFTAnchoredParams, f: SFTForward):
    """Anchored SFT (Zhu et al. 2025, arXiv 2509.23753): DFT plus a token-level KL to the frozen anchor
    (:func:`posttrain.losses.sft.asft_anchored_loss`)."""
    from posttrain.distributed import TokenMean
    from posttrain.losses.sft import asft_anchored_loss, dft_token_loss

    loss = asft_anchored_loss(f.logps, f.anchor_kl, f.mask, p.asft_kl_coef, f.num_items)
    metrics = {
        "dft_loss": TokenMean.of(dft_token_loss(f.logps.detach()), f.mask),
        "kl": TokenMean.of(f.anchor_kl, f.mask),
        "nll": TokenMean.of(-f.logps, f.mask),
    }
    return loss, metrics
