"""Stratified Advantage Normalization blended with GRPO (Stratified GRPO, Zhu et al., arXiv 2510.06214).

docs/methods/grpo_advantages.md#stratified-advantage-san. The rows of a group are split into strata by a key of each
rollout (``method.stratum_key``; the trainer gives their ids as ``Groups.strata``), each row is normalised within its
stratum, and the result is blended with the GRPO group advantage.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from posttrain.families.rl.parts import ADVANTAGES, PartOptions

if TYPE_CHECKING:
    import torch

    from posttrain.families.rl.common import AdvantageOutput, Groups


class StratifiedOptions(PartOptions):
    stratum_key: str = Field(
        "tool_calls",
        description="stratified: 'tool_calls' (count of <tool_call> / message tool_calls; 0 for free text, so one "
        "stratum per group = GRPO), a dataset column, or 'module:function' (or 'file.py:function') called as "
        "fn(prompt=, completion=, **row) -> hashable.",
    )
    san_alpha: float = Field(0.8, ge=0.0, le=1.0, description="stratified: blend alpha*A_SAN + (1-alpha)*A_GRPO.")
    san_scale: Literal["stratum", "none"] = Field(
        "stratum", description="stratified: divide by each stratum's std (stratum) or only centre (none).")
    san_scope: Literal["group", "batch"] = Field(
        "group", description="stratified: a stratum is (prompt group, key) or the key across the whole batch.")
    san_eps: float = Field(1e-4, ge=0.0, description="stratified: added to each stratum's std (tied to GRPO's 1e-4, so "
                           "one stratum per group equals GRPO exactly; the paper's unit-variance claims use 0).")


def stratified(
    rewards: torch.Tensor,
    num_generations: int,
    strata: torch.Tensor | Sequence[int],
    alpha: float = 0.8,
    scale: str = "stratum",
    scope: str = "group",
    eps: float = 1e-4,
) -> torch.Tensor:
    """Stratified Advantage Normalization (SAN) blended with the GRPO group advantage (arXiv 2510.06214, Prop. 1 /
    Thm. 1).

    * ``strata``: ``[B]`` integer stratum ids (:func:`posttrain.families.rl.common.stratum_ids` of the keys).
    * ``scope="group"``: stratum = (prompt group, id); ``"batch"`` (extension): the id alone across the batch.
    * Per stratum k (n_k rows, mean mu_k, unbiased std sigma_k): ``A_SAN = (r - mu_k) / (sigma_k + eps)``;
      ``scale="none"``: ``A_SAN = r - mu_k``. A singleton stratum gives ``A_SAN = 0`` exactly (no n-1 = 0 std).
    * ``A_GN`` = the group advantage with ``scale_rewards="group"`` (or ``"none"`` when ``scale="none"``).
    * Blend ``A = alpha * A_SAN + (1 - alpha) * A_GN``, computed as ``A_GN + alpha * (A_SAN - A_GN)`` so that
      ``alpha=0`` and a single stratum per group both give exactly the GRPO advantages.

    ``alpha`` defaults to the framework's 0.8 (not a paper value; docs/methods/grpo_advantages.md#differences-from-the-paper-and-trl).
    NaN rewards are excluded from all statistics and get 0. Returns a detached ``[B]`` tensor.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    parts = _san_parts(rewards, num_generations, strata, scale, scope, eps)
    return parts["gn"] + alpha * (parts["san"] - parts["gn"])


