"""SFT-family losses as pure functions over per-token log-probs and masks.

Conventions: ``logps`` is ``[B, T]`` (log-prob of each realised next token), ``mask`` is ``[B, T]`` with 1 on scored
(completion) tokens. Token-mean losses divide by ``num_items`` when given (TRL/HF ``num_items_in_batch``: the label
tokens of the whole accumulated optimizer step), else by the micro-batch label count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F


def _denominator(mask: torch.Tensor, num_items: int | torch.Tensor | None) -> torch.Tensor:
    n = mask.sum() if num_items is None else torch.as_tensor(num_items, device=mask.device)
    return n.to(torch.float32).clamp(min=1)


def nll_loss(logps: torch.Tensor, mask: torch.Tensor, num_items: int | torch.Tensor | None = None) -> torch.Tensor:
    """Token-mean negative log-likelihood (plain SFT)."""
    mask = mask.to(torch.float32)
    return -(logps.float() * mask).sum() / _denominator(mask, num_items)


def dft_token_loss(logps: torch.Tensor) -> torch.Tensor:
    """Dynamic Fine-Tuning per-token loss ``-sg(p_t) * log p_t``.

    Wu et al., "On the Generalization of SFT: A Reinforcement Learning Perspective with Reward Rectification",
    arXiv 2508.05629 (docs/methods/dft.md#objective). The gradient w.r.t. ``log p_t`` is ``-p_t`` (CE gives -1).
    """
    logps = logps.float()
    return -logps.detach().exp() * logps


def dft_loss(logps: torch.Tensor, mask: torch.Tensor, num_items: int | torch.Tensor | None = None) -> torch.Tensor:
    """DFT loss: token-mean of :func:`dft_token_loss` over the label tokens (TRL ``loss_type="dft"`` reduction)."""
    mask = mask.to(torch.float32)
    return (dft_token_loss(logps) * mask).sum() / _denominator(mask, num_items)


KLDirection = Literal["base_to_policy", "policy_to_base"]


def token_kl(
    policy_logits: torch.Tensor, base_logits: torch.Tensor, direction: KLDirection = "base_to_policy"
) -> torch.Tensor:
    """Per-position KL between the next-token distributions, from full-vocab logits ``[..., V]``.

    ``base_to_policy`` is KL(pi_base || pi_theta) = sum_v pi_base (log pi_base - log pi_theta), what the ASFT
    reference code and LlamaFactory compute; ``policy_to_base`` is KL(pi_theta || pi_base), the paper's Eq. 6 wording
    (docs/methods/asft_anchored.md#kl-direction). Both log-softmaxes are taken in fp32.
    """
    logq = F.log_softmax(policy_logits.float(), dim=-1)
    logb = F.log_softmax(base_logits.float(), dim=-1)
    if direction == "base_to_policy":
        return (logb.exp() * (logb - logq)).sum(-1)
    if direction == "policy_to_base":
        return (logq.exp() * (logq - logb)).sum(-1)
    raise ValueError(f"unknown KL direction {direction!r}")


def asft_anchored_loss(
    logps: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float = 0.05,
    num_items: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Anchored SFT: ``sum_t M_t (-sg(p_t) log p_t + lambda KL_t) / N``.

    Zhu et al., "Anchored Supervised Fine-Tuning", arXiv 2509.23753, Eq. 5-6 (docs/methods/asft_anchored.md#objective). ``kl`` is the per-token KL (same shape as ``logps``, e.g. from :func:`token_kl`); the DFT and KL terms
    share one denominator. ``kl_coef = 0`` gives DFT exactly.
    """
    mask = mask.to(torch.float32)
    per_token = dft_token_loss(logps) + kl_coef * kl.float()
    return (per_token * mask).sum() / _denominator(mask, num_items)


def sequence_mean_logps(logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Length-normalised sequence log-likelihood ``(1/T) sum_t logp_t`` per row (rows with no token give 0)."""
    mask = mask.to(torch.float32)
    return (logps.float() * mask).sum(-1) / mask.sum(-1).clamp(min=1)


@dataclass
class PoFTOutput:
    loss: torch.Tensor  # scalar: mean over examples
    losses: torch.Tensor  # [B]
    reward_target: torch.Tensor  # [B] r_theta
    reward_aligned: torch.Tensor  # [B] rbar
    tau: torch.Tensor  # [B] per-sample gradient weight, detached


def poft_loss(
    logps: torch.Tensor,
    mask: torch.Tensor,
    aligned_scores: torch.Tensor,
    beta: float = 1.0,
    gamma: float = 0.0,
) -> PoFTOutput:
    """Preference-oriented SFT (Bradley-Terry of the target against aligned LLMs).

    Fan et al., "Preference-Oriented Supervised Fine-Tuning: Favoring Target Model Over Aligned Large Language
    Models", AAAI 2025, arXiv 2412.12865, Eq. 5-8 (docs/methods/poft.md#objective). Per example
    ``l = -logsigmoid(beta (r_theta - rbar) + gamma)`` with ``r_theta`` the target's mean per-token log-prob of the
    response and ``rbar`` the mean over aligned LLMs of theirs (a constant). ``aligned_scores`` is ``[B]`` (already
    averaged) or ``[B, M]`` (one column per aligned LLM, averaged here).
    """
    rbar = aligned_scores.float()
    if rbar.dim() == 2:
        rbar = rbar.mean(-1)
    rbar = rbar.detach()
    r_theta = sequence_mean_logps(logps, mask)
    z = beta * (r_theta - rbar) + gamma
    losses = -F.logsigmoid(z)
    tau = beta * torch.sigmoid(-z).detach()
    return PoFTOutput(loss=losses.mean(), losses=losses, reward_target=r_theta, reward_aligned=rbar, tau=tau)
