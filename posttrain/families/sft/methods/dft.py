"""DFT: Dynamic Fine-Tuning (Wu et al. 2025, arXiv 2508.05629).

The method's hyperparameters (the keys next to ``method.name: dft``), its registration and its pure objective
(docs/methods/dft.md).
"""

from __future__ import annotations

from posttrain.families.sft.forward import SFT_LOSSES, SFTForward
from posttrain.families.sft.methods.sft import SFTParams
from posttrain.registry import MethodInfo, register


class DFTParams(SFTParams):
    """Dynamic Fine-Tuning: NLL weighted per token by the detached token probability."""


register(
    MethodInfo(
        name="dft",
        doc="docs/methods/dft.md",
        family="sft",
        summary="Dynamic Fine-Tuning: each token's NLL weighted by its detached probability.",
        paper="Wu et al., On the Generalization of SFT: A Reinforcement Learning Perspective with Reward "
        "Rectification (arXiv 2508.05629)",
        recipe="recipes/dft.yaml",
        params=DFTParams,
    )
)


@SFT_LOSSES.register("dft", doc="docs/methods/dft.md#objective")
def dft_objective(p: DFTParams, f: SFTForward):
    """Dynamic Fine-Tuning (Wu et al. 2025, arXiv 2508.05629): :func:`posttrain.losses.sft.dft_loss`, NLL logged."""
    from posttrain.distributed import TokenMean
    from posttrain.losses.sft import dft_loss

    loss = dft_loss(f.logps, f.mask, f.num_items)
    return loss, {"nll": TokenMean.of(-f.logps, f.mask)}
