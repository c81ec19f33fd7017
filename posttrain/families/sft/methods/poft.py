"""PoFT: preference-oriented SFT (Fan et al. 2025, arXiv 2412.12865).

The method's hyperparameters (the keys next to ``method.name: poft``), its registration and its pure objective
(docs/methods/poft.md).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from posttrain.families.sft.forward import ALIGNED_SCORES, SFT_LOSSES, SFTForward
from posttrain.families.sft.methods.sft import SFTParams
from posttrain.registry import MethodInfo, register


class PoFTParams(SFTParams):
    """Preference-oriented SFT: Bradley-Terry of the target's mean log-likelihood against aligned LLMs'."""

    poft_beta: float = Field(1.0, gt=0.0, description="beta of -logsigmoid(beta (r_target - r_aligned) + gamma).")
    poft_gamma: float = Field(0.0, description="gamma, the margin of the Bradley-Terry logit.")
    poft_target_tokens: Literal["response", "all"] = Field(
        "response", description="Tokens of the target's score and loss: the response only, or prompt and response.")
    aligned_models: list[str] = Field(
        default_factory=list,
        description="Aligned models that score the data before training; empty means the data carries "
        "`poft_ref_scores` (list) or `poft_ref_score` (float).",
    )
    scoring_batch_size: int = Field(8, ge=1, le=2**31 - 1, description="Batch size of the aligned models' scoring "
                                    "pass (method.aligned_models).")

    @property
    def completion_only(self) -> bool:
        return self.completion_only_loss and self.poft_target_tokens != "all"


register(
    MethodInfo(
        name="poft",
        doc="docs/methods/poft.md",
        family="sft",
        summary="Preference-oriented SFT: the target should out-score aligned LLMs on the SFT data (Bradley-Terry).",
        paper="Fan et al., Preference-Oriented Supervised Fine-Tuning: Favoring Target Model Over Aligned Large "
        "Language Models (arXiv 2412.12865)",
        recipe="recipes/poft.yaml",
        params=PoFTParams,
    )
)


@SFT_LOSSES.register("poft", doc="docs/methods/poft.md#objective", needs=lambda p: frozenset({ALIGNED_SCORES}),
                     token_sum_loss=False)
def poft_objective(p: PoFTParams, f: SFTForward):
    """PoFT (Fan et al. 2025, arXiv 2412.12865): Bradley-Terry of the target's mean log-likelihood against the
    aligned LLMs' scores (:func:`posttrain.losses.sft.poft_loss`). ``poft_target_tokens: all`` is handled by the
    config (completion_only_loss=False): every label counts."""
    from posttrain.losses.sft import poft_loss

    out = poft_loss(f.logps, f.mask, f.aligned_scores, p.poft_beta, p.poft_gamma)
    margin = (out.reward_target - out.reward_aligned).detach()
    metrics = {
        "ce_loss": -out.reward_target.detach().mean(),
        "poft/reward_target": out.reward_target.detach().mean(),
        "poft/reward_aligned": out.reward_aligned.mean(),
        "poft/margin": margin.mean(),
        "poft/accuracy": (margin > 0).float().mean(),
        "poft/tau_mean": out.tau.mean(),
    }
    return out.loss, metrics
