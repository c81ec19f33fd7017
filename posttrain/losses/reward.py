"""Reward-model training: the Bradley-Terry loss on preference pairs and pairwise accuracy, as pure functions.

Scores are one scalar per sequence (a sequence-classification head read at the last token), ``[B]`` for the chosen
and ``[B]`` for the rejected sequences of ``B`` pairs. Method page: docs/methods/reward.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["BradleyTerryOutput", "bradley_terry_loss", "pairwise_accuracy", "reward_metrics"]


@dataclass
class BradleyTerryOutput:
    """``loss`` (differentiable scalar) and its detached pieces: ``losses`` ``[B]`` (``-logsig(s_c - s_r - m)``),
    ``margins`` ``[B]`` (``s_c - s_r``) and ``center`` (the centering term before its coefficient)."""

    loss: torch.Tensor
    losses: torch.Tensor
    margins: torch.Tensor
    center: torch.Tensor


def bradley_terry_loss(
    chosen_scores: torch.Tensor,
    rejected_scores: torch.Tensor,
    margins: torch.Tensor | None = None,
    center_coef: float = 0.0,
) -> BradleyTerryOutput:
    """``L = mean_i -logsig(s_c,i - s_r,i - m_i) + center_coef * mean_i (s_c,i + s_r,i)^2`` (docs/methods/reward.md#objective).

    Bradley-Terry pairwise loss of a reward model (Ouyang et al. 2022, arXiv 2203.02155, Eq. 1; Stiennon et al. 2020,
    arXiv 2009.01325): the probability that the chosen response wins is ``sigma(s_c - s_r)``. ``margins`` (one per
    pair, e.g. how much better the chosen one is rated) asks the score gap to exceed ``m`` (Llama 2, Touvron et al.
    2023, arXiv 2307.09288, Eq. 2). ``center_coef`` > 0 pulls the scores towards zero mean (Eisenstein et al. 2023,
    arXiv 2312.09244). TRL's ``RewardTrainer`` computes the same (``margin`` column, ``center_rewards_coefficient``).
    Worked example: ``s_c = [1.0, 0.2]``, ``s_r = [0.0, 0.5]``, ``m = [0.5, 0.0]``, coef 0.01 give losses
    ``[0.474077, 0.854355]`` and ``L = 0.664216 + 0.01 * 0.745 = 0.671666``.
    """
    c, r = chosen_scores.float(), rejected_scores.float()
    diff = c - r
    losses = -F.logsigmoid(diff if margins is None else diff - margins.float())
    center = ((c + r) ** 2).mean()
    loss = losses.mean() + (center_coef * center if center_coef else 0.0)
    return BradleyTerryOutput(loss, losses.detach(), diff.detach(), center.detach())


def pairwise_accuracy(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> float:
    """Share of pairs whose chosen response scores strictly higher (ties count as wrong), a float in [0, 1]."""
    if chosen_scores.numel() == 0:
        return float("nan")
    return (chosen_scores.float() > rejected_scores.float()).float().mean().item()


def reward_metrics(scores: torch.Tensor, chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> dict[str, float]:
    """TRL's reward-trainer metrics from gathered scores: ``min_reward``, ``mean_reward``, ``max_reward`` (over every
    sequence), ``accuracy`` (:func:`pairwise_accuracy`) and ``margin`` (mean ``s_c - s_r``)."""
    s = scores.detach().float()
    return {"min_reward": s.min().item(), "mean_reward": s.mean().item(), "max_reward": s.max().item(),
            "accuracy": pairwise_accuracy(chosen_scores, rejected_scores),
            "margin": (chosen_scores.float() - rejected_scores.float()).mean().item()}
