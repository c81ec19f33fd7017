"""What the RL family's parts share: the types passed between the trainer and the parts, and the group statistics.

Conventions of every part (docs/methods/grpo_advantages.md, grpo_aggregation.md, grpo_clipping.md):

* ``rewards`` is a ``[B]`` float tensor, one scalar per completion, after the reward functions are combined
  (:func:`combine_rewards`). ``NaN`` marks an unscorable row: it is left out of every mean and std and gets advantage
  0, as TRL's ``GRPOTrainer`` does.
* Groups are contiguous blocks of ``Groups.size`` rows (TRL's layout: the G completions of a prompt are adjacent).
* Advantages are detached: computed once per generation batch and reused unchanged across ``num_iterations`` passes.
* Per-token tensors are ``[B, T]``; ``mask`` is 1.0 on the completion tokens that enter the loss (after tool masking,
  truncation masking and dropped rows).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

DEFAULT_EPS = 1e-4  # TRL adds 1e-4 to the std (docs/methods/grpo_advantages.md#group-advantage); verl uses 1e-6.


# ----------------------------------------------------------------------------------------------------------------
# what the trainer hands the parts, and what they return


@dataclass(frozen=True)
class Groups:
    """How the ``B`` rows of a generation batch are grouped, and what the trainer measured per row for the estimators
    that declare they need it (:class:`posttrain.registry.AdvantageEntry`).

    ``size``: completions per prompt (``num_generations``), each group a contiguous block; ``strata``: ``[B]`` integer
    stratum ids (``needs_strata``); ``lengths``: ``[B]`` completion tokens (``needs_lengths``); ``p_hat``: ``[B]`` each
    row's tracked success rate (SPO's trainer gives it)."""

    size: int
    strata: torch.Tensor | None = None
    lengths: torch.Tensor | None = None
    p_hat: torch.Tensor | None = None

    def index(self, batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
        """``[B]`` group id of each row (``row // size``)."""
        return group_index(batch_size, self.size, device)


class AdvantageOutput(NamedTuple):
    """What an advantage estimator returns. ``advantages``: ``[B]`` detached float tensor. ``keep``: ``[B]`` bool;
    rows with ``keep=False`` leave the update (the trainer multiplies the loss mask by it, so they add no tokens to any
    denominator). All True except for PSR / NSR / W-REINFORCE."""

    advantages: torch.Tensor
    keep: torch.Tensor


def keep_all(advantages: torch.Tensor) -> AdvantageOutput:
    """``advantages`` with every row kept."""
    return AdvantageOutput(advantages, torch.ones(advantages.shape, dtype=torch.bool, device=advantages.device))


@dataclass(frozen=True)
class Normalizer:
    """What an aggregation may divide one micro-batch's loss by (docs/methods/grpo_aggregation.md): the completion
    tokens of the accumulated global batch (``num_items_in_batch``, N_glob; None: the micro-batch's own), its kept rows
    (``num_rows``; None: the micro-batch's rows), the process count, ``max_completion_length`` (T_max) and ΔL's per-row
    weights (computed once on the generation batch, sliced to the micro-batch).
    ``Normalizer()`` is the micro-batch alone on one process."""

    num_items_in_batch: torch.Tensor | float | None = None
    num_rows: torch.Tensor | float | None = None
    num_processes: int = 1
    max_completion_length: int | None = None
    row_weights: torch.Tensor | None = None


@dataclass
class ClipOutput:
    """What a clipping rule returns: the per-token objective plus masks for metrics (all ``[B, T]``).

    * ``per_token_loss``: unmasked, unaggregated loss (carries the gradient).
    * ``ratio``: detached importance ratio ``exp(logps - old_logps)``.
    * ``low_clipped``: ``A < 0`` and ``ratio < 1 - epsilon`` (TRL ``is_low_clipped``).
    * ``high_clipped``: ``A > 0`` and ``ratio > 1 + epsilon_high`` (TRL ``is_high_clipped``).
    * ``dual_clipped``: ``A < 0`` and ``ratio > dual_clip_c`` (verl ``pg_clipfrac_lower``); all False without dual clip.
    * ``gradient_preserved``: clipped tokens that still receive a gradient (GPPO, CISPO); all False for PPO.
    """

    per_token_loss: torch.Tensor
    ratio: torch.Tensor
    low_clipped: torch.Tensor
    high_clipped: torch.Tensor
    dual_clipped: torch.Tensor
    gradient_preserved: torch.Tensor


class RowTargets(NamedTuple):
    """What a policy loss that is not the clipped surrogate (PACS) reads of each row of a micro-batch of whole groups:
    ``labels`` ``[B]`` (the combined reward) and ``groups`` ``[B]`` (integer group ids, rows need not be contiguous)."""

    labels: torch.Tensor
    groups: torch.Tensor


# ----------------------------------------------------------------------------------------------------------------
# group statistics


def as_float(rewards: torch.Tensor) -> torch.Tensor:
    """``rewards`` detached, as a float tensor."""
    rewards = torch.as_tensor(rewards).detach()
    if not torch.is_floating_point(rewards):
        rewards = rewards.to(torch.get_default_dtype())
    return rewards


def prompt_groups(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> list[int]:
    """``[B]`` group id of each row by its prompt's real tokens: rows with the same prompt share an id (the first such
    row's index), wherever the rows are (TRL shuffles a generation batch's rows across micro-batches). The log-prob
    engine computes a group's prompt once (docs/logprob_engine.md)."""
    first: dict[tuple[int, ...], int] = {}
    ids, real = prompt_ids.tolist(), prompt_mask.bool().tolist()
    return [first.setdefault(tuple(t for t, m in zip(row, keep) if m), b)
            for b, (row, keep) in enumerate(zip(ids, real, strict=True))]


def group_index(batch_size: int, num_generations: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``[B]`` group id of each row: contiguous blocks of ``num_generations`` rows."""
    if num_generations < 1 or batch_size % num_generations != 0:
        raise ValueError(f"batch size {batch_size} is not a multiple of num_generations={num_generations}")
    return torch.arange(batch_size, device=device) // num_generations


def segment_stats(values: torch.Tensor, seg: torch.Tensor, num_segments: int):
    """NaN-aware per-segment (mean, unbiased std, count), broadcast back to rows.

    Two-pass (mean first, then squared deviations) for accuracy. Segments with fewer than two valid values get
    std 0 (never an n-1 = 0 division). Same estimator as TRL ``nanstd`` (divide by n-1).
    """
    valid = ~torch.isnan(values)
    zeros = torch.zeros(num_segments, dtype=values.dtype, device=values.device)
    count = zeros.index_add(0, seg, valid.to(values.dtype))
    total = zeros.index_add(0, seg, torch.where(valid, values, 0.0))
    mean = total / count.clamp(min=1.0)
    dev = torch.where(valid, values - mean[seg], 0.0)
    sq = zeros.index_add(0, seg, dev * dev)
    std = torch.where(count > 1, torch.sqrt(sq / (count - 1).clamp(min=1.0)), 0.0)
    return mean[seg], std[seg], count[seg]


def nanstd_all(values: torch.Tensor) -> torch.Tensor:
    """The unbiased NaN-aware std of every value (one segment)."""
    seg = torch.zeros(values.numel(), dtype=torch.long, device=values.device)
    _, std, _ = segment_stats(values.reshape(-1), seg, 1)
    return std[0]


def correctness(rewards: torch.Tensor, correct_value: float, incorrect_value: float | None = None):
    """``(correct, incorrect)`` ``[B]`` bool masks: correct iff ``== correct_value``; incorrect: any other scored
    (non-NaN) value, or ``== incorrect_value`` when given. A bool ``rewards`` tensor is the correctness itself."""
    r = torch.as_tensor(rewards).detach()
    if r.dtype == torch.bool:
        return r, ~r
    r = as_float(r)
    correct = r == correct_value
    if incorrect_value is None:
        incorrect = ~correct & ~torch.isnan(r)
    else:
        incorrect = r == incorrect_value
    return correct, incorrect


# ----------------------------------------------------------------------------------------------------------------
# rewards


def combine_rewards(rewards_per_func: torch.Tensor, weights: Sequence[float] | torch.Tensor | None = None) -> torch.Tensor:
    """TRL ``sum_then_normalize`` reward combination: ``r_i = nansum_k w_k R[i,k]`` (docs/methods/grpo.md#reward-combination).

    ``rewards_per_func``: ``[B, K]`` (NaN = function not applicable). A row where every function is NaN gets
    ``r_i = NaN`` (unscorable). Returns ``[B]``.
    """
    rpf = as_float(rewards_per_func)
    w = torch.ones(rpf.shape[1], dtype=rpf.dtype, device=rpf.device) if weights is None else torch.as_tensor(
        weights, dtype=rpf.dtype, device=rpf.device
    )
    r = (rpf * w.unsqueeze(0)).nansum(dim=1)
    return torch.where(torch.isnan(rpf).all(dim=1), torch.nan, r)


def normalize_then_sum(
    rewards_per_func: torch.Tensor,
    num_generations: int,
    weights: Sequence[float] | torch.Tensor | None = None,
    eps: float = DEFAULT_EPS,
) -> torch.Tensor:
    """TRL ``multi_objective_aggregation="normalize_then_sum"`` advantages (docs/methods/grpo_advantages.md#normalize-then-sum).

    Each reward function is z-scored inside its group (unbiased std, ``+eps``), the weighted sum ``s_i`` is taken,
    then ``A_i = (s_i - mean(s)) / (std(s) + eps)`` over the whole batch. Rows where every function is NaN get 0.
    ``rewards_per_func``: ``[B, K]``. Returns ``[B]``. Replaces the advantage of the estimators whose entry allows it
    (``normalize_then_sum``).
    """
    rpf = as_float(rewards_per_func)
    B, K = rpf.shape
    gidx = group_index(B, num_generations, rpf.device)
    z = torch.empty_like(rpf)
    for k in range(K):
        mean, std, _ = segment_stats(rpf[:, k], gidx, B // num_generations)
        z[:, k] = (rpf[:, k] - mean) / (std + eps)
    s = combine_rewards(z, weights)
    s = torch.where(torch.isnan(rpf).all(dim=1), torch.nan, s)
    mean_all = torch.nanmean(s)
    adv = (s - mean_all) / (nanstd_all(s) + eps)
    return torch.nan_to_num(adv, nan=0.0)


# ----------------------------------------------------------------------------------------------------------------
# stratum keys (stratified advantages)


def stratum_ids(keys: Sequence[Hashable], device: torch.device | str | None = None) -> torch.Tensor:
    """Map hashable stratum keys (compared by equality; ``None`` is a key of its own) to a ``[B]`` long tensor of
    integer ids, in first-seen order (``Groups.strata``)."""
    table: dict[Hashable, int] = {}
    ids = [table.setdefault(k, len(table)) for k in keys]
    return torch.tensor(ids, dtype=torch.long, device=device)
