"""Per-token policy-gradient objectives: PPO clipping, GPPO gradient-preserving clipping, GPPO's SFT term, KL k3.

Conventions: ``logps`` ``[B, T]`` carries the gradient; ``old_logps`` and ``ref_logps`` ``[B, T]`` are detached
(pass ``logps.detach()`` as ``old_logps`` on-policy, as TRL does when it stores none); ``advantages`` is ``[B]``
(broadcast over tokens) or ``[B, T]``. The returned per-token loss is *not* masked or aggregated: feed it (plus
``beta * kl_k3(...)`` if wanted) to :mod:`posttrain.rl.aggregation`.

* :func:`ppo_clip` -- clipped surrogate with clip-higher (PPO, arXiv 1707.06347; DAPO clip-higher, arXiv 2503.14476;
  docs/methods/grpo_clipping.md#ppo-clip-higher), optional verl dual clip.
* :func:`gppo_clip` -- GPPO (Klear-Reasoner, arXiv 2508.07629, Eq. 11 / App. A.2 Eq. 17; docs/methods/grpo_clipping.md#gppo).
* :func:`gppo_sft_loss` -- GPPO's NLL term on correct rollouts (arXiv 2508.07629 Sec. 3.2.3; docs/methods/grpo_clipping.md#gppo-sft-term).
* :func:`gspo_clip` -- GSPO: the PPO clip on the length-normalised sequence ratio (arXiv 2507.18071;
  docs/methods/gspo.md#objective).
* :func:`cispo_clip` -- CISPO: REINFORCE weighted by the clipped, detached token ratio (MiniMax-M1, arXiv 2506.13585;
  docs/methods/cispo.md#objective).
* :func:`kl_k3` -- the k3 KL estimator of GRPO (docs/methods/grpo.md#kl-term).
* :func:`kl_k3_bias_corrected` -- k3 times the importance ratio (DeepSeek-V3.2; TRL ``use_bias_correction_kl``).
* :func:`clip_metrics` -- TRL-named clip fractions from a :class:`ClipOutput`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from posttrain.rl.parts import CLIPPINGS

__all__ = [
    "CLIPPINGS",
    "POLICY_OBJECTIVES",
    "ClipOutput",
    "cispo_clip",
    "clip_metrics",
    "gppo_clip",
    "gspo_clip",
    "gppo_sft_loss",
    "kl_k3",
    "kl_k3_bias_corrected",
    "policy_loss",
    "ppo_clip",
]


@dataclass
class ClipOutput:
    """Per-token objective plus masks for metrics (all ``[B, T]``).

    * ``per_token_loss``: unmasked, unaggregated loss (carries the gradient).
    * ``ratio``: detached importance ratio ``exp(logps - old_logps)``.
    * ``low_clipped``: ``A < 0`` and ``ratio < 1 - epsilon`` (TRL ``is_low_clipped``).
    * ``high_clipped``: ``A > 0`` and ``ratio > 1 + epsilon_high`` (TRL ``is_high_clipped``).
    * ``dual_clipped``: ``A < 0`` and ``ratio > dual_clip_c`` (verl ``pg_clipfrac_lower``); all False without dual clip.
    * ``gradient_preserved``: clipped tokens that still receive a gradient (GPPO); all False for PPO.
    """

    per_token_loss: torch.Tensor
    ratio: torch.Tensor
    low_clipped: torch.Tensor
    high_clipped: torch.Tensor
    dual_clipped: torch.Tensor
    gradient_preserved: torch.Tensor


def _prepare(logps, old_logps, advantages, epsilon, epsilon_high, dual_clip_c):
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


def ppo_clip(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    dual_clip_c: float | None = None,
) -> ClipOutput:
    """PPO clipped surrogate with clip-higher: ``l = -min(rho*A, clip(rho, 1-eps_low, 1+eps_high)*A)``.

    PPO (Schulman et al., arXiv 1707.06347); clip-higher from DAPO (arXiv 2503.14476); TRL ``loss_type`` in
    grpo/bnpo/dr_grpo/dapo. See docs/methods/grpo_clipping.md#ppo-clip-higher: ``rho = exp(logps - old_logps)``, ``eps_low = epsilon``,
    ``eps_high = epsilon_high`` (falls back to ``epsilon``). Gradient w.r.t. ``logps`` is ``-A*rho`` on unclipped
    tokens and exactly 0 on clipped ones; a token is clipped iff (A>0 and rho>1+eps_high) or (A<0 and rho<1-eps_low),
    so A<0 with rho>1+eps_high keeps its full gradient.

    ``dual_clip_c`` (verl only, off by default): for A<0 the loss is capped at ``-c*A``, so tokens with ``rho > c``
    have zero gradient. (TRL's ``delta`` option gives the same result as ``dual_clip_c=delta`` when
    ``delta >= 1 + epsilon_high``.) Computed in the equivalent case form (same values and gradients as the min form).
    """
    adv, eps_low, eps_high, ratio, ratio_g, low, high, dual = _prepare(
        logps, old_logps, advantages, epsilon, epsilon_high, dual_clip_c
    )
    loss = -ratio_g * adv
    loss = torch.where(low, -(1 - eps_low) * adv, loss)
    loss = torch.where(high, -(1 + eps_high) * adv, loss)
    if dual_clip_c is not None:
        loss = torch.where(dual, -dual_clip_c * adv, loss)
    return ClipOutput(loss, ratio, low, high, dual, torch.zeros_like(low))


def gppo_clip(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    epsilon: float = 0.2,
    epsilon_high: float | None = 0.28,
    beta1: float = 1.0,
    beta2: float = 1.0,
    only_high: bool = False,
    dual_clip_c: float | None = None,
) -> ClipOutput:
    """GPPO gradient-preserving clipping (Klear-Reasoner, Su et al., arXiv 2508.07629, Eq. 11 and App. A.2 Eq. 17).

    See docs/methods/grpo_clipping.md#gppo. With ``delta = exp(logps - old_logps)`` and the unit gradient carrier
    ``u = exp(logps - logps.detach())`` (value 1, gradient = grad logps; safe when delta is huge):

    =================================  ======================  ======================
    case                               loss value              d loss / d logps
    =================================  ======================  ======================
    A < 0 and delta < 1 - eps_low      -beta1*(1-eps_low)*u*A  -beta1*(1-eps_low)*A
    A > 0 and delta > 1 + eps_high     -beta2*(1+eps_high)*u*A -beta2*(1+eps_high)*A
    otherwise                          -delta*A                -delta*A
    =================================  ======================  ======================

    With ``beta1 = beta2 = 1`` the forward equals :func:`ppo_clip` (clip-higher) exactly; only the backward differs.
    ``only_high``: the low case stays hard-clipped (value ``-(1-eps_low)*A``, gradient 0).
    ``dual_clip_c`` (reference code only, not in the paper): for A<0, ``l <- min(l, -c*A)`` (zero gradient when
    delta > c). Defaults are the paper's: eps_low 0.2, eps_high 0.28, beta1 = beta2 = 1, no dual clip.
    """
    adv, eps_low, eps_high, ratio, ratio_g, low, high, dual = _prepare(
        logps, old_logps, advantages, epsilon, epsilon_high, dual_clip_c
    )
    u = torch.exp(logps - logps.detach())
    loss = -ratio_g * adv
    low_value = -(1 - eps_low) * adv if only_high else -beta1 * (1 - eps_low) * u * adv
    loss = torch.where(low, low_value, loss)
    loss = torch.where(high, -beta2 * (1 + eps_high) * u * adv, loss)
    if dual_clip_c is not None:
        loss = torch.where(dual, -dual_clip_c * adv, loss)
    preserved = high | (torch.zeros_like(low) if only_high else low)
    return ClipOutput(loss, ratio, low, high, dual, preserved)


def gspo_clip(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon: float = 3e-4,
    epsilon_high: float | None = 4e-4,
    dual_clip_c: float | None = None,
) -> ClipOutput:
    """GSPO: :func:`ppo_clip` on the sequence ratio ``s_i = exp((1/|y_i|) sum_t mask * (logps - old_logps))``.

    Zheng et al., "Group Sequence Policy Optimization", arXiv 2507.18071, Eqs. 5-7 (docs/methods/gspo.md#objective);
    TRL ``importance_sampling_level="sequence"``. Every token of row ``i`` gets the row's loss
    ``-min(s_i*A_i, clip(s_i, 1-eps_low, 1+eps_high)*A_i)`` (the ``grpo`` aggregation then gives the paper's per-sequence
    mean), and clipping acts on whole sequences. Gradient w.r.t. ``logps[i, t]`` on an unclipped row:
    ``-A_i * s_i / |y_i|`` (scaled by the aggregation). ``ratio`` and the clip masks are the row's, broadcast over its
    tokens; rows with no mask token have ``s_i = 1``. Defaults are the paper's ranges 3e-4 / 4e-4.
    """
    m = mask.to(logps.dtype)
    seq = ((logps - old_logps.detach()) * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)
    seq = seq.expand_as(logps)
    return ppo_clip(seq, torch.zeros_like(seq), advantages, epsilon, epsilon_high, dual_clip_c)


def cispo_clip(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    weight_max: float = 5.0,
    weight_min: float | None = None,
) -> ClipOutput:
    """CISPO: ``l = -sg(clip(rho, weight_min, weight_max)) * A * logps`` per token (every token keeps a gradient).

    MiniMax-M1, arXiv 2506.13585, Eqs. 4-5 (docs/methods/cispo.md#objective): the importance weight
    ``rho = exp(logps - old_logps)`` is clipped to ``[1 - eps_low^IS, 1 + eps_high^IS]`` = [``weight_min``,
    ``weight_max``] and detached; ``weight_min=None`` is no lower bound, as the paper and TRL's ``loss_type="cispo"``
    (``clamp(max=epsilon_high)``) do. Gradient w.r.t. ``logps``: ``-w * A``. ``high_clipped`` / ``low_clipped``: tokens
    whose weight was truncated from above / below (any sign of A); all of them are ``gradient_preserved``.
    """
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


def gppo_sft_loss(
    logps: torch.Tensor,
    mask: torch.Tensor,
    correct: torch.Tensor,
    coef: float = 0.1,
    num_correct_tokens: torch.Tensor | float | None = None,
    num_processes: int = 1,
) -> torch.Tensor:
    """GPPO's SFT (NLL) term on correct rollouts: ``coef * L_LM`` with
    ``L_LM = -(1 / sum_{j in Phi} T_j) sum_{j in Phi} sum_t log pi(a_t | s_t)``.

    Klear-Reasoner, arXiv 2508.07629, Sec. 3.2.3 (Eq. 13 prints pi; the code and this function use log pi);
    docs/methods/grpo_clipping.md#gppo-sft-term. ``correct``: ``[B]`` bool (reward == correct value). The term is neither clipped nor
    ratio-weighted; its gradient is ``-coef / N_pos`` on each correct token. ``num_correct_tokens`` is the
    correct-token count of the optimizer step's global accumulated batch (``N_pos``; local count when None), divided
    by ``num_processes`` like the dapo normaliser. No correct rows (or ``coef == 0``) gives 0 with no NaN.
    """
    m = mask.to(logps.dtype) * torch.as_tensor(correct, device=logps.device).to(logps.dtype).reshape(-1, 1)
    if num_correct_tokens is None:
        n = m.sum()
    else:
        n = torch.as_tensor(num_correct_tokens, dtype=logps.dtype, device=logps.device)
    n = n.clamp(min=1.0) / num_processes
    return coef * (-(logps * m).sum() / n)


def kl_k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """k3 KL estimator per token, as TRL: ``exp(ref - logp) - (ref - logp) - 1`` (>= 0, no clamping).

    Schulman's k3 approximation (http://joschu.net/blog/kl-approx.html), used by GRPO (DeepSeekMath, arXiv
    2402.03300, Eq. 4); docs/methods/grpo.md#kl-term. Gradient w.r.t. ``logps`` is ``1 - exp(ref - logp)``. Add
    ``beta * kl_k3`` to the per-token loss before aggregation.
    """
    d = ref_logps.detach() - logps
    return torch.exp(d) - d - 1


def kl_k3_bias_corrected(logps: torch.Tensor, ref_logps: torch.Tensor, old_logps: torch.Tensor) -> torch.Tensor:
    """``kl_k3(logps, ref) * rho`` with ``rho = exp(logps - old_logps)`` (differentiable, as TRL 1.16's
    ``use_bias_correction_kl``).

    DeepSeek-V3.2 (arXiv 2512.02556, Eq. 9): weighting k3 by the importance ratio makes its gradient the unbiased
    reverse-KL gradient off-policy. On-policy (``old_logps = logps.detach()``) the value equals :func:`kl_k3` but the
    gradient does not: ``d/dlogp = rho * (k3 + 1 - exp(ref - logp))``, i.e. ``k3 + 1 - exp(ref - logp)`` at ``rho = 1``.
    Not GRPO's default (plain k3, docs/methods/grpo.md#kl-term); selected by ``method.use_bias_correction_kl: true``.
    """
    return kl_k3(logps, ref_logps) * torch.exp(logps - old_logps.detach())


def clip_metrics(out: ClipOutput, mask: torch.Tensor) -> dict[str, float]:
    """Masked token fractions with TRL's names (``clip_ratio/low_mean``, ``high_mean``, ``region_mean``) plus
    ``clip_ratio/dual_mean`` and ``clip_ratio/gradient_preserved_mean`` (local micro-batch, not reduced)."""
    m = mask.to(torch.float32)
    n = m.sum().clamp(min=1.0)

    def frac(x: torch.Tensor) -> float:
        return float((x.to(torch.float32) * m).sum() / n)

    return {
        "clip_ratio/low_mean": frac(out.low_clipped),
        "clip_ratio/high_mean": frac(out.high_clipped),
        "clip_ratio/region_mean": frac(out.low_clipped | out.high_clipped),
        "clip_ratio/dual_mean": frac(out.dual_clipped),
        "clip_ratio/gradient_preserved_mean": frac(out.gradient_preserved),
    }


# the ``method.clipping`` entries (options, keys, defaults, checks) are registered in :mod:`posttrain.rl.parts`

POLICY_OBJECTIVES = CLIPPINGS.names()


def policy_loss(
    name: str, logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, **options: Any
) -> ClipOutput:
    """Dispatch a registered clipping rule (:data:`CLIPPINGS`): ``"ppo"`` -> :func:`ppo_clip`, ``"gppo"`` ->
    :func:`gppo_clip`, ``"gspo"`` -> :func:`gspo_clip` (needs ``mask``), ``"cispo"`` -> :func:`cispo_clip` (options
    passed through; the ``gppo_`` / ``cispo_`` prefix of config names such as ``gppo_beta1`` or ``cispo_weight_max`` is
    accepted)."""
    options = {k.removeprefix("gppo_").removeprefix("cispo_"): v for k, v in options.items()}
    if name not in CLIPPINGS:
        raise ValueError(f"unknown policy objective {name!r}; known: {POLICY_OBJECTIVES}")
    return CLIPPINGS[name].fn(logps, old_logps, advantages, **options)