def _san_parts(rewards, num_generations: int, strata, scale: str, scope: str, eps: float) -> dict[str, torch.Tensor]:
    """A_SAN, A_GN and the per-row stratum statistics shared by :func:`stratified` and :func:`stratified_stats`."""
    import torch

    from posttrain.families.rl.advantages.group import group_relative
    from posttrain.families.rl.common import as_float, group_index, segment_stats

    if scale not in ("stratum", "none"):
        raise ValueError(f"scale must be 'stratum' or 'none', got {scale!r}")
    if scope not in ("group", "batch"):
        raise ValueError(f"scope must be 'group' or 'batch', got {scope!r}")
    r = as_float(rewards)
    B = r.numel()
    s = torch.as_tensor(strata, device=r.device).reshape(-1).long()
    if s.numel() != B:
        raise ValueError(f"strata has {s.numel()} entries for {B} rewards")
    gidx = group_index(B, num_generations, r.device)
    keys = torch.stack([gidx, s], dim=1) if scope == "group" else s.unsqueeze(1)
    _, seg = torch.unique(keys, dim=0, return_inverse=True)
    mean_k, std_k, n_k = segment_stats(r, seg, int(seg.max()) + 1 if B else 0)
    san = r - mean_k
    if scale == "stratum":
        san = torch.where(n_k > 1, san / (std_k + eps), 0.0)
    san = torch.nan_to_num(san, nan=0.0)
    gn = group_relative(r, num_generations, scale_rewards="group" if scale == "stratum" else "none", eps=eps)
    return {"r": r, "seg": seg, "gidx": gidx, "mean_k": mean_k, "std_k": std_k, "n_k": n_k, "san": san, "gn": gn}


def stratified_stats(rewards: torch.Tensor, groups: Groups, opts) -> dict[str, float]:
    """The SAN diagnostics of docs/methods/grpo_advantages.md#metrics, over one generation batch (rows with NaN rewards
    left out of every statistic; the trainer logs them as ``san/<name>``):

    * ``num_strata_per_group``: mean number of strata per prompt group (with ``scope="batch"``: distinct strata
      among a group's rows);
    * ``frac_singleton_strata``: share of strata with one row (they get ``A_SAN = 0``);
    * ``frac_zero_std_strata``: share of the strata with two or more rows whose rewards are all equal;
    * ``cross_stratum_bias``: ``mean_i |mu_k(i) - mu_g(i)|``, how far each row's stratum mean is from its group mean
      (the bias that pooled GRPO normalisation ignores, Stratified GRPO Thm. 1);
    * ``adv_abs_diff``: ``mean_i |A_SAN_i - A_GN_i|``.
    """
    import torch

    from posttrain.families.rl.common import segment_stats

    p = _san_parts(rewards, groups.size, groups.strata, opts.san_scale, opts.san_scope, opts.san_eps)
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
    n_groups = torch.unique(gidx)
    mean_g, _, _ = segment_stats(p["r"], p["gidx"], int(p["gidx"].max()) + 1)
    return {
        "num_strata_per_group": pairs.size(0) / n_groups.numel(),
        "frac_singleton_strata": ((counts == 1).sum() / present.sum()).item(),
        "frac_zero_std_strata": ((multi & (std == 0)).sum() / multi.sum()).item() if bool(multi.any()) else 0.0,
        "cross_stratum_bias": (p["mean_k"] - mean_g)[valid].abs().mean().item(),
        "adv_abs_diff": (p["san"] - p["gn"])[valid].abs().mean().item(),
    }


@ADVANTAGES.register("stratified", doc="docs/methods/grpo_advantages.md#stratified-advantage-san",
                     options_model=StratifiedOptions, needs_strata=True,
                     refuses={"scale_rewards": "scales with method.san_scale, not scale_rewards"})
def stratified_advantage(rewards: torch.Tensor, groups: Groups, opts) -> AdvantageOutput:
    """Stratified Advantage Normalization (Stratified GRPO, arXiv 2510.06214), every row kept.

    :func:`stratified` of the rewards over ``groups.strata`` with ``san_alpha`` / ``san_scale`` / ``san_scope`` /
    ``san_eps``."""
    from posttrain.families.rl.common import keep_all

    if groups.strata is None:
        raise ValueError("stratified advantages need Groups.strata, the [B] stratum ids")
    return keep_all(stratified(rewards, groups.size, groups.strata, alpha=opts.san_alpha, scale=opts.san_scale,
                               scope=opts.san_scope, eps=opts.san_eps))
