"""Preference-optimisation losses (DPO family, WPO, SparsePO, ASFT-aligned, SimPO, ORPO, KTO) as pure functions over
tensors.

Conventions (shared with :mod:`posttrain.losses.sft`):

* per-token tensors are ``[B, T]``: ``logps[b, t]`` is the log-prob of the realised token ``t`` (already shifted, i.e.
  computed from the logits at position ``t - 1``); ``mask[b, t]`` is 1.0 on scored (completion) tokens, 0 elsewhere;
* sequence-level tensors are ``[B]`` (one value per pair for the chosen and for the rejected side);
* all loss math runs in fp32 and uses ``F.logsigmoid`` (never ``log(sigmoid(x))``);
* loss functions return PER-PAIR losses ``[B]``; the trainer takes the mean over the micro-batch (the L of docs/methods/dpo.md#objective);
* every reward / weight / metric returned here is detached.

Method pages: docs/methods/online_dpo.md, docs/methods/dpo.md, docs/methods/wpo.md, docs/methods/sparsepo.md, docs/methods/asft_aligned.md,
docs/methods/simpo.md, docs/methods/orpo.md, docs/methods/kto.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from posttrain.distributed import TokenMean

__all__ = [
    "PreferenceLossOutput",
    "sequence_logps",
    "sequence_lengths",
    "mean_logps",
    "dpo_loss",
    "preference_metrics",
    "WPOAlignment",
    "wpo_log_alignment",
    "wpo_sequence_weights",
    "wpo_pair_weights",
    "wpo_loss",
    "wpo_metrics",
    "sparsepo_token_kl",
    "SparsePOOutput",
    "sparsepo_loss",
    "sparsepo_metrics",
    "mask_sparsity",
    "mapo_activation_map",
    "mapo_mask",
    "SparsePOMaskNet",
    "ASFTOutput",
    "log_odds",
    "asft_aligned_loss",
    "asft_metrics",
    "token_mean_nll",
    "simpo_loss",
    "ORPOOutput",
    "orpo_loss",
    "KTOOutput",
    "kto_reference_point",
    "kto_loss",
    "rotate_within_batches",
    "rank_pairs",
    "online_dpo_loss",
]


# ----------------------------------------------------------------------------------------------------------------------
# Sequence reductions
# ----------------------------------------------------------------------------------------------------------------------


def sequence_logps(logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed sequence log-prob ``s = sum_t mask_t * logp_t`` in fp32, ``[B, T] -> [B]``.

    docs/methods/dpo.md#inputs: a SUM, prompt and padding contribute 0, no length normalisation. Masked positions are zeroed with
    ``torch.where`` so that non-finite garbage at padding (e.g. ``-inf``) cannot leak into the sum.
    """
    mask = mask.to(torch.bool)
    return torch.where(mask, logps.float(), torch.zeros((), dtype=torch.float32, device=logps.device)).sum(-1)


def sequence_lengths(mask: torch.Tensor) -> torch.Tensor:
    """Completion token count per row, clamped to at least 1 (fp32 ``[B]``) — the N of docs/methods/dpo.md#objective, docs/methods/wpo.md#weights."""
    return mask.to(torch.float32).sum(-1).clamp(min=1.0)


