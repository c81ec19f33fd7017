"""Loss aggregation for RLVR: how per-token losses ``[B, T]`` become one scalar.

``per_token_loss`` and ``mask`` are ``[B, T]``; ``mask`` is 1.0 on completion tokens that enter the loss (after
tool masking, truncation masking and PSR/NSR row dropping). Every function returns the micro-batch loss *before*
gradient-accumulation scaling, except where stated: TRL divides ``grpo`` / ``bnpo`` / ``dr_grpo`` / ``delta_l`` by
the number of accumulation steps, but not ``dapo`` (whose normaliser already spans the accumulated batch).
docs/methods/grpo_aggregation.md#aggregations, docs/methods/grpo_aggregation.md#delta-l-normalisation

Dropped rows (PSR / NSR / W-REINFORCE, docs/methods/grpo_advantages.md#psr-nsr-and-w-reinforce: "removed from the update batch
entirely") have an all-zero mask, so they add nothing to a token count; the row-based normalisers of ``grpo``,
``dr_grpo`` and ``delta_l`` must not count them either. Pass ``num_rows``, the number of kept rows of the optimizer
step's global accumulated batch (like ``dapo``'s ``num_items_in_batch``), and ``num_processes``: the row count is
then ``num_rows / num_processes`` per process and the result is the micro-batch's share of the full-batch loss,
*not* to be divided by the accumulation steps. Rows that are kept but fully masked (truncated completions) still
count, as in TRL.

* :func:`grpo` -- per-sequence token mean, then mean over rows (DeepSeekMath, arXiv 2402.03300).
* :func:`bnpo` -- token mean over the local micro-batch.
* :func:`dr_grpo` -- constant normaliser ``B_mb * max_completion_length`` (Dr. GRPO, arXiv 2503.20783).
* :func:`dapo` -- token mean over the global accumulated batch (DAPO, arXiv 2503.14476).
* :func:`delta_l` -- ΔL Normalization (arXiv 2509.07558): row weights ``∝ L_i^-alpha`` with the Dr. GRPO normaliser.
* :func:`aggregate_loss` -- name-based dispatcher.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from posttrain.rl.parts import AGGREGATIONS

__all__ = [
    "AGGREGATIONS",
    "LOSS_AGGREGATIONS",
    "aggregate_loss",
    "bnpo",
    "dapo",
    "delta_l",
    "delta_l_weights",
    "dr_grpo",
    "grpo",
]


def _row_normalizer(per_token_loss: torch.Tensor, num_rows, num_processes: int) -> torch.Tensor | float:
    """``B``: the micro-batch's rows, or ``max(num_rows, 1) / num_processes`` (see the module docstring)."""
    if num_rows is None:
        return float(per_token_loss.size(0))
    rows = torch.as_tensor(num_rows, dtype=per_token_loss.dtype, device=per_token_loss.device)
    return rows.clamp(min=1.0) / num_processes


