"""Unlearning losses (GA, GradDiff, NPO and its RT/KL variants, SimNPO, RMU) as pure functions over tensors.

Conventions (the same as :mod:`posttrain.losses.sft` and :mod:`posttrain.losses.preference`; no import from either):

* per-token tensors are ``[B, T]``: ``logps[b, t]`` is the log-prob of the realised (already shifted) token ``t``;
  ``mask[b, t]`` is 1.0 on answer (labelled) tokens, 0 on the question and on padding;
* sequence-level tensors are ``[B]``; the sequence log-prob ``s(x, y)`` is a SUM over the answer tokens, in fp32;
* per-item losses are ``[B]``; the objective takes the mean over the micro-batch (the ``L`` of docs/methods/npo.md#objectives);
* softplus / logsigmoid only, never ``log(1 + exp(.))``; every weight and metric returned is detached;
* reference-model quantities are detached here as well (stop-gradient on pi_ref only).

Method pages: docs/methods/npo.md, ga.md, grad_diff.md, simnpo.md, rmu.md. Papers: Zhang et al., "Negative Preference Optimization: From Catastrophic Collapse
to Effective Unlearning", arXiv 2404.05868 (NPO, GA, GradDiff, the RT/KL retain terms); Fan et al., "Simplicity
Prevails: Rethinking Negative Preference Optimization for LLM Unlearning", arXiv 2410.07163 (SimNPO); Li et al., "The
WMDP Benchmark: Measuring and Reducing Malicious Use With Unlearning", arXiv 2403.03218 (RMU, on hidden states).

Naming follows open-unlearning: ``L = gamma * L_forget + alpha * L_retain`` (the NPO reference calls these
``npo_coeff`` and ``grad_diff_coeff`` / ``KL_coeff``); the terms and their combination are registered in
:mod:`posttrain.families.unlearning.objective`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from posttrain.distributed import TokenMean

__all__ = [
    "NPOOutput",
    "SimNPOOutput",
    "UnlearningOutput",
    "sequence_logps",
    "sequence_lengths",
    "nll_loss",
    "retain_nll_loss",
    "ga_loss",
    "npo_loss",
    "npo_loss_at_reference",
    "simnpo_loss",
    "retain_kl_loss",
    "rmu_control_vector",
    "rmu_activation_loss",
    "rmu_loss",
]

# ----------------------------------------------------------------------------------------------------------------------
# Sequence reductions
# ----------------------------------------------------------------------------------------------------------------------


def sequence_logps(logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed sequence log-prob ``s(x, y) = sum_t mask_t * logp_t`` in fp32, ``[B, T] -> [B]`` (docs/methods/npo.md#inputs).

    Masked positions are zeroed with ``torch.where``, so non-finite values at padding cannot leak into the sum.
    """
    keep = mask.to(torch.bool)
    return torch.where(keep, logps.float(), torch.zeros((), dtype=torch.float32, device=logps.device)).sum(-1)


def nll_loss(logps: torch.Tensor, mask: torch.Tensor, num_items: int | torch.Tensor | None = None) -> torch.Tensor:
    """Token-mean NLL ``-sum(mask * logp) / n`` in fp32 (HF ``outputs.loss``), scalar; ``n`` = ``num_items`` when given
    (HF ``num_items_in_batch``), else the micro-batch label count (clamped to >= 1). Padding is zeroed with
    ``torch.where`` (non-finite padding values cannot leak)."""
    n = mask.to(torch.float32).sum() if num_items is None else torch.as_tensor(num_items, device=logps.device)
    return -sequence_logps(logps, mask).sum() / n.to(torch.float32).clamp(min=1.0)


def sequence_lengths(mask: torch.Tensor) -> torch.Tensor:
    """Number of labelled tokens per row ``|y_i|`` (fp32 ``[B]``, clamped to at least 1)."""
    return mask.to(torch.float32).sum(-1).clamp(min=1.0)


# ----------------------------------------------------------------------------------------------------------------------
# Token-level losses: GA and the retain NLL
# ----------------------------------------------------------------------------------------------------------------------


def retain_nll_loss(
    logps: torch.Tensor, mask: torch.Tensor, num_items: int | torch.Tensor | None = None
) -> torch.Tensor:
    """Retain (RT / GradDiff) term: the HF ``outputs.loss`` on the retain batch, i.e. the mean CE over all labelled
    tokens of the micro-batch (docs/methods/grad_diff.md#objective; arXiv 2404.05868 Sec. 3, "NPO+RT"). Scalar.

    ``num_items`` replaces the micro-batch label count as the denominator (HF ``num_items_in_batch``). Descent on it
    pulls the retain likelihood up.
    """
    return nll_loss(logps, mask, num_items)


