"""Per-sequence advantage estimators for RLVR, as pure tensor functions.

Conventions (shared with :mod:`posttrain.rl.aggregation` and :mod:`posttrain.rl.clipping`):

* ``rewards`` is a ``[B]`` float tensor, one scalar per completion, after the reward functions are combined
  (see :func:`combine_rewards`). ``NaN`` marks an unscorable row: it is left out of every mean and std and gets
  advantage 0, as TRL's ``GRPOTrainer`` does.
* Groups are contiguous blocks of ``num_generations`` rows (TRL's layout: the G completions of a prompt are adjacent).
* Every function returns detached tensors: advantages are computed once per generation batch and reused unchanged
  across ``num_iterations`` passes (docs/methods/grpo_advantages.md).

Estimators:

* :func:`group` -- GRPO group-relative advantage with TRL's ``scale_rewards`` options
  (DeepSeekMath, arXiv 2402.03300; Dr. GRPO, arXiv 2503.20783; docs/methods/grpo_advantages.md#group-advantage).
* :func:`normalize_then_sum` -- TRL's ``multi_objective_aggregation="normalize_then_sum"`` (docs/methods/grpo_advantages.md#normalize-then-sum).
* :func:`stratified` -- Stratified Advantage Normalization blended with GRPO
  (Stratified GRPO, arXiv 2510.06214; docs/methods/grpo_advantages.md#stratified-advantage-san).
* :func:`psr`, :func:`nsr`, :func:`w_reinforce` -- positive / negative sample reinforcement and Weighted-REINFORCE
  (Zhu et al., "The Surprising Effectiveness of Negative Reinforcement in LLM Reasoning", arXiv 2506.01347;
  docs/methods/grpo_advantages.md#psr-nsr-and-w-reinforce). They return a ``keep`` row mask besides the advantages because
  dropped rows must leave the update entirely (no tokens in any denominator).
* :func:`rloo` -- leave-one-out baseline (RLOO, arXiv 2402.14740; TRL ``RLOOTrainer``; docs/methods/rloo.md#advantage).
* :func:`reinforce_pp` -- REINFORCE++ (arXiv 2501.03262): group mean subtracted (the "baseline" variant), then
  whitened over every completion token of the batch (verl's ``masked_whiten``; docs/methods/reinforce_pp.md#advantage).
* :func:`compute_advantages` -- name-based dispatcher returning :class:`AdvantageOutput`.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from typing import Any, NamedTuple

import torch

from posttrain.rl.parts import ADVANTAGES

__all__ = [
    "ADVANTAGES",
    "ADVANTAGE_ESTIMATORS",
    "AdvantageOutput",
    "combine_rewards",
    "compute_advantages",
    "count_tool_calls",
    "group",
    "normalize_then_sum",
    "nsr",
    "psr",
    "reinforce_pp",
    "rloo",
    "stratified",
    "stratified_stats",
    "stratum_ids",
    "w_reinforce",
]

DEFAULT_EPS = 1e-4  # TRL adds 1e-4 to the std (docs/methods/grpo_advantages.md#group-advantage); verl uses 1e-6.


class AdvantageOutput(NamedTuple):
    """Result of :func:`compute_advantages`.

    ``advantages``: ``[B]`` detached float tensor. ``keep``: ``[B]`` bool tensor; rows with ``keep=False`` must be
    removed from the update (multiply the loss mask by ``keep[:, None]`` before aggregating). All True except for
    PSR / NSR / W-REINFORCE.
    """

    advantages: torch.Tensor
    keep: torch.Tensor


# ----------------------------------------------------------------------------------------------------------------
# helpers


def _as_float(rewards: torch.Tensor) -> torch.Tensor:
    rewards = torch.as_tensor(rewards).detach()
    if not torch.is_floating_point(rewards):
        rewards = rewards.to(torch.get_default_dtype())
    return rewards


def _group_index(batch_size: int, num_generations: int, device: torch.device) -> torch.Tensor:
    if num_generations < 1 or batch_size % num_generations != 0:
        raise ValueError(f"batch size {batch_size} is not a multiple of num_generations={num_generations}")
    return torch.arange(batch_size, device=device) // num_generations


def _segment_stats(values: torch.Tensor, seg: torch.Tensor, num_segments: int):
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


def _nanstd_all(values: torch.Tensor) -> torch.Tensor:
    seg = torch.zeros(values.numel(), dtype=torch.long, device=values.device)
    _, std, _ = _segment_stats(values.reshape(-1), seg, 1)
    return std[0]


def _normalize_scale(scale: str | bool) -> str:
    # TRL <= 0.21 used a bool: True meant "group", False meant "none" (docs/methods/grpo_advantages.md#differences-from-the-paper-and-trl).
    if scale is True:
        return "group"
    if scale is False:
        return "none"
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none' (or a bool), got {scale!r}")
    return scale


# ----------------------------------------------------------------------------------------------------------------
# GRPO


def combine_rewards(rewards_per_func: torch.Tensor, weights: Sequence[float] | torch.Tensor | None = None) -> torch.Tensor:
    """TRL ``sum_then_normalize`` reward combination: ``r_i = nansum_k w_k R[i,k]`` (docs/methods/grpo.md#reward-combination).

    ``rewards_per_func``: ``[B, K]`` (NaN = function not applicable). A row where every function is NaN gets
    ``r_i = NaN`` (unscorable). Returns ``[B]``.
    """
    rpf = _as_float(rewards_per_func)
    w = torch.ones(rpf.shape[1], dtype=rpf.dtype, device=rpf.device) if weights is None else torch.as_tensor(
        weights, dtype=rpf.dtype, device=rpf.device
    )
    r = (rpf * w.unsqueeze(0)).nansum(dim=1)
    return torch.where(torch.isnan(rpf).all(dim=1), torch.nan, r)


def group(
    rewards: torch.Tensor,
    num_generations: int,
    scale_rewards: str | bool = "group",
    eps: float = DEFAULT_EPS,
) -> torch.Tensor:
    """GRPO group-relative advantages, TRL ``GRPOTrainer`` semantics.

    DeepSeekMath (GRPO), arXiv 2402.03300; Dr. GRPO (``scale_rewards="none"``), arXiv 2503.20783.
    See docs/methods/grpo_advantages.md#group-advantage.

    With ``mu_g`` the NaN-aware group mean and ``std`` the unbiased (n-1) NaN-aware std:

    * ``"group"`` (default, or ``True``): ``A_i = (r_i - mu_g) / (std_g + eps)``
    * ``"batch"``: ``A_i = (r_i - mu_g) / (std_all + eps)`` (std over all B rewards, mean still per group)
    * ``"none"`` (or ``False``): ``A_i = r_i - mu_g``

    ``eps`` is added to the std (not a max). NaN rewards are excluded from the statistics and get ``A = 0``.
    A group whose rewards are all equal gets ``A = 0`` exactly. Returns a detached ``[B]`` tensor.
    """
    r = _as_float(rewards)
    scale = _normalize_scale(scale_rewards)
    gidx = _group_index(r.numel(), num_generations, r.device)
    mean, std_g, _ = _segment_stats(r, gidx, r.numel() // num_generations)
    adv = r - mean
    if scale == "group":
        adv = adv / (std_g + eps)
    elif scale == "batch":
        adv = adv / (_nanstd_all(r) + eps)
    return torch.nan_to_num(adv, nan=0.0)


def normalize_then_sum(
    rewards_per_func: torch.Tensor,
    num_generations: int,
    weights: Sequence[float] | torch.Tensor | None = None,
    eps: float = DEFAULT_EPS,
) -> torch.Tensor:
    """TRL ``multi_objective_aggregation="normalize_then_sum"`` advantages (docs/methods/grpo_advantages.md#normalize-then-sum).

    Each reward function is z-scored inside its group (unbiased std, ``+eps``), the weighted sum ``s_i`` is taken,
    then ``A_i = (s_i - mean(s)) / (std(s) + eps)`` over the whole batch. Rows where every function is NaN get 0.
    ``rewards_per_func``: ``[B, K]``. Returns ``[B]``.
    """
    rpf = _as_float(rewards_per_func)
    B, K = rpf.shape
    gidx = _group_index(B, num_generations, rpf.device)
    z = torch.empty_like(rpf)
    for k in range(K):
        mean, std, _ = _segment_stats(rpf[:, k], gidx, B // num_generations)
        z[:, k] = (rpf[:, k] - mean) / (std + eps)
    s = combine_rewards(z, weights)
    s = torch.where(torch.isnan(rpf).all(dim=1), torch.nan, s)
    mean_all = torch.nanmean(s)
    adv = (s - mean_all) / (_nanstd_all(s) + eps)
    return torch.nan_to_num(adv, nan=0.0)


# ----------------------------------------------------------------------------------------------------------------
# Stratified GRPO (SAN)


def count_tool_calls(completion: Any, marker: str = "<tool_call>") -> int:
    """Default stratum key: number of tool calls in a completion (docs/methods/grpo_advantages.md#stratum-keys).

    The paper (arXiv 2510.06214) stratifies search agents by the number of search calls. Accepts a completion string
    (counts occurrences of ``marker``) or a conversational completion (list of message dicts, TRL's format): counts
    the entries of each message's ``tool_calls`` plus ``marker`` occurrences in string contents.
    """
    if completion is None:
        return 0
    if isinstance(completion, str):
        return completion.count(marker)
    if isinstance(completion, dict):
        n = len(completion.get("tool_calls") or [])
        content = completion.get("content")
        if isinstance(content, str):
            n += content.count(marker)
        elif isinstance(content, list):  # multimodal content parts
            n += sum(p.get("text", "").count(marker) for p in content if isinstance(p, dict))
        return n
    if isinstance(completion, Iterable):
        return sum(count_tool_calls(m, marker) for m in completion)
    raise TypeError(f"cannot count tool calls in {type(completion).__name__}")


def stratum_ids(keys: Sequence[Hashable], device: torch.device | str | None = None) -> torch.Tensor:
    """Map hashable stratum keys (compared by equality; ``None`` is a key of its own) to a ``[B]`` long tensor of
    integer ids, in first-seen order. Feed the result to :func:`stratified` as ``strata``."""
    table: dict[Hashable, int] = {}
    ids = [table.setdefault(k, len(table)) for k in keys]
    return torch.tensor(ids, dtype=torch.long, device=device)


def stratified(
    rewards: torch.Tensor,
    num_generations: int,
    strata: torch.Tensor | Sequence[int],
    alpha: float = 0.8,
    scale: str = "stratum",
    scope: str = "group",
    eps: float = DEFAULT_EPS,
) -> torch.Tensor:
    """Stratified Advantage Normalization (SAN) blended with the GRPO group advantage.

    Stratified GRPO, Zhu et al., arXiv 2510.06214 (SAN, Prop. 1 / Thm. 1). See docs/methods/grpo_advantages.md#stratified-advantage-san.

    * ``strata``: ``[B]`` integer stratum ids (e.g. from :func:`stratum_ids` over :func:`count_tool_calls`).
    * ``scope="group"``: stratum = (prompt group, id); ``"batch"`` (extension): the id alone across the batch.
    * Per stratum k (n_k rows, mean mu_k, unbiased std sigma_k): ``A_SAN = (r - mu_k) / (sigma_k + eps)``;
      ``scale="none"``: ``A_SAN = r - mu_k``. A singleton stratum gives ``A_SAN = 0`` exactly (no n-1 = 0 std).
    * ``A_GN`` = :func:`group` with ``scale_rewards="group"`` (or ``"none"`` when ``scale="none"``).
    * Blend ``A = alpha * A_SAN + (1 - alpha) * A_GN``, computed as ``A_GN + alpha * (A_SAN - A_GN)`` so that
      ``alpha=0`` and a single stratum per group both give exactly the GRPO advantages.

    ``alpha`` (``san_blend_alpha``) defaults to the framework's 0.8 (not a paper value; see docs/methods/grpo_advantages.md#differences-from-the-paper-and-trl).
    NaN rewards are excluded from all statistics and get 0. Returns a detached ``[B]`` tensor.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if scale not in ("stratum", "none"):
        raise ValueError(f"scale must be 'stratum' or 'none', got {scale!r}")
    if scope not in ("group", "batch"):
        raise ValueError(f"scope must be 'group' or 'batch', got {scope!r}")
    parts = _san_parts(rewards, num_generations, strata, scale, scope, eps)
    return parts["gn"] + alpha * (parts["san"] - parts["gn"])


def _san_parts(rewards, num_generations: int, strata, scale: str, scope: str, eps: float) -> dict[str, torch.Tensor]:
    """A_SAN, A_GN and the per-row stratum statistics shared by :func:`stratified` and :func:`stratified_stats`."""
    if scale not in ("stratum", "none"):
        raise ValueError(f"scale must be 'stratum' or 'none', got {scale!r}")
    if scope not in ("group", "batch"):
        raise ValueError(f"scope must be 'group' or 'batch', got {scope!r}")
    r = _as_float(rewards)
    B = r.numel()
    s = torch.as_tensor(strata, device=r.device).reshape(-1).long()
    if s.numel() != B:
        raise ValueError(f"strata has {s.numel()} entries for {B} rewards")
    gidx = _group_index(B, num_generations, r.device)
    keys = torch.stack([gidx, s], dim=1) if scope == "group" else s.unsqueeze(1)
    _, seg = torch.unique(keys, dim=0, return_inverse=True)
    mean_k, std_k, n_k = _segment_stats(r, seg, int(seg.max()) + 1 if B else 0)
    san = r - mean_k
    if scale == "stratum":
        san = torch.where(n_k > 1, san / (std_k + eps), 0.0)
    san = torch.nan_to_num(san, nan=0.0)
    gn = group(r, num_generations, scale_rewards="group" if scale == "stratum" else "none", eps=eps)
    return {"r": r, "seg": seg, "gidx": gidx, "mean_k": mean_k, "std_k": std_k, "n_k": n_k, "san": san, "gn": gn}


def stratified_stats(
    rewards: torch.Tensor,
    num_generations: int,
    strata: torch.Tensor | Sequence[int],
    scale: str = "stratum",
    scope: str = "group",
    eps: float = DEFAULT_EPS,
) -> dict[str, float]:
    """The SAN diagnostics of docs/methods/grpo_advantages.md#metrics, over one generation batch (rows with NaN rewards left out
    of every statistic):

    * ``num_strata_per_group``: mean number of strata per prompt group (with ``scope="batch"``: distinct strata
      among a group's rows);
    * ``frac_singleton_strata``: share of strata with one row (they get ``A_SAN = 0``);
    * ``frac_zero_std_strata``: share of the strata with two or more rows whose rewards are all equal;
    * ``cross_stratum_bias``: ``mean_i |mu_k(i) - mu_g(i)|``, how far each row's stratum mean is from its group mean
      (the bias that pooled GRPO normalisation ignores, Stratified GRPO Thm. 1);
    * ``adv_abs_diff``: ``mean_i |A_SAN_i - A_GN_i|``.
    """
    p = _san_parts(rewards, num_generations, strata, scale, scope, eps)
    valid = ~torch.isnan(p["r"])
    if not bool(valid.any()):
        return {}
    seg, gidx = p["seg"][valid], p["gidx"][valid]
    n_seg = int(p["seg"].max()) + 1
    counts = torch.zeros(n_seg, device=seg.device).index_add(0, seg, torch.ones_like(seg, dtype=torch.float32))
    present = counts > 0
    std = torch.zeros(n_seg, device=seg.device).index_copy(0, p["seg"], p["std_k"].float())
    multi = present & (counts > 1)
    pairs = torch.unique(torch.stack([gidx, seg], dim=1), dim=0)  # (group, stratum) pairs actually present
    groups = torch.unique(gidx)
    mean_g, _, _ = _segment_stats(p["r"], p["gidx"], int(p["gidx"].max()) + 1)
    return {
        "num_strata_per_group": pairs.size(0) / groups.numel(),
        "frac_singleton_strata": ((counts == 1).sum() / present.sum()).item(),
        "frac_zero_std_strata": ((multi & (std == 0)).sum() / multi.sum()).item() if bool(multi.any()) else 0.0,
        "cross_stratum_bias": (p["mean_k"] - mean_g)[valid].abs().mean().item(),
        "adv_abs_diff": (p["san"] - p["gn"])[valid].abs().mean().item(),
    }


# ----------------------------------------------------------------------------------------------------------------
# PSR / NSR / W-REINFORCE


def _correctness(rewards: torch.Tensor, correct_value: float, incorrect_value: float | None):
    r = torch.as_tensor(rewards).detach()
    if r.dtype == torch.bool:
        return r, ~r
    r = _as_float(r)
    correct = r == correct_value
    if incorrect_value is None:
        incorrect = ~correct & ~torch.isnan(r)
    else:
        incorrect = r == incorrect_value
    return correct, incorrect


def psr(
    rewards: torch.Tensor, correct_value: float = 1.0, incorrect_value: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive Sample Reinforcement: ``A = +1`` on correct rows; every other row is dropped.

    Zhu et al., arXiv 2506.01347 (L_PSR); docs/methods/grpo_advantages.md#psr-nsr-and-w-reinforce. No baseline, no std scaling.
    ``rewards`` is a ``[B]`` float tensor (correct iff ``== correct_value``) or a bool correctness tensor.
    Returns ``(advantages [B], keep [B] bool)``; dropped rows have advantage 0 and ``keep=False`` and must add no
    tokens to any denominator (multiply the loss mask by ``keep``).
    """
    correct, _ = _correctness(rewards, correct_value, incorrect_value)
    return correct.to(torch.get_default_dtype()), correct


def nsr(
    rewards: torch.Tensor, correct_value: float = 1.0, incorrect_value: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Negative Sample Reinforcement: ``A = -1`` on incorrect rows; correct rows are dropped.

    Zhu et al., arXiv 2506.01347 (L_NSR); docs/methods/grpo_advantages.md#psr-nsr-and-w-reinforce.
    Incorrect means ``!= correct_value`` (non-NaN) by default; pass ``incorrect_value=0.0`` to follow the reference
    code exactly (other scores then belong to neither set). Returns ``(advantages, keep)`` as :func:`psr`.
    """
    _, incorrect = _correctness(rewards, correct_value, incorrect_value)
    return -incorrect.to(torch.get_default_dtype()), incorrect


def w_reinforce(
    rewards: torch.Tensor,
    lam: float = 0.1,
    correct_value: float = 1.0,
    incorrect_value: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted-REINFORCE: ``A = +lam`` on correct rows and ``-1`` on incorrect rows (L_W = lam*L_PSR + L_NSR).

    Zhu et al., arXiv 2506.01347 (lambda = 0.1 in the paper); docs/methods/grpo_advantages.md#psr-nsr-and-w-reinforce.
    ``lam=1`` is plain REINFORCE with +/-1 rewards and no baseline. Rows that are neither correct nor incorrect
    (NaN, or any value other than ``incorrect_value`` when it is given) are dropped. Returns ``(advantages, keep)``.
    """
    correct, incorrect = _correctness(rewards, correct_value, incorrect_value)
    dtype = torch.get_default_dtype()
    adv = lam * correct.to(dtype) - incorrect.to(dtype)
    return adv, correct | incorrect


# ----------------------------------------------------------------------------------------------------------------
# RLOO / REINFORCE++


def rloo(rewards: torch.Tensor, num_generations: int, normalize: bool = False, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """RLOO advantages ``A_i = r_i - mean_{j != i in the group} r_j`` (docs/methods/rloo.md#advantage).

    Ahmadian et al., "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human Feedback in LLMs",
    arXiv 2402.14740, Eq. 5 (equivalently ``G/(G-1) * (r_i - mean_g)``). As TRL's ``RLOOTrainer``: the baseline
    averages over the scorable siblings only (NaN rewards left out); a row with no scorable sibling, and a NaN row, gets
    0. ``normalize`` (TRL ``normalize_advantages``): then ``(A - mean(A)) / (std(A) + eps)`` over the batch's scorable
    rows (unbiased std). Worked example: group ``[1, 0, 0, 1]`` gives ``[2/3, -2/3, -2/3, 2/3]``. Returns a detached
    ``[B]`` tensor.
    """
    r = _as_float(rewards)
    gidx = _group_index(r.numel(), num_generations, r.device)
    valid = ~torch.isnan(r)
    zeros = torch.zeros(r.numel() // num_generations, dtype=r.dtype, device=r.device)
    count = zeros.index_add(0, gidx, valid.to(r.dtype))[gidx]
    total = zeros.index_add(0, gidx, torch.where(valid, r, 0.0))[gidx]
    adv = r - (total - r) / (count - 1)  # NaN for NaN rows and for rows without a scorable sibling (0/0)
    adv = torch.where(count > 1, adv, torch.nan)
    if normalize:
        adv = (adv - torch.nanmean(adv)) / (_nanstd_all(adv) + eps)
    return torch.nan_to_num(adv, nan=0.0)


def reinforce_pp(
    rewards: torch.Tensor,
    num_generations: int,
    lengths: torch.Tensor | None = None,
    baseline: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """REINFORCE++ advantages: ``A_i = (x_i - mu) / sqrt(var + eps)`` (docs/methods/reinforce_pp.md#advantage).

    Hu et al., "REINFORCE++: Stabilizing Critic-Free Policy Optimization with Global Advantage Normalization", arXiv
    2501.03262, with an outcome reward and gamma = 1 (every completion token's return is ``r_i``). ``x_i = r_i -
    mean_g(r)`` with ``baseline`` (REINFORCE++-baseline, verl ``reinforce_plus_plus_baseline``), else ``x_i = r_i``
    (verl ``reinforce_plus_plus``). ``mu`` and ``var`` are the token-weighted mean and unbiased variance over the
    batch, as verl's ``masked_whiten`` over the response mask: with ``L_i`` = ``lengths`` (completion tokens; 1 per row
    when None), ``mu = sum L x / sum L`` and ``var = sum L (x - mu)^2 / (sum L - 1)``. NaN rewards are left out of
    every statistic and get 0. Worked example (baseline, ``lengths`` ``[1, 2, 3, 2]``, one group ``[1, 0, 0, 1]``):
    ``x = [.5, -.5, -.5, .5]``, ``mu = -1/8``, ``var = 0.267857``, ``A = [1.207615, -0.724569, -0.724569, 1.207615]``.
    Returns a detached ``[B]`` tensor.
    """
    r = _as_float(rewards)
    gidx = _group_index(r.numel(), num_generations, r.device)
    if baseline:
        mean_g, _, _ = _segment_stats(r, gidx, r.numel() // num_generations)
        r = r - mean_g
    valid = ~torch.isnan(r)
    w = torch.ones_like(r) if lengths is None else torch.as_tensor(lengths, device=r.device).to(r.dtype)
    w = torch.where(valid, w, 0.0)
    x = torch.where(valid, r, 0.0)
    n = w.sum()
    mu = (w * x).sum() / n.clamp(min=1e-12)
    var = torch.where(n > 1, (w * (x - mu) ** 2).sum() / (n - 1).clamp(min=1e-12), 0.0)
    adv = (x - mu) * torch.rsqrt(var + eps)
    return torch.where(valid, adv, 0.0)


# ----------------------------------------------------------------------------------------------------------------
# the functions of the ``method.advantage`` entries (registered in :mod:`posttrain.rl.parts`)


def _ones_keep(adv: torch.Tensor) -> AdvantageOutput:
    return AdvantageOutput(adv, torch.ones(adv.shape, dtype=torch.bool, device=adv.device))


def group_advantage(rewards: torch.Tensor, num_generations: int, **options: Any) -> AdvantageOutput:
    """GRPO group-relative advantages (DeepSeekMath, arXiv 2402.03300), every row kept: :func:`group`."""
    return _ones_keep(group(rewards, num_generations, **options))


def stratified_advantage(rewards: torch.Tensor, num_generations: int, **options: Any) -> AdvantageOutput:
    """Stratified Advantage Normalization (Stratified GRPO, arXiv 2510.06214), every row kept: :func:`stratified`."""
    if "strata" not in options:
        raise ValueError("stratified advantages need strata=[B] stratum ids")
    return _ones_keep(stratified(rewards, num_generations, **options))


def psr_advantage(rewards: torch.Tensor, num_generations: int, **options: Any) -> AdvantageOutput:
    """Positive Sample Reinforcement (Zhu et al., arXiv 2506.01347): :func:`psr`; ``num_generations`` unused."""
    return AdvantageOutput(*psr(rewards, **options))


def nsr_advantage(rewards: torch.Tensor, num_generations: int, **options: Any) -> AdvantageOutput:
    """Negative Sample Reinforcement (Zhu et al., arXiv 2506.01347): :func:`nsr`; ``num_generations`` unused."""
    return AdvantageOutput(*nsr(rewards, **options))


def w_reinforce_advantage(rewards: torch.Tensor, num_generations: int, **options: Any) -> AdvantageOutput:
    """Weighted-REINFORCE (Zhu et al., arXiv 2506.01347): :func:`w_reinforce`; ``num_generations`` unused."""
    if "w_reinforce_lambda" in options:
        options["lam"] = options.pop("w_reinforce_lambda")
    return AdvantageOutput(*w_reinforce(rewards, **options))


def rloo_advantage(rewards: torch.Tensor, num_generations: int, **options: Any) -> AdvantageOutput:
    """Leave-one-out baseline (RLOO, Ahmadian et al. 2024, arXiv 2402.14740), every row kept: :func:`rloo`."""
    return _ones_keep(rloo(rewards, num_generations, **options))


def reinforce_pp_advantage(rewards: torch.Tensor, num_generations: int, **options: Any) -> AdvantageOutput:
    """REINFORCE++ (-baseline) (Hu et al. 2025, arXiv 2501.03262), every row kept: :func:`reinforce_pp`."""
    return _ones_keep(reinforce_pp(rewards, num_generations, **options))


def spo_advantage(rewards: torch.Tensor, num_generations: int, **options: Any) -> AdvantageOutput:
    """Single-stream advantage (SPO, Xu & Ding 2025, arXiv 2509.13232), every row kept:
    :func:`posttrain.rl.spo.spo_advantages` of the rewards against each prompt's tracked success rate ``p_hat``
    (``[B]``, read before this visit's update; given by the trainer). ``num_generations`` is 1 (unused)."""
    from posttrain.rl.spo import spo_advantages

    if "p_hat" not in options:
        raise ValueError("spo advantages need p_hat=[B], each row's tracked success rate")
    adv = spo_advantages(torch.as_tensor(rewards), options["p_hat"], eps=options.get("eps", 1e-8),
                         baseline=options.get("baseline", True))
    return _ones_keep(adv.to(torch.as_tensor(rewards).dtype))


ADVANTAGE_ESTIMATORS = ("grpo", "stratified", "psr", "nsr", "w_reinforce", "rloo", "reinforce_pp", "spo")  # (grpo = group)
_ALIASES = {"grpo": "group", "san": "stratified", "stratified_grpo": "stratified", "w-reinforce": "w_reinforce"}


def compute_advantages(name: str, rewards: torch.Tensor, num_generations: int, **options: Any) -> AdvantageOutput:
    """Dispatch to a registered estimator (:data:`ADVANTAGES`) by name; return :class:`AdvantageOutput`.

    Names and options:

    * ``"grpo"`` / ``"group"``: :func:`group` -- ``scale_rewards``, ``eps``.
    * ``"stratified"`` (alias ``"san"``): :func:`stratified` -- ``strata`` (required), ``alpha``, ``scale``,
      ``scope``, ``eps``.
    * ``"psr"`` / ``"nsr"``: ``correct_value``, ``incorrect_value``.
    * ``"w_reinforce"``: ``lam`` (alias ``w_reinforce_lambda``), ``correct_value``, ``incorrect_value``.
    * ``"rloo"``: ``normalize``, ``eps``; ``"reinforce_pp"``: ``lengths``, ``baseline``, ``eps``.

    ``num_generations`` is ignored by PSR / NSR / W-REINFORCE (they use no group statistics).
    """
    key = _ALIASES.get(name, name)
    if key not in ADVANTAGES:
        raise ValueError(f"unknown advantage estimator {name!r}; known: {ADVANTAGE_ESTIMATORS}")
    return ADVANTAGES[key].fn(torch.as_tensor(rewards), num_generations, **options)
