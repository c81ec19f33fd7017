"""PACS: RLVR as supervised learning, binary cross-entropy on a group-centred log-ratio score.

Li et al., "Implicit Actor Critic Coupling via a Supervised Learning Framework for RLVR" (arXiv 2509.02522); the
method page is docs/methods/pacs.md. Per row i of a group g (the completions of one prompt):

    r_i   = beta * sum_t mask[i,t] * (logp[i,t] - old_logp[i,t])            (reward_method "ratio")
          = beta * sum_t mask[i,t] * logp[i,t] / N_i                          (reward_method "avg_logp")
    psi_i = r_i - mean_{j in g, j != i} r_j                                    (score "rloo"; "grpo", "naive" below)
    L     = (1/B) * sum_i rho_i * w_i * [softplus(psi_i) - R_i * psi_i]        (BCE with logit psi and label R)

The outcome R in [0, 1] is the label and psi the logit: the gradient is a policy gradient with per-row weight
(R - sigmoid(psi)), so the policy is its own critic. Only ``old_logp`` is detached: the gradient flows through psi into
every row of the group. On-policy (psi = 0) with unit weights it is REINFORCE with a leave-one-out baseline on
sequence-summed log-probs. Weights ("question") are sklearn's "balanced" class weights within each group. ``rho_i``
is 1 unless vLLM samples the rows: then it is the row's sequence-level importance-sampling weight pi_old / pi_vLLM
(TRL's ``sequence_mask`` / ``sequence_truncate``), a constant (docs/methods/pacs.md#vllm-importance-sampling).

Selected by ``method.loss: pacs``; it replaces the surrogate's parts (its own score, no clipping, no KL, a row mean),
and it needs each row's label and group (``RLForward.rows``, a ``RowTargets``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, NamedTuple

from pydantic import Field

from posttrain.families.rl.forward import ROWS
from posttrain.families.rl.parts import POLICY_LOSSES, PartOptions

if TYPE_CHECKING:
    import torch

    from posttrain.families.rl.forward import RLForward

STD_EPS = 1e-6  # grpo score: psi = (r - mean) / (std + 1e-6), unbiased std (the authors' code)


class PACSOptions(PartOptions):
    pacs_beta: float = Field(1.0, gt=0.0, description="pacs: scale of the log-ratio reward proxy.")
    pacs_reward_method: Literal["ratio", "avg_logp"] = Field(
        "ratio", description="pacs: r = beta * summed log-ratio to the generating policy, or beta * mean log-prob.")
    pacs_score: Literal["rloo", "grpo", "naive"] = Field(
        "rloo", description="pacs: the logit psi: r minus the other rows' mean (rloo), group-standardised, or r.")
    pacs_weight: Literal["question", "only_positive", "only_negative", "none"] = Field(
        "question", description="pacs: row weights; question = balanced class weights within each group.")


class PACSOutput(NamedTuple):
    loss: torch.Tensor  # scalar
    psi: torch.Tensor  # [B] score (logit); 0 for dropped rows
    rhat: torch.Tensor  # [B] reward proxy
    weights: torch.Tensor  # [B] class weights (0 for dropped rows)
    valid: torch.Tensor  # [B] bool: the row has a reward and its group at least 2 scored rows


def _group_sum(values: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    import torch

    return torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add(0, groups, values)


def reward_proxy(logps: torch.Tensor, old_logps: torch.Tensor | None, mask: torch.Tensor, beta: float,
                 method: str = "ratio") -> torch.Tensor:
    """``r_hat`` [B] in fp32: ``beta * sum mask * (logp - old_logp)`` (``ratio``, a sum: no length normalisation) or
    ``beta * sum mask * logp / N_i`` (``avg_logp``)."""
    import torch

    dtype = torch.promote_types(logps.dtype, torch.float32)  # at least fp32: sums over many tokens
    m = mask.to(dtype)
    if method == "ratio":
        if old_logps is None:
            raise ValueError("reward_method 'ratio' needs old_logps")
        return beta * ((logps.to(dtype) - old_logps.detach().to(dtype)) * m).sum(-1)
    if method == "avg_logp":
        return beta * (logps.to(dtype) * m).sum(-1) / m.sum(-1).clamp(min=1.0)
    raise ValueError(f"unknown reward_method {method!r}")


def pacs_score(rhat: torch.Tensor, groups: torch.Tensor, valid: torch.Tensor, score: str = "rloo") -> torch.Tensor:
    """``psi`` [B] from ``rhat`` within each group over its valid rows (invalid rows: 0). ``rloo``: minus the mean of
    the other rows; ``grpo``: (r - mean) / (unbiased std + 1e-6); ``naive``: r itself."""
    import torch

    if score == "naive":
        return torch.where(valid, rhat, torch.zeros_like(rhat))
    num_groups = int(groups.max()) + 1 if groups.numel() else 0
    v = valid.to(rhat.dtype)
    r = rhat * v
    count = _group_sum(v, groups, num_groups)[groups]
    total = _group_sum(r, groups, num_groups)[groups]
    if score == "rloo":
        psi = rhat - (total - r) / (count - 1).clamp(min=1.0)
    elif score == "grpo":
        mean = total / count.clamp(min=1.0)
        sq = _group_sum(((rhat - mean) * v) ** 2, groups, num_groups)[groups]
        std = (sq / (count - 1).clamp(min=1.0)).sqrt()
        psi = (rhat - mean) / (std + STD_EPS)
    else:
        raise ValueError(f"unknown score {score!r}")
    return torch.where(valid, psi, torch.zeros_like(psi))


def pacs_weights(rewards: torch.Tensor, groups: torch.Tensor, valid: torch.Tensor, mode: str = "question") -> torch.Tensor:
    """Constant row weights [B]. ``question``: within a group with K >= 2 distinct labels, n / (K * count(label))
    (sklearn's "balanced"), else 1; ``only_positive`` 1[R = 1]; ``only_negative`` 1[R = 0]; ``none`` 1. Invalid rows
    get 0."""
    import torch

    r = torch.nan_to_num(rewards.detach().to(torch.promote_types(rewards.dtype, torch.float32)), nan=-1.0)
    if mode == "none":
        w = torch.ones_like(r)
    elif mode == "only_positive":
        w = (r == 1).to(r.dtype)
    elif mode == "only_negative":
        w = (r == 0).to(r.dtype)
    elif mode == "question":
        w = torch.ones_like(r)
        for g in torch.unique(groups[valid]).tolist():
            rows = valid & (groups == g)
            labels, counts = torch.unique(r[rows], return_counts=True)
            if labels.numel() >= 2:
                n = float(rows.sum())
                per_label = n / (labels.numel() * counts.to(r.dtype))
                w[rows] = per_label[torch.searchsorted(labels, r[rows])]
    else:
        raise ValueError(f"unknown weight mode {mode!r}")
    return w * valid.to(r.dtype)


def row_sampling_weights(sampling_weights: torch.Tensor | None, rows: int) -> torch.Tensor | None:
    """vLLM's importance-sampling correction as one weight per row (docs/methods/pacs.md#vllm-importance-sampling):
    TRL's sequence modes give ``[B, 1]``, the row's ratio pi_old / pi_vLLM already truncated (``sequence_truncate``)
    or set to 0 outside its bounds (``sequence_mask``); returned as ``[B]``, detached. ``None`` (no correction): None.
    A per-token ratio ``[B, T]`` (``token_*`` modes) has no per-row meaning for a row loss: ValueError (the recipe
    check refuses those modes with ``method.loss: pacs``)."""
    if sampling_weights is None:
        return None
    w = sampling_weights.detach()
    if w.dim() == 2 and w.size(1) == 1:
        w = w.squeeze(1)
    if w.dim() != 1 or w.size(0) != rows:
        raise ValueError(f"pacs weights each row by a sequence-level importance-sampling ratio ([B] or [B, 1] with "
                         f"B = {rows}); got shape {tuple(sampling_weights.shape)} (a token-level "
                         "vllm_importance_sampling_mode? use sequence_mask or sequence_truncate)")
    return w


def pacs_loss(logps: torch.Tensor, old_logps: torch.Tensor | None, mask: torch.Tensor, rewards: torch.Tensor,
              groups: torch.Tensor, *, beta: float = 1.0, reward_method: str = "ratio", score: str = "rloo",
              weight: str = "question", row_weights: torch.Tensor | None = None) -> PACSOutput:
    """The PACS loss of a batch of whole groups.

    Args:
        logps, old_logps, mask: [B, T] per-token log-probs (current, with gradient; at generation, detached) and the
            completion mask.
        rewards: [B] outcome labels in [0, 1]; NaN rows are dropped from their group before psi is computed.
        groups: [B] integer group ids (rows need not be contiguous).
        row_weights: [B] importance-sampling weight of each row (vLLM's sequence-level correction,
            :func:`row_sampling_weights`), a constant factor of the row's BCE term; None: 1. A weight-0 row adds
            nothing itself but its ``rhat`` stays in its group's baseline, and B still counts it.
    The loss is ``sum_i rho_i * w_i * BCE(psi_i, R_i) / B`` with B = all rows (torch ``BCEWithLogitsLoss(weight=w)``,
    a mean over rows, not normalised by sum w); a group left with fewer than 2 scored rows adds 0.
    """
    import torch
    import torch.nn.functional as F

    groups = groups.long()
    scored = ~torch.isnan(rewards)
    num_groups = int(groups.max()) + 1 if groups.numel() else 0
    per_group = _group_sum(scored.float(), groups, num_groups)[groups]
    valid = scored & (per_group >= 2)
    rhat = reward_proxy(logps, old_logps, mask, beta, reward_method)
    psi = pacs_score(rhat, groups, valid, score)
    w = pacs_weights(rewards, groups, valid, weight)
    labels = torch.nan_to_num(rewards.to(psi.dtype), nan=0.0)
    w = w.to(psi.dtype)
    bce = F.binary_cross_entropy_with_logits(psi, labels, reduction="none")
    if row_weights is not None:
        bce = bce * row_weights.detach().to(psi.dtype)
    loss = (w * bce).sum() / max(rewards.numel(), 1)
    return PACSOutput(loss, psi, rhat, w, valid)


def check_labels(rewards: torch.Tensor) -> None:
    """PACS labels are the combined rewards; they must lie in [0, 1] (NaN: an unscored row, dropped)."""
    import torch

    from posttrain.errors import UserError

    r = rewards[~torch.isnan(rewards)]
    if r.numel() and (bool((r < 0).any()) or bool((r > 1).any())):
        raise UserError(f"method.rewards: method.loss: pacs uses the combined reward as a BCE label, which must lie "
                        f"in [0, 1]; got values in [{float(r.min()):g}, {float(r.max()):g}] (check the reward "
                        "functions and their weights)")


@POLICY_LOSSES.register("pacs", doc="docs/methods/pacs.md#loss", options_model=PACSOptions, uses_parts=False,
                        replaces="its own RLOO score, no clipping, no KL, a row mean",
                        needs=lambda opts: frozenset({ROWS}), check_labels=check_labels)
def pacs(fwd: RLForward, opts) -> tuple[torch.Tensor, dict]:
    """PACS (Li et al., arXiv 2509.02522) as ``method.loss``: :func:`pacs_loss` of a micro-batch of whole groups
    (``fwd.rows``: each row's label and group; ``pacs_beta``, ``pacs_reward_method``, ``pacs_score``,
    ``pacs_weight``) and its metrics, row means over the valid rows (pooled over processes by
    :func:`posttrain.distributed.reduce_metrics`): ``pacs/loss``, ``pacs/psi_mean``, ``pacs/pred_acc`` (share of rows
    whose sign of psi predicts the label), ``pacs/rhat_abs_mean``, ``pacs/weight_mean``, and ``policy_loss``. With
    vLLM's importance-sampling correction (``fwd.sampling_weights``, sequence modes) each row's term is weighted by
    its ratio (:func:`row_sampling_weights`) and ``pacs/is_weight_mean`` logs the mean weight over the valid rows."""
    from posttrain.distributed import TokenMean

    labels = fwd.rows.labels
    rho = row_sampling_weights(fwd.sampling_weights, labels.numel())
    out = pacs_loss(fwd.logps, fwd.old_logps, fwd.mask, labels, fwd.rows.groups, beta=opts.pacs_beta,
                    reward_method=opts.pacs_reward_method, score=opts.pacs_score, weight=opts.pacs_weight,
                    row_weights=rho)
    valid = out.valid
    predicted = ((out.psi.detach() > 0).float() == (labels > 0.5).float()).float()
    metrics = {
        "pacs/loss": out.loss.detach(),
        "pacs/psi_mean": TokenMean.of(out.psi, valid),
        "pacs/pred_acc": TokenMean.of(predicted, valid),
        "pacs/rhat_abs_mean": TokenMean.of(out.rhat.abs(), valid),
        "pacs/weight_mean": TokenMean.of(out.weights, valid),
        "policy_loss": out.loss.detach(),
    }
    if rho is not None:
        metrics["pacs/is_weight_mean"] = TokenMean.of(rho, valid)
    return out.loss, metrics
