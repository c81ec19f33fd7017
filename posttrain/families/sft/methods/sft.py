"""SFT: supervised fine-tuning (Ouyang et al. 2022, arXiv 2203.02155).

The method's hyperparameters (the keys next to ``method.name: sft``), its registration and its pure objective
(docs/methods/sft.md).
"""

from __future__ import annotations

from pydantic import Field

from posttrain.families.sft.forward import SFT_LOSSES, SFTForward
from posttrain.registry import MethodInfo, MethodParams, register


class SFTParams(MethodParams):
    """Plain supervised fine-tuning: token-mean NLL over completion tokens."""

    completion_only_loss: bool = Field(True, description="Score only completion tokens (prompt tokens masked).")

    @property
    def completion_only(self) -> bool:
        """SFTConfig ``completion_only_loss``: only completion tokens are scored."""
        return self.completion_only_loss


register(
    MethodInfo(
        name="sft",
        doc="docs/methods/sft.md",
        family="sft",
        summary="Supervised fine-tuning: token-mean negative log-likelihood on completions.",
        paper="Ouyang et al., Training language models to follow instructions with human feedback (arXiv 2203.02155)",
        recipe="recipes/sft.yaml",
        params=SFTParams,
    )
)


@SFT_LOSSES.register("sft", doc="docs/methods/sft.md#objective")
def sft_objective(p: SFTParams, f: SFTForward):
    """Token-mean NLL on completion tokens (Ouyang et al. 2022, arXiv 2203.02155):
    :func:`posttrain.losses.sft.nll_loss`."""
    from posttrain.losses.sft import nll_loss

    return nll_loss(f.logps, f.mask, f.num_items), {}
