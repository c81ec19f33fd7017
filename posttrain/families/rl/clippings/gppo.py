"""GPPO: gradient-preserving clipping (Klear-Reasoner, Su et al., arXiv 2508.07629, Eq. 11 and App. A.2 Eq. 17).

docs/methods/grpo_clipping.md#gppo. Its SFT term on correct rollouts (``sft_coef``, default 0.1 with gppo) is a term
of the surrogate (``policy_losses/grpo.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from posttrain.families.rl.clippings.ppo import ClipRangeOptions, check_clip_range
from posttrain.families.rl.parts import CLIPPINGS

if TYPE_CHECKING:
    import torch

    from posttrain.families.rl.common import ClipOutput


class GPPOOptions(ClipRangeOptions):
    gppo_beta1: float = Field(1.0, ge=0.0, description="gppo: gradient scale of low-clipped tokens.")
    gppo_beta2: float = Field(1.0, ge=0.0, description="gppo: gradient scale of high-clipped tokens.")
    gppo_only_high: bool = Field(False, description="gppo: keep the gradient of high-clipped tokens only.")


@CLIPPINGS.register("gppo", doc="docs/methods/grpo_clipping.md#gppo", options_model=GPPOOptions,
                    defaults={"epsilon_high": 0.28, "sft_coef": 0.1}, gradient_preserved=True, check=check_clip_range)
def gppo(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
         opts) -> ClipOutput:
    """GPPO gradient-preserving clipping (Klear-Reasoner, Su et al., arXiv 2508.07629, Eq. 11 and App. A.2 Eq. 17).

    With ``delta = exp(logps - old_logps)`` and the unit gradient carrier ``u = exp(logps - logps.detach())`` (value 1,
    gradient = grad logps; safe when delta is huge):

    =================================  ======================  ======================
    case                               loss value              d loss / d logps
    =================================  ======================  ======================
    A < 0 and delta < 1 - eps_low      -beta1*(1-eps_low)*u*A  -beta1*(1-eps_low)*A
    A > 0 and delta > 1 + eps_high     -beta2*(1+eps_high)*u*A -beta2*(1+eps_high)*A
    otherwise                          -delta*A                -delta*A
    =================================  ======================  ======================

    (``beta1`` = ``gppo_beta1``, ``beta2`` = ``gppo_beta2``.) With ``beta1 = beta2 = 1`` the forward equals ``ppo``
    (clip-higher) exactly; only the backward differs. ``gppo_only_high``: the low case stays hard-clipped (value
    ``-(1-eps_low)*A``, gradient 0). ``dual_clip_c`` (reference code only, not in the paper): for A<0, ``l <- min(l,
    -c*A)`` (zero gradient when delta > c). Defaults are the paper's: eps_low 0.2, eps_high 0.28, beta1 = beta2 = 1,
    no dual clip. The mask is unused.
    """
    import torch

    from posttrain.families.rl.clippings.ppo import prepare
    from posttrain.families.rl.common import ClipOutput

    dual_clip_c = opts.dual_clip_c
    adv, eps_low, eps_high, ratio, ratio_g, low, high, dual = prepare(
        logps, old_logps, advantages, opts.epsilon, opts.epsilon_high, dual_clip_c
    )
    u = torch.exp(logps - logps.detach())
    loss = -ratio_g * adv
    if opts.gppo_only_high:
        low_value = -(1 - eps_low) * adv
    else:
        low_value = -opts.gppo_beta1 * (1 - eps_low) * u * adv
    loss = torch.where(low, low_value, loss)
    loss = torch.where(high, -opts.gppo_beta2 * (1 + eps_high) * u * adv, loss)
    if dual_clip_c is not None:
        loss = torch.where(dual, -dual_clip_c * adv, loss)
    preserved = high | (torch.zeros_like(low) if opts.gppo_only_high else low)
    return ClipOutput(loss, ratio, low, high, dual, preserved)