def ga_loss(
    logps: torch.Tensor,
    mask: torch.Tensor,
    num_items: int | torch.Tensor | None = None,
    reduction: Literal["token", "sequence"] = "token",
) -> torch.Tensor:
    """Gradient-ascent forget loss ``L_GA = -NLL`` (docs/methods/ga.md#objective; arXiv 2404.05868 Sec. 2). Scalar.

    ``reduction="token"`` (default, both code bases): minus the HF mean token CE over the micro-batch's labelled forget
    tokens, i.e. the token-mean log-prob. ``reduction="sequence"`` is the paper's form: the mean over rows of the
    summed sequence log-prob ``s(x, y)`` (``num_items`` is ignored there).

    Worked example (docs/methods/ga.md#how-it-is-tested): rows ``[-1, -2]`` and ``[-0.5]`` give -1.166667 (token) or -1.75 (sequence). Unbounded
    below, with a constant gradient: descent drives the forget likelihood to 0 (catastrophic collapse).
    """
    if reduction == "token":
        return -nll_loss(logps, mask, num_items)
    if reduction == "sequence":
        return sequence_logps(logps, mask).mean()
    raise ValueError(f"reduction must be 'token' or 'sequence', got {reduction!r}")


# ----------------------------------------------------------------------------------------------------------------------
# NPO
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class NPOOutput:
    """Per-item NPO results, all ``[B]``: ``losses`` (differentiable), ``log_ratios`` D_i and ``weights`` W_i
    (detached)."""

    losses: torch.Tensor
    log_ratios: torch.Tensor
    weights: torch.Tensor


