"""CISPO: REINFORCE weighted by the clipped, detached importance ratio (MiniMax-M1, arXiv 2506.13585; TRL
``loss_type="cispo"``).

docs/methods/cispo.md#objective.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from posttrain.families.rl.parts import CLIPPINGS, PartOptions

if TYPE_CHECKING:
    import torch

    from posttrain.families.rl.common import ClipOutput


class CISPOOptions(PartOptions):
    cispo_weight_max: float = Field(
        5.0, gt=0.0, description="cispo: upper bound of the importance weight, 1 + eps_high^IS (TRL's epsilon_high for "
        "loss_type cispo).")
    cispo_weight_min: float | None = Field(
        None, ge=0.0, description="cispo: lower bound of the importance weight, 1 - eps_low^IS; null: none (the paper).")


def check_cispo_bounds(p) -> str | None:
    """CISPO's importance-weight bounds: ``cispo_weight_min`` (when given) at most ``cispo_weight_max``."""
    if p.cispo_weight_min is not None and p.cispo_weight_min > p.cispo_weight_max:
        return (f"method.cispo_weight_min: {p.cispo_weight_min} is above method.cispo_weight_max "
                f"({p.cispo_weight_max})")
    return None


@CLIPPINGS.register("cispo", doc="docs/methods/cispo.md#objective", options_model=CISPOOptions, gradient_preserved=True,
                    check=check_cispo_bounds)
def cispo(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
          opts) -> ClipOutput:
    """CISPO: ``l = -sg(clip(rho, weight_min, weight_max)) * A * logps`` per token (every token keeps a gradient).

    MiniMax-M1, arXiv 2506.13585, Eqs. 4-5: the importance weight ``rho = exp(logps - old_logps)`` is clipped to ``[1 -
    eps_low^IS, 1 + eps_high^IS]`` = [``cispo_weight_min``, ``cispo_weight_max``] and detached; no lower bound
    (``cispo_weight_min: null``) as the paper and TRL's ``loss_type="cispo"`` (``clamp(max=epsilon_high)``). Gradient
    w.r.t. ``logps``: ``-w * A``. ``high_clipped`` / ``low_clipped``: tokens whose weight was truncated from above /
    below (any sign of A); all of them are ``gradient_preserved``. The mask is unused.
    """
    import torch

    from posttrain.families.rl.common import ClipOutput

    weight_max, weight_min = opts.cispo_weight_max, opts.cispo_weight_min
    adv = torch.as_tensor(advantages, device=logps.device).detach().to(logps.dtype)
    if adv.dim() == 1:
        adv = adv.unsqueeze(1)
    with torch.no_grad():
        ratio = torch.exp(logps - old_logps.detach())
        weight = ratio.clamp(min=weight_min, max=weight_max)
        high = ratio > weight_max
        low = ratio < weight_min if weight_min is not None else torch.zeros_like(high)
    loss = -weight * adv.expand_as(logps) * logps
    return ClipOutput(loss, ratio, low, high, torch.zeros_like(high), low | high)