def grpo(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    num_rows: torch.Tensor | float | None = None,
    num_processes: int = 1,
) -> torch.Tensor:
    """``(1/B) sum_i (sum_t mask*l) / max(N_i, 1)`` (TRL ``loss_type="grpo"``; docs/methods/grpo_aggregation.md#aggregations).

    DeepSeekMath GRPO, arXiv 2402.03300. ``B`` is ``B_mb``, the micro-batch's rows (TRL), or with ``num_rows`` the
    kept rows of the accumulated batch per process (module docstring). Rows with no mask tokens contribute 0.
    """
    mask = mask.to(per_token_loss.dtype)
    row_means = (per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    if num_rows is None:
        return row_means.mean()
    return row_means.sum() / _row_normalizer(per_token_loss, num_rows, num_processes)


def bnpo(per_token_loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``sum(mask*l) / max(sum(mask), 1)`` over the local micro-batch (TRL ``loss_type="bnpo"``; docs/methods/grpo_aggregation.md#aggregations).

    The token-level mean of DAPO (arXiv 2503.14476), normalised per local micro-batch instead of the global batch.
    """
    mask = mask.to(per_token_loss.dtype)
    return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)


def dr_grpo(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    max_completion_length: int,
    num_rows: torch.Tensor | float | None = None,
    num_processes: int = 1,
) -> torch.Tensor:
    """``sum(mask*l) / (B * max_completion_length)`` (TRL ``loss_type="dr_grpo"``; docs/methods/grpo_aggregation.md#aggregations).

    Dr. GRPO, "Understanding R1-Zero-Like Training", arXiv 2503.20783. ``B`` is ``B_mb`` (every row of the
    micro-batch, masked or not; TRL), or with ``num_rows`` the kept rows per process (module docstring).
    """
    mask = mask.to(per_token_loss.dtype)
    rows = _row_normalizer(per_token_loss, num_rows, num_processes)
    return (per_token_loss * mask).sum() / (rows * max_completion_length)


def dapo(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    num_items_in_batch: torch.Tensor | float | None = None,
    num_processes: int = 1,
) -> torch.Tensor:
    """Token mean over the global batch: ``sum(mask*l) / (N_glob / num_processes)`` (TRL ``loss_type="dapo"``).

    DAPO, arXiv 2503.14476 (token-level policy gradient loss); docs/methods/grpo_aggregation.md#the-dapo-normaliser.
    ``num_items_in_batch`` is ``N_glob``, the mask-token count of the optimizer step's global accumulated batch (all
    processes, all micro-batches); when None, the local ``mask.sum()`` is used (one process, one micro-batch).
    With DDP gradient averaging over ``num_processes`` the gradient is ``sum over all tokens of grad(l) / N_glob``.
    Not divided by the accumulation steps. The normaliser is clamped to at least 1, so an empty batch gives 0.
    """
    mask = mask.to(per_token_loss.dtype)
    if num_items_in_batch is None:
        normalizer = mask.sum()
    else:
        normalizer = torch.as_tensor(num_items_in_batch, dtype=per_token_loss.dtype, device=per_token_loss.device)
    normalizer = normalizer.clamp(min=1.0) / num_processes
    return (per_token_loss * mask).sum() / normalizer


def delta_l_weights(
    mask_or_lengths: torch.Tensor,
    alpha: float = 0.75,
    scope: str = "batch",
    num_generations: int | None = None,
) -> torch.Tensor:
    """ΔL row weights ``w_i = u_i / mean_{j in S} u_j`` with ``u_i = (L_i / mean L)^-alpha`` (detached ``[B]``).

    ΔL Normalization, He et al., arXiv 2509.07558 (x_i = (1/M) L_i^-alpha / sum_j L_j^-alpha);
    docs/methods/grpo_aggregation.md#delta-l-normalisation. ``mask_or_lengths`` is a ``[B, T]`` mask or ``[B]`` lengths ``L_i``.
    ``scope="batch"`` normalises over all rows; ``"group"`` within each contiguous block of ``num_generations``.
    Rows with ``L_i = 0`` get weight 0 and are left out of the means (no NaN/inf). ``mean_S w = 1`` over the valid
    rows of each scope. Compute once per generation batch and reuse across ``num_iterations``.
    """
    if scope not in ("batch", "group"):
        raise ValueError(f"delta_l scope must be 'batch' or 'group', got {scope!r}")
    x = torch.as_tensor(mask_or_lengths).detach()
    dtype = x.dtype if torch.is_floating_point(x) else torch.get_default_dtype()
    lengths = (x.sum(-1) if x.dim() == 2 else x).to(dtype)
    B = lengths.numel()
    if scope == "group":
        if num_generations is None or num_generations < 1 or B % num_generations:
            raise ValueError("delta_l scope='group' needs num_generations dividing the batch size")
        seg = torch.arange(B, device=lengths.device) // num_generations
        nseg = B // num_generations
    else:
        seg = torch.zeros(B, dtype=torch.long, device=lengths.device)
        nseg = 1
    valid = lengths > 0
    zeros = torch.zeros(nseg, dtype=dtype, device=lengths.device)
    count = zeros.index_add(0, seg, valid.to(dtype)).clamp(min=1.0)
    mean_len = zeros.index_add(0, seg, torch.where(valid, lengths, 0.0)) / count
    # Rescale by the mean length before the power, as the reference does, for fp32 stability; it cancels.
    u = torch.where(valid, (lengths / mean_len[seg].clamp(min=1e-12)).clamp(min=1e-12) ** (-alpha), 0.0)
    mean_u = zeros.index_add(0, seg, u) / count
    return torch.where(valid, u / mean_u[seg].clamp(min=1e-30), 0.0)


def delta_l(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    max_completion_length: int,
    alpha: float = 0.75,
    scope: str = "batch",
    num_generations: int | None = None,
    weights: torch.Tensor | None = None,
    num_rows: torch.Tensor | float | None = None,
    num_processes: int = 1,
) -> torch.Tensor:
    """ΔL aggregation: ``sum_i w_i sum_t mask*l / (B * max_completion_length)`` (``B`` as in :func:`dr_grpo`).

    ΔL Normalization, arXiv 2509.07558; docs/methods/grpo_aggregation.md#delta-l-normalisation. Over a full batch this is
    ``sum_i x_i sum_t(...)`` with ``x_i = (1/T_max) L_i^-alpha / sum_j L_j^-alpha``. ``alpha=0`` is exactly
    :func:`dr_grpo`; ``alpha=1`` is :func:`grpo` times ``B / (T_max * sum_j 1/L_j)``.

    ``weights``: precomputed :func:`delta_l_weights` for these rows (compute them once on the whole generation batch
    and slice per micro-batch); if None they are computed from ``mask`` (correct when the micro-batch is the whole
    scope). Multiplying the per-row surrogate by ``w_i > 0`` equals scaling the advantage (clip masks unchanged).
    With a KL term the KL term stays unweighted (docs/methods/grpo_aggregation.md#kl-term-under-delta-l): in that case scale the advantages by the weights instead and
    aggregate with :func:`dr_grpo`.
    """
    if weights is None:
        weights = delta_l_weights(mask, alpha=alpha, scope=scope, num_generations=num_generations)
    weights = weights.detach().to(per_token_loss.dtype).reshape(-1, 1)
    return dr_grpo(per_token_loss * weights, mask, max_completion_length, num_rows, num_processes)


# ----------------------------------------------------------------------------------------------------------------
# the ``method.aggregation`` entries are registered in :mod:`posttrain.rl.parts`; each picks its keywords from the
# micro-batch's Normalizer


@dataclass(frozen=True)
class Normalizer:
    """What an aggregation may divide one micro-batch's loss by (docs/methods/grpo_aggregation.md): the completion
    tokens of the accumulated global batch (``num_items_in_batch``, N_glob), its kept rows (``num_rows``; None when the
    batch carries no count), the process count, ``max_completion_length`` (T_max) and ΔL's per-row weights."""

    num_items_in_batch: torch.Tensor | None
    num_rows: torch.Tensor | None
    num_processes: int
    max_completion_length: int | None
    row_weights: torch.Tensor | None = None


LOSS_AGGREGATIONS = AGGREGATIONS.names()


def aggregate_loss(name: str, per_token_loss: torch.Tensor, mask: torch.Tensor, **options: Any) -> torch.Tensor:
    """Aggregate ``[B, T]`` per-token losses by name (TRL ``loss_type`` plus ``"delta_l"``; :data:`AGGREGATIONS`).

    Options: ``dr_grpo`` / ``delta_l`` need ``max_completion_length``; ``dapo`` takes ``num_items_in_batch`` and
    ``num_processes``; ``grpo``, ``dr_grpo`` and ``delta_l`` take ``num_rows`` and ``num_processes``; ``delta_l``
    takes ``alpha`` (alias ``delta_l_alpha``), ``scope`` (alias ``delta_l_scope``), ``num_generations``, ``weights``.
    ``"token_mean"`` is an alias of ``dapo`` (verl ``token-mean``).
    """
    name = "dapo" if name == "token_mean" else name
    if name not in AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {name!r}; known: {LOSS_AGGREGATIONS}")
    for alias in ("alpha", "scope"):
        if f"delta_l_{alias}" in options:
            options[alias] = options.pop(f"delta_l_{alias}")
    return AGGREGATIONS[name].fn(per_token_loss, mask, **options)