def _as_sequence(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``[B]`` passes through (fp32); ``[B, T]`` per-token log-probs are summed over ``mask``."""
    if x.dim() == 1:
        return x.float()
    if mask is None:
        raise ValueError("per-token [B, T] log-probs need a mask")
    return sequence_logps(x, mask)


def npo_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    beta: float = 0.1,
    mask: torch.Tensor | None = None,
) -> NPOOutput:
    """Per-item NPO loss ``l_i = (2/beta) * softplus(beta * D_i)``, ``D_i = s_theta - s_ref`` (docs/methods/npo.md#objectives;
    arXiv 2404.05868 Eq. 3). ``L_NPO`` is the mean of ``losses``.

    Inputs are either sequence log-probs ``[B]`` (sums over the answer tokens) or per-token ``[B, T]`` log-probs with
    ``mask`` (summed here, in fp32). The reference side is detached (stop-gradient on pi_ref).

    The gradient is ``dl_i/ds_theta = W_i = 2 * sigmoid(beta * D_i)`` in (0, 2): at theta = theta_ref ``W = 1`` and
    NPO's gradient equals the sequence-level GA gradient; as beta -> 0, ``l_i - (2/beta) log 2 -> D_i`` and ``W_i -> 1``
    (NPO -> GA); as ``D -> -inf``, ``l -> 0+`` and ``W -> 0`` (bounded, vanishing forget gradient).
    Worked example (beta 0.1): ``s_theta = [-10, -20]``, ``s_ref = [-8, -20]`` give ``l = [11.962777, 13.862944]``.
    """
    if beta <= 0:
        raise ValueError(f"NPO beta must be > 0, got {beta}")
    s_theta = _as_sequence(policy_logps, mask)
    s_ref = _as_sequence(ref_logps, mask).detach()
    log_ratios = s_theta - s_ref
    losses = (2.0 / beta) * F.softplus(beta * log_ratios)
    weights = (2.0 * torch.sigmoid(beta * log_ratios)).detach()
    return NPOOutput(losses=losses, log_ratios=log_ratios.detach(), weights=weights)


# ----------------------------------------------------------------------------------------------------------------------
# SimNPO
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class SimNPOOutput:
    """Per-item SimNPO results, all ``[B]``: ``losses`` (differentiable), ``avg_nll`` = NLL_i/|y_i| and ``weights``
    ``2 * sigmoid(-beta * (avg_nll - delta))`` (detached; the factor multiplying the gradient of the mean log-prob)."""

    losses: torch.Tensor
    avg_nll: torch.Tensor
    weights: torch.Tensor


def simnpo_loss(logps: torch.Tensor, mask: torch.Tensor, beta: float = 4.5, delta: float = 0.0) -> SimNPOOutput:
    """Per-item SimNPO loss ``l_i = -(2/beta) * logsigmoid(beta * (NLL_i/|y_i| - delta))`` (docs/methods/simnpo.md#objective;
    arXiv 2410.07163 Eq. 4, whose margin gamma equals ``beta * delta``). Reference-free and length-normalised.

    ``NLL_i`` is the summed answer CE and ``|y_i|`` the number of labelled tokens (clamped to >= 1).
    ``dl_i/d(avg logp_i) = 2 * sigmoid(-beta * (avg_nll_i - delta))`` = ``weights``; at delta = 0 that is
    ``2 * sigmoid(-beta * avgNLL)``. Worked example (beta 4.5, delta 0): avg NLL ``[0.2, 0.5]`` give
    ``l = [0.151624, 0.044536]``.
    """
    if beta <= 0:
        raise ValueError(f"SimNPO beta must be > 0, got {beta}")
    avg_nll = -sequence_logps(logps, mask) / sequence_lengths(mask)
    z = beta * (avg_nll - delta)
    losses = -(2.0 / beta) * F.logsigmoid(z)
    weights = (2.0 * torch.sigmoid(-z)).detach()
    return SimNPOOutput(losses=losses, avg_nll=avg_nll.detach(), weights=weights)


# ----------------------------------------------------------------------------------------------------------------------
# KL retain term
# ----------------------------------------------------------------------------------------------------------------------


def retain_kl_loss(
    policy_logits: torch.Tensor, ref_logits: torch.Tensor, mask: torch.Tensor | None = None,
    num_items: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """KL retain term: ``mean over scored positions of KL(pi_ref || pi_theta)`` over the full vocabulary. Scalar.

    docs/methods/npo.md#retain-terms / open-unlearning ``compute_kl_divergence``: ``F.kl_div(log_softmax(policy),
    log_softmax(ref), reduction="batchmean", log_target=True)`` on flattened rows, i.e. the KL summed over positions
    and divided by their number. arXiv 2404.05868 Sec. 3 ("NPO+KL").

    Logits are ``[N, V]`` (the scored positions already selected) or ``[B, T, V]``. With ``[B, T, V]`` and
    ``mask=None`` every one of the B*T positions counts (open-unlearning, ``retain_kl_mask: none``: prompt and padding
    included); with a ``[B, T]`` mask only the masked positions count (our ``completion`` default: answer tokens only).
    The reference logits are detached. Zero, with zero gradient, at theta = theta_ref. ``num_items`` replaces the
    number of scored positions as the denominator (as for :func:`retain_nll_loss`).
    Worked example: ``p_ref = [.5,.3,.2], [.6,.2,.2]``, ``p_theta = [.4,.4,.2], [.6,.3,.1]`` give 0.041402.
    """
    if policy_logits.shape != ref_logits.shape:
        raise ValueError(f"logit shapes differ: {tuple(policy_logits.shape)} vs {tuple(ref_logits.shape)}")
    vocab = policy_logits.shape[-1]
    if policy_logits.dim() == 3 and mask is not None:
        keep = mask.to(torch.bool)
        policy_logits, ref_logits = policy_logits[keep], ref_logits[keep]
    elif mask is not None:
        raise ValueError("mask is only accepted with [B, T, V] logits")
    policy_lp = F.log_softmax(policy_logits.float().reshape(-1, vocab), dim=-1)
    ref_lp = F.log_softmax(ref_logits.detach().float().reshape(-1, vocab), dim=-1)
    if policy_lp.shape[0] == 0:
        return policy_lp.sum() * 0.0
    if num_items is not None:
        denominator = torch.as_tensor(num_items, dtype=torch.float32, device=policy_lp.device).clamp(min=1)
        return F.kl_div(policy_lp, ref_lp, reduction="sum", log_target=True) / denominator
    return F.kl_div(policy_lp, ref_lp, reduction="batchmean", log_target=True)


def retain_token_kl_loss(token_kl: torch.Tensor, mask: torch.Tensor | None = None,
                         num_items: int | torch.Tensor | None = None) -> torch.Tensor:
    """The KL retain term of :func:`retain_kl_loss` from the KL per position, ``token_kl[b, t] = KL(pi_ref ||
    pi_theta)`` at that position (the log-prob engine's tiled KL, no ``[B, T, V]`` tensor): its sum over the
    ``mask`` positions (None: all) divided by their number, or by ``num_items``. arXiv 2404.05868 Sec. 3
    ("NPO+KL"). Worked example: per-position KLs ``[0.02, 0.06, 0.1]`` with the last masked out give 0.04 (0.02 with
    ``num_items=4``); :func:`retain_kl_loss`'s example has per-position KLs 0.025267 and 0.057536."""
    values = token_kl.float() if mask is None else token_kl.float()[mask.to(torch.bool)]
    if values.numel() == 0:
        return token_kl.sum() * 0.0
    count = values.numel() if num_items is None else num_items
    denominator = torch.as_tensor(count, dtype=torch.float32, device=values.device).clamp(min=1)
    return values.sum() / denominator


# ----------------------------------------------------------------------------------------------------------------------
# Objective output
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class UnlearningOutput:
    """Result of an unlearning objective (:func:`posttrain.families.unlearning.objective.unlearning_objective`,
    :func:`rmu_loss`).

    ``loss`` = ``gamma * forget_loss + alpha * retain_loss`` (differentiable scalar); ``forget_loss`` is the
    gamma-free ``L_forget`` and ``retain_loss`` the alpha-free ``L_retain`` (``None`` when the method has no retain
    term or alpha is 0); ``metrics`` holds detached floats under the names of docs/methods/npo.md#metrics.
    """

    loss: torch.Tensor
    forget_loss: torch.Tensor
    retain_loss: torch.Tensor | None
    metrics: dict[str, float] = field(default_factory=dict)


def npo_loss_at_reference(beta: float) -> float:
    """``(2/beta) * log 2``, the per-item NPO loss when ``D_i = 0`` (worked example of docs/methods/npo.md#how-it-is-tested: 13.862944 at beta 0.1)."""
    return 2.0 / beta * math.log(2.0)



# ----------------------------------------------------------------------------------------------------------------------
# RMU: representation misdirection (on hidden states, not log-probs)
# ----------------------------------------------------------------------------------------------------------------------


def rmu_control_vector(hidden_size: int, steering_coeff: float, seed: int = 0) -> torch.Tensor:
    """RMU's fixed target ``c * u``, ``u = v / ||v||`` with ``v ~ U[0, 1)^d`` (``torch.rand``, as the WMDP and
    open-unlearning code draw it), fp32 ``[d]`` (docs/methods/rmu.md#objective; arXiv 2403.03218). Drawn
    from its own generator seeded with ``seed``, so every process and every resumed run gets the same vector."""
    if steering_coeff <= 0:
        raise ValueError(f"steering_coeff must be > 0, got {steering_coeff}")
    v = torch.rand(hidden_size, generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float32)
    return steering_coeff * v / v.norm()


def rmu_activation_loss(activations: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``mean_rows( sum_t mask_t * mean_d (h_t - target_t)^2 / sum_t mask_t )`` in fp32, a scalar
    (docs/methods/rmu.md#objective; open-unlearning's ``compute_activation_loss``).

    ``activations`` ``[B, T, d]``; ``target`` broadcasts to it (the control vector ``[d]``, or the frozen model's
    activations ``[B, T, d]``, detached here); ``mask`` ``[B, T]`` marks the positions that count (the answer tokens,
    unshifted: the hidden state AT each answer token). Rows without a masked position contribute 0.
    Worked example: ``h = [[[1, 2], [3, 4]]]``, target ``[0, 2]``, mask ``[[1, 1]]`` give ``(0.5 + 6.5) / 2 = 3.5``.
    """
    sq = (activations.float() - target.detach().float()).pow(2).mean(-1)
    m = mask.to(torch.float32)
    return ((sq * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()


def rmu_loss(
    forget_activations: torch.Tensor,
    forget_mask: torch.Tensor,
    control_vector: torch.Tensor,
    retain_activations: torch.Tensor | None = None,
    retain_ref_activations: torch.Tensor | None = None,
    retain_mask: torch.Tensor | None = None,
    gamma: float = 1.0,
    alpha: float = 1.0,
) -> UnlearningOutput:
    """RMU ``L = gamma * L_forget + alpha * L_retain`` on the hidden states of one decoder layer.

    Li et al., "The WMDP Benchmark", arXiv 2403.03218, the RMU section (docs/methods/rmu.md#objective), in
    open-unlearning's form: ``L_forget`` = :func:`rmu_activation_loss` of the policy's forget activations against the
    control vector (:func:`rmu_control_vector`); ``L_retain`` = the same loss of the policy's retain activations
    against the frozen model's (``retain_ref_activations``, detached). Without retain inputs (or ``alpha == 0``) there
    is no retain term. Metrics: ``forget_loss``, ``retain_loss``, ``rmu/forget_activation_norm`` (mean L2 norm of the
    masked forget activations, to compare with ``||c u|| = steering_coeff``).
    """
    control = control_vector.to(forget_activations.device)
    forget_loss = rmu_activation_loss(forget_activations, control, forget_mask)
    loss = gamma * forget_loss
    metrics: dict[str, float | TokenMean] = {"forget_loss": float(forget_loss.detach())}
    # a token mean: pooled over processes by posttrain.distributed.reduce_metrics (float() gives this process's value)
    metrics["rmu/forget_activation_norm"] = TokenMean.of(forget_activations.detach().float().norm(dim=-1), forget_mask)
    retain_loss = None
    if alpha != 0 and retain_activations is not None:
        if retain_ref_activations is None or retain_mask is None:
            raise ValueError("the RMU retain term needs retain_ref_activations and retain_mask")
        retain_loss = rmu_activation_loss(retain_activations, retain_ref_activations, retain_mask)
        loss = loss + alpha * retain_loss
        metrics["retain_loss"] = float(retain_loss.detach())
    metrics["loss"] = float(loss.detach())
    return UnlearningOutput(loss=loss, forget_loss=forget_loss, retain_loss=retain_loss, metrics=metrics)