def mean_logps(logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Length-normalised sequence log-prob ``lbar = s / N`` (docs/methods/asft_aligned.md#inputs; TRL IPO normalisation)."""
    return sequence_logps(logps, mask) / sequence_lengths(mask)


# ----------------------------------------------------------------------------------------------------------------------
# DPO / cDPO / robust / IPO
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class PreferenceLossOutput:
    """Per-pair losses (``[B]``, fp32, differentiable) and detached implicit rewards (``[B]``)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


DPOLossType = Literal["sigmoid", "ipo", "robust"]


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: DPOLossType = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    ipo_length_normalize: bool = True,
) -> PreferenceLossOutput:
    """Per-pair DPO-family loss on SUMMED sequence log-probs (``[B]`` each); the trainer takes the mean over pairs.

    Implements docs/methods/dpo.md#objective with c = s_c - s_ref_c, r = s_r - s_ref_r, D = c - r:

    * ``sigmoid`` — DPO, Rafailov et al., arXiv 2305.18290, Eq. 7; with ``label_smoothing`` = eps > 0 it is cDPO
      (Mitchell, "A note on DPO with noisy preferences"): ``-(1-eps) logsig(beta D) - eps logsig(-beta D)``.
      NOTE: our ``sigmoid`` always applies ``label_smoothing`` (TRL <= 0.28 / reference code); TRL >= 0.29 ignores it,
      which is the same as passing ``label_smoothing=0``.
    * ``robust`` — Chowdhury et al., arXiv 2403.00409:
      ``[-(1-eps) logsig(beta D) + eps logsig(-beta D)] / (1 - 2 eps)``.
    * ``ipo`` — Azar et al., arXiv 2310.12036, Eq. 17, ``beta`` plays tau. Default (TRL form,
      ``ipo_length_normalize=True``): ``(c/N_c - r/N_r - 1/(2 beta))^2`` with N the completion token counts
      (``chosen_lengths`` / ``rejected_lengths``, clamped to >= 1; see :func:`sequence_lengths`). With
      ``ipo_length_normalize=False``: the eric-mitchell reference form ``(D - 1/(2 beta))^2``.

    Rewards are ``beta * c`` and ``beta * r`` (detached) for every loss type, as in TRL's metrics.
    ``ref_*`` are treated as constants (detached here).
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    chosen = chosen_logps.float() - ref_chosen_logps.detach().float()
    rejected = rejected_logps.float() - ref_rejected_logps.detach().float()
    pair_loss = _DPO_PAIR_LOSSES.get(loss_type)
    if pair_loss is None:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected 'sigmoid', 'ipo' or 'robust'")
    losses = pair_loss(chosen, rejected, beta=beta, label_smoothing=label_smoothing, chosen_lengths=chosen_lengths,
                       rejected_lengths=rejected_lengths, ipo_length_normalize=ipo_length_normalize)
    return PreferenceLossOutput(losses, (beta * chosen).detach(), (beta * rejected).detach())


def _check_smoothing(eps: float) -> None:
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {eps}")


# Each DPO ``loss_type``'s per-pair loss from the policy-minus-reference log-ratios ``c`` (chosen) and ``r`` (rejected),
# ``[B]`` fp32 each (docs/methods/dpo.md#objective; the formulas are :func:`dpo_loss`'s).


def _sigmoid_pair_losses(chosen, rejected, *, beta, label_smoothing, **unused):
    """DPO (arXiv 2305.18290, Eq. 7); cDPO with ``label_smoothing`` > 0."""
    delta = chosen - rejected
    _check_smoothing(label_smoothing)
    losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * delta)
    if label_smoothing != 0.0:
        losses = losses - label_smoothing * F.logsigmoid(-beta * delta)
    return losses


def _robust_pair_losses(chosen, rejected, *, beta, label_smoothing, **unused):
    """Robust DPO (Chowdhury et al., arXiv 2403.00409)."""
    delta = chosen - rejected
    _check_smoothing(label_smoothing)
    return (
        -(1.0 - label_smoothing) * F.logsigmoid(beta * delta) + label_smoothing * F.logsigmoid(-beta * delta)
    ) / (1.0 - 2.0 * label_smoothing)


def _ipo_pair_losses(chosen, rejected, *, beta, chosen_lengths, rejected_lengths, ipo_length_normalize, **unused):
    """IPO (Azar et al., arXiv 2310.12036, Eq. 17), on per-token mean log-ratios with ``ipo_length_normalize``."""
    if ipo_length_normalize:
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("ipo with ipo_length_normalize=True needs chosen_lengths and rejected_lengths")
        n_c = chosen_lengths.to(chosen.device, torch.float32).clamp(min=1.0)
        n_r = rejected_lengths.to(chosen.device, torch.float32).clamp(min=1.0)
        ipo_delta = chosen / n_c - rejected / n_r
    else:
        ipo_delta = chosen - rejected
    return (ipo_delta - 1.0 / (2.0 * beta)) ** 2


_DPO_PAIR_LOSSES = {"sigmoid": _sigmoid_pair_losses, "robust": _robust_pair_losses, "ipo": _ipo_pair_losses}


def preference_metrics(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
) -> dict[str, float]:
    """TRL-named reward metrics from per-pair tensors (``[B]``; gather across processes first if needed).

    docs/methods/dpo.md#metrics: ``rewards/chosen`` and ``rewards/rejected`` (means), ``rewards/margins`` (mean of the
    difference), ``rewards/accuracies`` (mean of ``chosen > rejected``, strict), ``logps/chosen`` and
    ``logps/rejected`` (mean policy sequence log-probs). Also used by SparsePO and ASFT with their own rewards/logps.
    """
    cr, rr = chosen_rewards.detach().float(), rejected_rewards.detach().float()
    return {
        "rewards/chosen": cr.mean().item(),
        "rewards/rejected": rr.mean().item(),
        "rewards/margins": (cr - rr).mean().item(),
        "rewards/accuracies": (cr > rr).float().mean().item(),
        "logps/chosen": chosen_logps.detach().float().mean().item(),
        "logps/rejected": rejected_logps.detach().float().mean().item(),
    }


# ----------------------------------------------------------------------------------------------------------------------
# WPO
# ----------------------------------------------------------------------------------------------------------------------

WPOAlignment = Literal["sampled", "greedy", "none"]


@torch.no_grad()
def wpo_log_alignment(logits: torch.Tensor, alignment: WPOAlignment = "sampled") -> torch.Tensor:
    """Per-position weight-alignment term ``log S_t`` from full-vocab logits ``[B, T, V] -> [B, T]`` (fp32, no grad).

    Zhou et al., "WPO: Enhancing RLHF with Weighted Preference Optimization", arXiv 2406.11827 (docs/methods/wpo.md#weights):

    * ``sampled`` (default; the reference code and TRL): ``log sum_v pi(v)^2 = logsumexp(2 z) - 2 logsumexp(z)``
      (TRL's fused head exposes the same quantity as ``outputs.log_sum_sq_probs``);
    * ``greedy`` (paper ablation): ``max(z) - logsumexp(z)``;
    * ``none`` (unaligned): 0.

    ``logits[b, t]`` must be the logits that predict the token scored by ``logps[b, t]``.
    """
    z = logits.float()
    if alignment == "none":
        return torch.zeros(z.shape[:-1], dtype=torch.float32, device=z.device)
    lse = torch.logsumexp(z, dim=-1)
    if alignment == "sampled":
        return torch.logsumexp(2.0 * z, dim=-1) - 2.0 * lse
    if alignment == "greedy":
        return z.amax(dim=-1) - lse
    raise ValueError(f"unknown WPO alignment {alignment!r}; expected 'sampled', 'greedy' or 'none'")


@torch.no_grad()
def wpo_sequence_weights(
    logps: torch.Tensor, mask: torch.Tensor, log_alignment: torch.Tensor | None = None
) -> torch.Tensor:
    """Sequence weight ``w = exp((1/N) sum_t mask_t (logp_t - log S_t))``, ``[B, T] -> [B]``, detached fp32.

    WPO, arXiv 2406.11827 (docs/methods/wpo.md#weights); ``N`` = completion length clamped to >= 1. ``log_alignment`` is the
    output of :func:`wpo_log_alignment` (``None`` means the unaligned form, log S = 0).
    """
    ratio = logps.float()
    if log_alignment is not None:
        ratio = ratio - log_alignment.float()
    return torch.exp(sequence_logps(ratio, mask) / sequence_lengths(mask))


@torch.no_grad()
def wpo_pair_weights(
    chosen_weights: torch.Tensor, rejected_weights: torch.Tensor, clamp_max: float | None = 1.0
) -> torch.Tensor:
    """Pair weight ``W_i = w(y_c) * w(y_r)``, then ``min(W_i, clamp_max)`` unless ``clamp_max`` is None (detached).

    WPO, arXiv 2406.11827 (docs/methods/wpo.md#weights): ``clamp_max=1.0`` (framework default ``wpo_weight_clamp_max``) matches
    the reference code and TRL <= 0.28; ``None`` is the paper's Eq. 2 and TRL >= 0.29.
    """
    weights = chosen_weights.float() * rejected_weights.float()
    return weights if clamp_max is None else weights.clamp(max=clamp_max)


def wpo_loss(losses: torch.Tensor, pair_weights: torch.Tensor) -> torch.Tensor:
    """WPO objective ``L = (1/B) sum_i sg(W_i) l_i`` (docs/methods/wpo.md#objective), a scalar.

    ``losses`` are per-pair losses of any DPO type (e.g. ``dpo_loss(...).losses``); the mean is over pairs, NOT
    normalised by ``sum W``. The weights are detached, so the gradient is ``W_i`` times each pair's DPO gradient.
    """
    return (pair_weights.detach().float() * losses.float()).mean()


def wpo_metrics(
    chosen_weights: torch.Tensor, rejected_weights: torch.Tensor, clamp_max: float | None = 1.0
) -> dict[str, float]:
    """``wpo/*`` metrics of docs/methods/wpo.md#metrics.

    Pair-weight stats are after the clamp; ``clamped_fraction`` is the share of pairs with W > clamp before it.
    """
    raw = chosen_weights.detach().float() * rejected_weights.detach().float()
    pair = wpo_pair_weights(chosen_weights, rejected_weights, clamp_max)
    clamped = torch.zeros_like(raw) if clamp_max is None else (raw > clamp_max).float()
    return {
        "wpo/pair_weight_mean": pair.mean().item(),
        "wpo/pair_weight_min": pair.min().item(),
        "wpo/pair_weight_max": pair.max().item(),
        "wpo/chosen_weight_mean": chosen_weights.detach().float().mean().item(),
        "wpo/rejected_weight_mean": rejected_weights.detach().float().mean().item(),
        "wpo/clamped_fraction": clamped.mean().item(),
    }


# ----------------------------------------------------------------------------------------------------------------------
# SparsePO
# ----------------------------------------------------------------------------------------------------------------------


def sparsepo_token_kl(policy_logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """Token KL ``KL(pi_ref || pi_theta) = sum_v pi_ref (log pi_ref - log pi_theta)``, ``[..., V] -> [...]``.

    SparsePO, Christopoulou et al., arXiv 2410.05102 (docs/methods/sparsepo.md#inputs; TDPO, arXiv 2404.11999). Both
    log-softmaxes are taken in fp32 and the KL is formed from log-probs. The reference side is detached; the policy
    side keeps its gradient (SparsePO has no stop-gradient on the KL).
    """
    logq = F.log_softmax(policy_logits.float(), dim=-1)
    logp = F.log_softmax(ref_logits.detach().float(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)


@dataclass
class SparsePOOutput:
    """Per-pair SparsePO loss pieces, all ``[B]``.

    ``losses`` (differentiable, includes the L1 terms); detached: ``chosen_rewards = beta*(U_w - D_w)``,
    ``rejected_rewards = beta*(U_l - D_l)``, ``margins`` (z), masked reward sums ``chosen_u``/``rejected_u`` (U),
    masked KL sums ``chosen_kl``/``rejected_kl`` (D), and ``l1`` (the L1 penalty actually added).
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    margins: torch.Tensor
    chosen_u: torch.Tensor
    rejected_u: torch.Tensor
    chosen_kl: torch.Tensor
    rejected_kl: torch.Tensor
    l1: torch.Tensor


def _masked_sum(values: torch.Tensor, loss_mask: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    v = values.float() if weights is None else values.float() * weights.float()
    return sequence_logps(v, loss_mask)


def _l1(mask_values: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    return sequence_logps(mask_values.float().abs(), loss_mask)


def sparsepo_loss(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    chosen_token_kl: torch.Tensor,
    rejected_token_kl: torch.Tensor,
    chosen_loss_mask: torch.Tensor,
    rejected_loss_mask: torch.Tensor,
    chosen_reward_mask: torch.Tensor | None = None,
    rejected_reward_mask: torch.Tensor | None = None,
    chosen_kl_mask: torch.Tensor | None = None,
    rejected_kl_mask: torch.Tensor | None = None,
    beta: float = 0.1,
    l1_reward: float = 0.0,
    l1_kl: float = 0.0,
    common_mask: bool = False,
) -> SparsePOOutput:
    """Per-pair SparsePO loss with token masks (docs/methods/sparsepo.md#objective). All token inputs are ``[B, T]``.

    Christopoulou et al., "SparsePO: Controlling Preference Alignment of LLMs via Sparse Token Masks",
    arXiv 2410.05102 (formulas from the reference code ``huawei-noah/HEBO/SparsePO``; builds on TDPO1,
    arXiv 2404.11999):

    * ``U(y) = sum_t lm_t m_u,t lr_t`` with ``lr_t = log pi_theta - log pi_ref`` (``*_logratios``),
    * ``D(y) = sum_t lm_t m_d,t KL_t`` with ``KL_t = KL(pi_ref || pi_theta)`` (``*_token_kl``, see
      :func:`sparsepo_token_kl`),
    * ``z = [U(y_w) - U(y_l)] - [D(y_l) - D(y_w)]``,
    * ``l = -logsig(beta z) + l1_reward (|m_u(y_w)|_1 + |m_u(y_l)|_1) + l1_kl (|m_d(y_w)|_1 + |m_d(y_l)|_1)``.

    Mask semantics: a reward (KL) mask of ``None`` means that mask is off (``mask_on_reward=False`` /
    ``mask_on_kl=False``): it is 1 everywhere and has no L1 term. ``common_mask=True`` ("common", m_d = m_u) takes the
    KL masks from the reward masks (pass ``chosen_kl_mask``/``rejected_kl_mask`` as None) and halves both L1
    coefficients, because the same mask is counted twice (reference-code behaviour). For MaPO pass the detached
    :func:`mapo_mask` as the reward masks with ``common_mask=True``. Only completion tokens (``*_loss_mask``) enter
    U, D and the L1 norms. No stop-gradient is applied to the log-ratios, the KLs or the masks.
    """
    if common_mask:
        if chosen_kl_mask is not None or rejected_kl_mask is not None:
            raise ValueError("common_mask=True takes the KL masks from the reward masks; pass kl masks as None")
        if chosen_reward_mask is None or rejected_reward_mask is None:
            raise ValueError("common_mask=True needs chosen_reward_mask and rejected_reward_mask")
        chosen_kl_mask, rejected_kl_mask = chosen_reward_mask, rejected_reward_mask
        l1_reward, l1_kl = l1_reward / 2.0, l1_kl / 2.0
    for a, b, name in ((chosen_reward_mask, rejected_reward_mask, "reward"), (chosen_kl_mask, rejected_kl_mask, "kl")):
        if (a is None) != (b is None):
            raise ValueError(f"give both chosen and rejected {name} masks, or neither")

    u_w = _masked_sum(chosen_logratios, chosen_loss_mask, chosen_reward_mask)
    u_l = _masked_sum(rejected_logratios, rejected_loss_mask, rejected_reward_mask)
    d_w = _masked_sum(chosen_token_kl, chosen_loss_mask, chosen_kl_mask)
    d_l = _masked_sum(rejected_token_kl, rejected_loss_mask, rejected_kl_mask)
    z = (u_w - u_l) - (d_l - d_w)
    l1 = torch.zeros_like(z)
    if chosen_reward_mask is not None and l1_reward != 0.0:
        l1_u = _l1(chosen_reward_mask, chosen_loss_mask) + _l1(rejected_reward_mask, rejected_loss_mask)
        l1 = l1 + l1_reward * l1_u
    if chosen_kl_mask is not None and l1_kl != 0.0:
        l1 = l1 + l1_kl * (_l1(chosen_kl_mask, chosen_loss_mask) + _l1(rejected_kl_mask, rejected_loss_mask))
    losses = -F.logsigmoid(beta * z) + l1
    return SparsePOOutput(
        losses=losses,
        chosen_rewards=(beta * (u_w - d_w)).detach(),
        rejected_rewards=(beta * (u_l - d_l)).detach(),
        margins=z.detach(),
        chosen_u=u_w.detach(),
        rejected_u=u_l.detach(),
        chosen_kl=d_w.detach(),
        rejected_kl=d_l.detach(),
        l1=l1.detach(),
    )


@torch.no_grad()
def mask_sparsity(mask_values: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Percentage (0-100) of completion tokens whose mask value is exactly 0, pooled over the batch (scalar).

    docs/methods/sparsepo.md#metrics (``Weights/*_sparsity``); prompt/padding positions never count.
    """
    lm = loss_mask.to(torch.bool)
    n = lm.sum().clamp(min=1)
    return 100.0 * ((mask_values == 0) & lm).sum().float() / n.float()


def sparsepo_metrics(
    out: SparsePOOutput,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_token_kl: torch.Tensor,
    rejected_token_kl: torch.Tensor,
    chosen_loss_mask: torch.Tensor,
    rejected_loss_mask: torch.Tensor,
    chosen_reward_mask: torch.Tensor | None = None,
    rejected_reward_mask: torch.Tensor | None = None,
    chosen_kl_mask: torch.Tensor | None = None,
    rejected_kl_mask: torch.Tensor | None = None,
) -> dict[str, float | TokenMean]:
    """SparsePO metrics (docs/methods/sparsepo.md#metrics), with our fixes: SeqKL over completion tokens only, margins as the mean
    of per-pair absolute differences. ``*_logps`` are the unweighted policy sums. For a common mask pass the same
    tensors as reward and KL masks. Masks that are off (None) get no sparsity / L1 entries. The sparsities are
    :class:`~posttrain.distributed.TokenMean` (``float()`` gives the value)."""
    metrics = preference_metrics(out.chosen_rewards, out.rejected_rewards, chosen_logps, rejected_logps)
    seq_kl_w = _masked_sum(chosen_token_kl.detach(), chosen_loss_mask)
    seq_kl_l = _masked_sum(rejected_token_kl.detach(), rejected_loss_mask)
    metrics.update(
        {
            "WgtSeqKL/chosen": out.chosen_kl.mean().item(),
            "WgtSeqKL/rejected": out.rejected_kl.mean().item(),
            "WgtSeqKL/margin": (out.chosen_kl - out.rejected_kl).abs().mean().item(),
            "SeqKL/chosen": seq_kl_w.mean().item(),
            "SeqKL/rejected": seq_kl_l.mean().item(),
            "SeqKL/margin": (seq_kl_w - seq_kl_l).abs().mean().item(),
        }
    )
    pairs = (("rw", "u", chosen_reward_mask, rejected_reward_mask), ("kl", "d", chosen_kl_mask, rejected_kl_mask))
    for short, tag, cm, rm in pairs:
        if cm is None or rm is None:
            continue
        # token shares: pooled over processes by posttrain.distributed.reduce_metrics
        for side, values, loss_mask in (("chosen", cm, chosen_loss_mask), ("rejected", rm, rejected_loss_mask)):
            tokens = loss_mask.to(torch.bool).sum().float()
            sparsity = mask_sparsity(values.detach(), loss_mask)
            metrics[f"Weights/{short}_{side}_sparsity"] = TokenMean(sparsity * tokens, tokens)
        metrics[f"Weights/{tag}_chosen_l1_norm"] = _l1(cm.detach(), chosen_loss_mask).mean().item()
        metrics[f"Weights/{tag}_rejected_l1_norm"] = _l1(rm.detach(), rejected_loss_mask).mean().item()
    return metrics


@torch.no_grad()
def mapo_activation_map(activations: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """One hooked tensor -> per-token map in [0, 1] over each sequence's completion tokens (docs/methods/sparsepo.md#reference-mask-mapo).

    MaPO mask of SparsePO, arXiv 2410.05102 (reference ``mapo_trainer.apply_activation_mapping``, ``zn_rescale``).
    ``activations`` is ``[B, T, H]`` (averaged over the last dim) or already-averaged ``[B, T]``, aligned with the
    token convention (index t = the activation at input position t-1, which predicts token t). Per row:
    ``m = (a - min) / (max - min)`` over completion tokens (== z-normalise then min-max), 0 on non-completion
    positions, and 1 on every completion token where ``max == min`` (the reference yields NaN there). fp32.
    """
    a = activations.float()
    if a.dim() == 3:
        a = a.mean(-1)
    lm = loss_mask.to(torch.bool)
    inf = torch.tensor(float("inf"), device=a.device)
    lo = torch.where(lm, a, inf).amin(-1, keepdim=True)
    hi = torch.where(lm, a, -inf).amax(-1, keepdim=True)
    span = hi - lo
    degenerate = ~(span > 0)
    scaled = (a - lo) / torch.where(degenerate, torch.ones_like(span), span)
    scaled = torch.where(degenerate, torch.ones_like(scaled), scaled)
    return torch.where(lm, scaled, torch.zeros_like(scaled))


@torch.no_grad()
def mapo_mask(
    streams: Mapping[str, Sequence[torch.Tensor]] | Sequence[Sequence[torch.Tensor]], loss_mask: torch.Tensor
) -> torch.Tensor:
    """MaPO token mask ``[B, T]`` in [0, 1], detached (docs/methods/sparsepo.md#reference-mask-mapo, steps 1-4).

    ``streams`` maps a stream name (mlp / attn / resid / logits) to its hooked tensors; each tensor goes through
    :func:`mapo_activation_map`, maps are averaged within a stream, then the stream means are averaged.
    """
    groups = list(streams.values()) if isinstance(streams, Mapping) else list(streams)
    groups = [g for g in groups if len(g) > 0]
    if not groups:
        raise ValueError("mapo_mask needs at least one non-empty stream")
    per_stream = [torch.stack([mapo_activation_map(t, loss_mask) for t in g]).mean(0) for g in groups]
    return torch.stack(per_stream).mean(0)


class SparsePOMaskNet(nn.Module):
    """Learned SparsePO token mask (``mask_model=simple_all``; docs/methods/sparsepo.md#learned-mask).

    SparsePO, arXiv 2410.05102 (reference ``src/masks/mask_models.py::SimpleMaskAllLayers``). Input: the reference
    model's per-layer hidden states (``hidden_states[1:]``, embeddings excluded), each ``[B, T, H]`` and already
    aligned so index t weights token t (i.e. the caller passes positions 0..T-2 of the unshifted states). Network: a
    shared ``LayerNorm(H, eps)``; per layer ``Linear(H, 1) -> ReLU -> Dropout``; concatenate the L values; mixer
    ``Linear(L, 1, bias=False) -> ReLU -> Dropout``. Output ``[B, T]``, >= 0, unbounded above; exact zeros from the
    ReLU are the sparsity (see :func:`mask_sparsity`). PyTorch default init. Hidden states are detached (no_grad
    reference); gradients reach this module through U, D and the L1 term of :func:`sparsepo_loss`.
    """

    def __init__(self, hidden_size: int, num_layers: int, layer_norm_eps: float = 1e-5, dropout: float = 0.01):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.layers = nn.ModuleList(nn.Linear(hidden_size, 1) for _ in range(num_layers))
        self.mixer = nn.Linear(num_layers, 1, bias=False)
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden_states: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(hidden_states) != len(self.layers):
            raise ValueError(f"expected {len(self.layers)} hidden-state tensors, got {len(hidden_states)}")
        dtype = self.norm.weight.dtype
        per_layer = [
            self.dropout(self.act(layer(self.norm(h.detach().to(dtype)))))
            for layer, h in zip(self.layers, hidden_states)
        ]
        mixed = self.mixer(torch.cat(per_layer, dim=-1))
        return self.dropout(self.act(mixed)).squeeze(-1)


# ----------------------------------------------------------------------------------------------------------------------
# ASFT (aligned)
# ----------------------------------------------------------------------------------------------------------------------


def log_odds(lbar: torch.Tensor, prob_clamp: float = 1e-7) -> torch.Tensor:
    """``odds(lbar) = lbar - log(1 - exp(lbar))`` in fp32, with ``lbar`` clamped to ``<= log1p(-prob_clamp)``.

    docs/methods/asft_aligned.md#numerics (ASFT, arXiv 2409.10571): ``log(1 - e^l)`` is computed as
    ``log(-expm1(l))``; the clamp bounds pibar at ``1 - prob_clamp`` (no gradient beyond it).
    """
    lbar = lbar.float().clamp(max=math.log1p(-prob_clamp))
    return lbar - torch.log(-torch.expm1(lbar))


@dataclass
class ASFTOutput:
    """Per-pair ASFT pieces, all ``[B]``: ``losses`` (differentiable); detached: ``nll`` (-c_sft*lbar_w), ``align``
    (lam*A), ``chosen_logsig`` (-logsig(beta*odds_w)), ``rejected_logsig`` (-logsig(-beta*odds_l)),
    ``chosen_log_odds``, ``rejected_log_odds``, ``chosen_rewards`` (beta*lbar_w), ``rejected_rewards`` (beta*lbar_l)."""

    losses: torch.Tensor
    nll: torch.Tensor
    align: torch.Tensor
    chosen_logsig: torch.Tensor
    rejected_logsig: torch.Tensor
    chosen_log_odds: torch.Tensor
    rejected_log_odds: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def asft_aligned_loss(
    chosen_mean_logps: torch.Tensor,
    rejected_mean_logps: torch.Tensor,
    beta: float = 1.0,
    lam: float = 1.0,
    sft_coef: float = 1.0,
    prob_clamp: float = 1e-7,
) -> ASFTOutput:
    """Per-pair ASFT-aligned loss ``l = -c_sft*lbar_w + lam*A`` (docs/methods/asft_aligned.md#objective); no reference model.

    Wang et al., "ASFT: Aligned Supervised Fine-Tuning through Absolute Likelihood", arXiv 2409.10571; tempered form
    from Gorbatovski et al., arXiv 2502.01237, Sec. 2.4/3.1 and turbo-alignment ``ASFTLoss``. Inputs are
    LENGTH-NORMALISED log-probs ``lbar`` (``[B]``, see :func:`mean_logps`).
    ``A = -logsig(beta*odds(lbar_w)) - logsig(-beta*odds(lbar_l))`` with :func:`log_odds`. The SFT term is the
    per-sequence mean NLL of the chosen response (then the trainer's mean over pairs). Framework defaults:
    ``beta=1``, ``asft_lambda=1``, ``sft_coef=1``, ``prob_clamp=1e-7``.
    """
    lw, ll = chosen_mean_logps.float(), rejected_mean_logps.float()
    odds_w, odds_l = log_odds(lw, prob_clamp), log_odds(ll, prob_clamp)
    chosen_logsig = -F.logsigmoid(beta * odds_w)
    rejected_logsig = -F.logsigmoid(-beta * odds_l)
    align = lam * (chosen_logsig + rejected_logsig)
    nll = -sft_coef * lw
    return ASFTOutput(
        losses=nll + align,
        nll=nll.detach(),
        align=align.detach(),
        chosen_logsig=chosen_logsig.detach(),
        rejected_logsig=rejected_logsig.detach(),
        chosen_log_odds=odds_w.detach(),
        rejected_log_odds=odds_l.detach(),
        chosen_rewards=(beta * lw).detach(),
        rejected_rewards=(beta * ll).detach(),
    )


def asft_metrics(
    out: ASFTOutput, chosen_mean_logps: torch.Tensor, rejected_mean_logps: torch.Tensor
) -> dict[str, float]:
    """docs/methods/asft_aligned.md#metrics: ``asft/*``, ``rewards/*`` (beta*lbar; accuracy = lbar_w > lbar_l), ``logps/*``
    (mean lbar) and ``log_odds/*``."""
    metrics = preference_metrics(out.chosen_rewards, out.rejected_rewards, chosen_mean_logps, rejected_mean_logps)
    # accuracy is defined on lbar (identical to the reward comparison for beta > 0, explicit for any beta)
    metrics["rewards/accuracies"] = (chosen_mean_logps.detach() > rejected_mean_logps.detach()).float().mean().item()
    metrics.update(
        {
            "asft/nll_loss": out.nll.mean().item(),
            "asft/asft_loss": out.align.mean().item(),
            "asft/chosen_logsig": out.chosen_logsig.mean().item(),
            "asft/rejected_logsig": out.rejected_logsig.mean().item(),
            "log_odds/chosen": out.chosen_log_odds.mean().item(),
            "log_odds/rejected": out.rejected_log_odds.mean().item(),
        }
    )
    return metrics


# ----------------------------------------------------------------------------------------------------------------------
# SimPO and ORPO (reference-free)
# ----------------------------------------------------------------------------------------------------------------------


def token_mean_nll(logps: torch.Tensor, mask: torch.Tensor,
                   num_items: torch.Tensor | float | None = None) -> torch.Tensor:
    """``-sum(mask * logp) / max(sum(mask), 1)`` in fp32: the token-mean NLL of a micro-batch (the HF
    ``CrossEntropyLoss`` mean that SimPO's ``sft_weight`` term and ORPO's SFT term use; docs/methods/simpo.md#objective,
    docs/methods/orpo.md#objective). ``num_items`` replaces ``sum(mask)`` as the denominator (with several processes,
    this process's share of the global token count, posttrain.distributed.process_share: the averaged gradient is
    then that of the global batch's token mean)."""
    count = mask.to(torch.float32).sum() if num_items is None else torch.as_tensor(
        num_items, dtype=torch.float32, device=logps.device)
    return -sequence_logps(logps, mask).sum() / count.clamp(min=1.0)


def simpo_loss(
    chosen_mean_logps: torch.Tensor,
    rejected_mean_logps: torch.Tensor,
    beta: float = 2.0,
    gamma_beta_ratio: float = 0.25,
) -> PreferenceLossOutput:
    """Per-pair SimPO loss ``l = -logsig(beta * (lbar_w - lbar_l - gamma_beta_ratio))`` (docs/methods/simpo.md#objective).

    Meng et al., "SimPO: Simple Preference Optimization with a Reference-Free Reward", arXiv 2405.14734, Eq. 6: the
    implicit reward is the length-normalised log-likelihood ``beta * lbar`` and the target margin is
    ``gamma = beta * gamma_beta_ratio`` (TRL's CPO ``loss_type="simpo"`` writes it ``simpo_gamma / beta``). Inputs are
    LENGTH-NORMALISED log-probs ``lbar`` (``[B]``, :func:`mean_logps`); no reference model. Rewards ``beta * lbar``
    (detached). Worked example (beta 2, ratio 0.25): ``lbar_w = [-0.5, -1.0]``, ``lbar_l = [-1.0, -0.8]`` give
    ``l = [0.474077, 1.241154]``.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    lw, ll = chosen_mean_logps.float(), rejected_mean_logps.float()
    losses = -F.logsigmoid(beta * (lw - ll - gamma_beta_ratio))
    return PreferenceLossOutput(losses, (beta * lw).detach(), (beta * ll).detach())


@dataclass
class ORPOOutput:
    """ORPO's ``loss`` (differentiable scalar) and its detached pieces: ``nll`` (the SFT term), ``odds_ratio_losses``
    ``[B]`` (``-logsig(log OR)``), ``log_odds_ratio`` ``[B]``, ``chosen_rewards`` / ``rejected_rewards``
    (``beta * lbar``, TRL's logging)."""

    loss: torch.Tensor
    nll: torch.Tensor
    odds_ratio_losses: torch.Tensor
    log_odds_ratio: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def orpo_loss(
    chosen_mean_logps: torch.Tensor,
    rejected_mean_logps: torch.Tensor,
    chosen_nll: torch.Tensor,
    beta: float = 0.1,
    prob_clamp: float = 1e-7,
) -> ORPOOutput:
    """ORPO ``L = NLL_w + beta * mean_pairs(-logsig(odds(lbar_w) - odds(lbar_l)))`` (docs/methods/orpo.md#objective).

    Hong et al., "ORPO: Monolithic Preference Optimization without Reference Model", arXiv 2403.07691, Eqs. 6-7
    (``beta`` is the paper's lambda). ``odds(lbar) = lbar - log(1 - e^lbar)`` is :func:`log_odds` (with its
    ``prob_clamp``) on LENGTH-NORMALISED log-probs ``lbar`` ``[B]``; ``chosen_nll`` is the SFT term (a scalar, e.g.
    :func:`token_mean_nll` of the chosen rows). No reference model. Worked example (beta 0.1): ``lbar_w = [-0.5, -1]``,
    ``lbar_l = [-1, -0.8]``, ``NLL = 0.7`` give log OR ``[0.974077, -0.337943]`` and ``L = 0.759831``.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    lw, ll = chosen_mean_logps.float(), rejected_mean_logps.float()
    log_or = log_odds(lw, prob_clamp) - log_odds(ll, prob_clamp)
    or_losses = -F.logsigmoid(log_or)
    loss = chosen_nll.float() + beta * or_losses.mean()
    return ORPOOutput(loss, chosen_nll.detach().float(), or_losses.detach(), log_or.detach(), (beta * lw).detach(),
                      (beta * ll).detach())


# ----------------------------------------------------------------------------------------------------------------------
# KTO (unpaired desirable / undesirable completions)
# ----------------------------------------------------------------------------------------------------------------------


def kto_reference_point(kl_logratios: torch.Tensor) -> torch.Tensor:
    """KTO's reference point ``z0 = max(0, mean_j (log pi(y'_j|x_j) - log pi_ref(y'_j|x_j)))``, detached (a 0-dim
    fp32 tensor; docs/methods/kto.md#objective).

    Ethayarajh et al., "KTO: Model Alignment as Prospect Theoretic Optimization", arXiv 2402.01306, Eq. 7: the KL term
    is estimated from mismatched pairs (each prompt with another row's completion, ``kl_logratios`` = the summed
    policy minus reference log-prob of those ``[M]`` sequences, gathered over every process first) and no gradient
    flows through it. Example: ``[0.3, -0.1, 0.4]`` gives 0.2; ``[-0.3, 0.1]`` gives 0.
    """
    return kl_logratios.detach().float().mean().clamp(min=0.0)


@dataclass
class KTOOutput:
    """KTO pieces: ``losses`` (differentiable, ``[B]`` in row order: each row's weighted loss ``lambda_y (1 -
    v(x, y))``); detached: ``chosen_losses`` / ``rejected_losses`` (unweighted, over the desirable / undesirable rows)
    and ``chosen_rewards`` / ``rejected_rewards`` (``beta * r``, TRL's ``rewards/*``)."""

    losses: torch.Tensor
    chosen_losses: torch.Tensor
    rejected_losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def kto_loss(
    logratios: torch.Tensor,
    desirable: torch.Tensor,
    reference_point: torch.Tensor | float,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> KTOOutput:
    """Per-row KTO loss (docs/methods/kto.md#objective); the trainer takes the mean over the micro-batch's rows.

    KTO, arXiv 2402.01306, Eq. 7-8: with the implicit reward ``r = log pi(y|x) - log pi_ref(y|x)`` (``logratios``,
    summed completion log-probs, ``[B]``) and the reference point ``z0`` (:func:`kto_reference_point`), a desirable
    row (``desirable`` true) has value ``v = sigma(beta (r - z0))`` and an undesirable one ``v = sigma(beta (z0 - r))``;
    the loss is ``lambda_D (1 - v)`` or ``lambda_U (1 - v)`` (``desirable_weight`` / ``undesirable_weight``). TRL's
    ``KTOTrainer`` (``loss_type="kto"``) computes the same. Worked example (beta 0.1, z0 0.2, weights 1 / 1.5):
    ``r = [1.0, -2.0, 0.5]``, desirable ``[T, F, T]`` give ``[0.480011, 0.667831, 0.492501]``.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    r = logratios.float()
    good = desirable.to(torch.bool)
    z0 = torch.as_tensor(reference_point, dtype=torch.float32, device=r.device).detach()
    value = torch.where(good, torch.sigmoid(beta * (r - z0)), torch.sigmoid(beta * (z0 - r)))
    weights = torch.where(good, torch.full_like(r, desirable_weight), torch.full_like(r, undesirable_weight))
    unweighted = 1.0 - value
    rewards = (beta * r).detach()
    return KTOOutput(weights * unweighted, unweighted[good].detach(), unweighted[~good].detach(), rewards[good],
                     rewards[~good])


def rotate_within_batches(values: list, batch_size: int, keys: list | None = None) -> list:
    """KTO's mismatched completions: each consecutive block of ``batch_size`` rows is rotated, ``(y_1, ..., y_n) ->
    (y_{n-s+1}, ..., y_n, y_1, ..., y_{n-s})``, so row ``i`` is paired with the completion of a row ``s`` places
    before it in its own micro-batch (TRL's ``KL_completion_ids``, where ``s = 1``;
    docs/methods/kto.md#the-kl-estimate). A last, shorter block is rotated on its own.

    With ``keys`` (one per row, e.g. the prompt ids) each block takes the smallest shift ``s >= 1`` that gives no row
    a completion of a row with its own key, so a prompt is never scored with its own other completion (the two rows
    of an unpaired pair sit side by side, where ``s = 1`` would match every undesirable row with its own prompt's
    desirable completion); a block where no shift does (e.g. one key only) keeps ``s = 1``. Examples:
    ``[1, ..., 7]`` in blocks of 3 -> ``[3, 1, 2, 6, 4, 5, 7]``; ``["a", "b", "c", "d"]`` with keys ``[0, 0, 1, 1]``
    in one block -> ``["c", "d", "a", "b"]`` (``s = 2``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if keys is not None and len(keys) != len(values):
        raise ValueError(f"{len(keys)} keys for {len(values)} values")
    out: list = []
    for start in range(0, len(values), batch_size):
        block = list(values[start:start + batch_size])
        n, shift = len(block), 1
        if keys is not None:
            ids = list(keys[start:start + batch_size])
            shift = next((s for s in range(1, n) if all(ids[i] != ids[i - s] for i in range(n))), 1)
        out.extend(block[n - shift:] + block[:n - shift])
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Online DPO: pairs sampled from the policy, ranked by a reward
# ----------------------------------------------------------------------------------------------------------------------


def rank_pairs(rewards: torch.Tensor, ties: Literal["skip", "first"] = "skip") -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected of each sampled pair from its rewards (docs/methods/online_dpo.md#pairs).

    ``rewards`` is ``[2P]``: the two completions of prompt ``i`` are rows ``2i`` and ``2i+1`` (GRPO's layout with two
    generations per prompt). Returns ``(first_chosen [P] bool, keep [P] bool)``: row ``2i`` is the chosen one when
    its reward is higher. A tie carries no preference: ``ties="skip"`` leaves the pair out of the loss;
    ``ties="first"`` trains on it with row ``2i`` as chosen (TRL's ``OnlineDPOTrainer``: ``first >= second``). A pair
    with an unscorable (NaN) reward is always left out. Example: ``[1, 0, 0, 0, 0, 1, nan, 1]`` gives
    first_chosen ``[T, T, F, F]`` and keep ``[T, F, T, F]`` (skip) or ``[T, T, T, F]`` (first).
    """
    if ties not in ("skip", "first"):
        raise ValueError(f"ties must be 'skip' or 'first', got {ties!r}")
    r = rewards.detach().float().view(-1, 2)
    first, second = r[:, 0], r[:, 1]
    scored = ~(torch.isnan(first) | torch.isnan(second))
    first_chosen = first >= second
    keep = scored & (first != second) if ties == "skip" else scored
    return first_chosen & scored, keep


def online_dpo_loss(pair_losses: torch.Tensor, keep: torch.Tensor, num_kept_pairs: torch.Tensor | float,
                    num_processes: int = 1) -> torch.Tensor:
    """``sum_i keep_i l_i / N * num_processes``: this micro-batch's share of the mean pair loss over the ``N`` kept
    pairs of the optimizer step's global batch (docs/methods/online_dpo.md#objective). Data-parallel training averages
    the gradients of ``num_processes`` processes, hence the factor: N processes reproduce one process on the same
    global batch, and with one process, every pair kept and one micro-batch it is the mean of ``pair_losses`` (TRL's
    ``losses.mean()``). ``N`` 0 (every pair tied) gives a zero loss that keeps the graph."""
    n = torch.as_tensor(num_kept_pairs, dtype=torch.float32, device=pair_losses.device).clamp(min=1.0)
    return (pair_losses.float() * keep.to(pair_losses.device, torch.float32)).sum() * num_processes / n
