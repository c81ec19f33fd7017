"""The PPO clipped surrogate with clip-higher (PPO, Schulman et al., arXiv 1707.06347; clip-higher from DAPO, arXiv
2503.14476; verl's dual clip), TRL's clipping for every ``loss_type`` of the surrogate.

docs/methods/grpo_clipping.md#ppo-clip-higher. The clip range's options and check, and the case-form surrogate
(:func:`clipped_surrogate`), are shared with ``gppo`` and ``gspo``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from posttrain.families.rl.parts import CLIPPINGS, PartOptions

if TYPE_CHECKING:
    import torch

    from posttrain.families.rl.common import ClipOutput


class ClipRangeOptions(PartOptions):
    epsilon: float | None = Field(
        None, gt=0.0, lt=1.0, description="Lower clip range (and upper, unless epsilon_high); default 0.2, gspo 3e-4.")
    epsilon_high: float | None = Field(None, gt=0.0, description="Upper clip range; gppo default 0.28, gspo 4e-4.")
    dual_clip_c: float | None = Field(None, gt=1.0, description="Dual clip for A<0 (verl); off by default.")


def check_clip_range(p) -> str | None:
    """The clip range ``[1 - epsilon, 1 + epsilon_high]``: clip-higher (DAPO, arXiv 2503.14476) widens the upper side;
    an upper range narrower than the lower one is refused as swapped values."""
    if p.epsilon_high is not None and p.epsilon_high < p.epsilon:
        if "epsilon_high" not in p.model_fields_set:  # the selected rule's default upper range
            return (f"method.epsilon: {p.epsilon:g} is above the upper clip range of clipping {p.clipping} "
                    f"(epsilon_high {p.epsilon_high:g}, its default); set method.epsilon_high as well")
        return (f"method.epsilon_high: {p.epsilon_high:g} is below method.epsilon {p.epsilon:g}: the upper clip range "
                "would be narrower than the lower one (clip-higher widens it; swapped values?)")
    return None


def prepare(logps, old_logps, advantages, epsilon, epsilon_high, dual_clip_c):
    """The ratio, the clip masks and the ratio carrying a gradient only where unclipped (shared by the PPO-style
    rules): ``(adv [B, 1] or [B, T], eps_low, eps_high, ratio, ratio_g, low, high, dual)``."""
    import torch

    eps_low = float(epsilon)
    eps_high = float(epsilon if epsilon_high is None else epsilon_high)
    adv = torch.as_tensor(advantages, device=logps.device).detach().to(logps.dtype)
    if adv.dim() == 1:
        adv = adv.unsqueeze(1)
    log_ratio = logps - old_logps.detach()
    with torch.no_grad():
        ratio = torch.exp(log_ratio)
        adv_b = adv.expand_as(ratio)
        low = (adv_b < 0) & (ratio < 1 - eps_low)
        high = (adv_b > 0) & (ratio > 1 + eps_high)
        if dual_clip_c is None:
            dual = torch.zeros_like(low)
        else:
            if dual_clip_c <= 1.0:
                raise ValueError(f"dual_clip_c must be > 1, got {dual_clip_c}")
            # For A<0 the clipped surrogate is capped at -c*A, which binds exactly when ratio > c (ratio > c > 1-eps).
            dual = (adv_b < 0) & (ratio > dual_clip_c)
    # Only the unclipped branch differentiates through the ratio; elsewhere the ratio is detached, so a huge or
    # infinite ratio in a clipped position cannot produce 0 * inf = NaN in the backward pass.
    active = ~(low | high | dual)
    ratio_g = torch.exp(torch.where(active, log_ratio, log_ratio.detach()))
    return adv, eps_low, eps_high, ratio, ratio_g, low, high, dual


def clipped_surrogate(logps, old_logps, advantages, epsilon: float, epsilon_high: float | None,
                      dual_clip_c: float | None) -> ClipOutput:
    """``l = -min(rho*A, clip(rho, 1-eps_low, 1+eps_high)*A)`` per token, in the equivalent case form (same values and
    gradients as the min form), with verl's dual clip when ``dual_clip_c`` is set (see :func:`ppo`)."""
    import torch

    from posttrain.families.rl.common import ClipOutput

    adv, eps_low, eps_high, ratio, ratio_g, low, high, dual = prepare(
        logps, old_logps, advantages, epsilon, epsilon_high, dual_clip_c
    )
    loss = -ratio_g * adv
    loss = torch.where(low, -(1 - eps_low) * adv, loss)
    loss = torch.where(high, -(1 + eps_high) * adv, loss)
    if dual_clip_c is not None:
        loss = torch.where(dual, -dual_clip_c * adv, loss)
    return ClipOutput(loss, ratio, low, high, dual, torch.zeros_like(low))


@CLIPPINGS.register("ppo", doc="docs/methods/grpo_clipping.md#ppo-clip-higher", options_model=ClipRangeOptions,
                    check=check_clip_range)
def ppo(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
        opts) -> ClipOutput:
    """PPO clipped surrogate with clip-higher: ``l = -min(rho*A, clip(rho, 1-eps_low, 1+eps_high)*A)``.

    PPO (Schulman et al., arXiv 1707.06347); clip-higher from DAPO (arXiv 2503.14476); TRL ``loss_type`` in
    grpo/bnpo/dr_grpo/dapo. ``rho = exp(logps - old_logps)``, ``eps_low = epsilon``, ``eps_high = epsilon_high``
    (falls back to ``epsilon``). Gradient w.r.t. ``logps`` is ``-A*rho`` on unclipped tokens and exactly 0 on clipped
    ones; a token is clipped iff (A>0 and rho>1+eps_high) or (A<0 and rho<1-eps_low), so A<0 with rho>1+eps_high keeps
    its full gradient. ``dual_clip_c`` (verl only, off by default): for A<0 the loss is capped at ``-c*A``, so tokens
    with ``rho > c`` have zero gradient (TRL's ``delta`` gives the same when ``delta >= 1 + epsilon_high``). The mask
    is unused (a per-token rule).
    """
    return clipped_surrogate(logps, old_logps, advantages, opts.epsilon, opts.epsilon_high, opts.dual_clip_c)
