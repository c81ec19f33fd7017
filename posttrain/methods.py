"""The method registry: every ``method.name`` a recipe can pick, with its hyperparameters and trainer.

Each method declares a pydantic model of its hyperparameters (the sibling keys of ``method.name`` in a recipe),
the family it belongs to (which decides the data format and the trainer), its paper, and its runnable recipe.
The math lives in ``posttrain.losses`` / ``posttrain.rl``; the wiring in ``posttrain.trainers``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class MethodParams(BaseModel):
    """Base class of a method's hyperparameters. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------------------------------------------------
# SFT family
# --------------------------------------------------------------------------------------------------------------------


class SFTParams(MethodParams):
    """Plain supervised fine-tuning: token-mean NLL over completion tokens."""

    completion_only_loss: bool = Field(True, description="Score only completion tokens (prompt tokens masked).")


class DFTParams(SFTParams):
    """Dynamic Fine-Tuning: NLL weighted per token by the detached token probability."""


class ASFTAnchoredParams(SFTParams):
    """Anchored SFT: DFT plus a token-level KL to a frozen anchor (the initial policy)."""

    asft_kl_coef: float = Field(0.05, ge=0.0, description="Weight lambda of the KL anchor.")
    kl_direction: Literal["base_to_policy", "policy_to_base"] = Field(
        "base_to_policy", description="KL(pi_base||pi_theta) as the reference code computes, or the paper's reverse."
    )


class PoFTParams(SFTParams):
    """Preference-oriented SFT: Bradley-Terry of the target's mean log-likelihood against aligned LLMs'."""

    poft_beta: float = Field(1.0, gt=0.0)
    poft_gamma: float = 0.0
    poft_target_tokens: Literal["response", "all"] = "response"
    aligned_models: list[str] = Field(
        default_factory=list,
        description="Aligned models that score the data before training; empty means the data carries "
        "`poft_ref_scores` (list) or `poft_ref_score` (float).",
    )
    scoring_batch_size: int = Field(8, ge=1)


# --------------------------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------------------------

Family = Literal["sft", "preference", "unlearning", "rl"]


@dataclass(frozen=True)
class MethodInfo:
    name: str
    family: Family
    summary: str
    paper: str
    recipe: str
    params: type[MethodParams]
    # Whether a frozen reference/anchor model is used: "none", or "required" (defaults to a frozen copy of `model`).
    reference: Literal["none", "required"] = "none"


METHODS: dict[str, MethodInfo] = {}


def register(info: MethodInfo) -> MethodInfo:
    if info.name in METHODS:
        raise ValueError(f"method {info.name!r} registered twice")
    METHODS[info.name] = info
    return info


register(
    MethodInfo(
        name="sft",
        family="sft",
        summary="Supervised fine-tuning: token-mean negative log-likelihood on completions.",
        paper="Ouyang et al., Training language models to follow instructions with human feedback (arXiv 2203.02155)",
        recipe="recipes/sft.yaml",
        params=SFTParams,
    )
)
register(
    MethodInfo(
        name="dft",
        family="sft",
        summary="Dynamic Fine-Tuning: each token's NLL weighted by its detached probability.",
        paper="Wu et al., On the Generalization of SFT: A Reinforcement Learning Perspective with Reward "
        "Rectification (arXiv 2508.05629)",
        recipe="recipes/dft.yaml",
        params=DFTParams,
    )
)
register(
    MethodInfo(
        name="asft_anchored",
        family="sft",
        summary="Anchored SFT: DFT plus a token-level KL anchor to the frozen initial model.",
        paper="Zhu et al., Anchored Supervised Fine-Tuning (arXiv 2509.23753)",
        recipe="recipes/asft_anchored.yaml",
        params=ASFTAnchoredParams,
        reference="required",
    )
)
register(
    MethodInfo(
        name="poft",
        family="sft",
        summary="Preference-oriented SFT: the target should out-score aligned LLMs on the SFT data (Bradley-Terry).",
        paper="Fan et al., Preference-Oriented Supervised Fine-Tuning: Favoring Target Model Over Aligned Large "
        "Language Models (arXiv 2412.12865)",
        recipe="recipes/poft.yaml",
        params=PoFTParams,
    )
)


def get_method(name: str) -> MethodInfo:
    from posttrain.errors import UserError, did_you_mean

    if name not in METHODS:
        raise UserError(f"method.name: unknown method '{name}'{did_you_mean(name, METHODS)}; see `posttrain methods`")
    return METHODS[name]
