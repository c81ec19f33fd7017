"""The clipped surrogate of GRPO (DeepSeekMath, arXiv 2402.03300): the selected clipping rule on the selected
advantages, aggregated by the selected aggregation, plus this loss's own terms (their keys are its options): the KL to
the reference (k3, ``beta``), the entropy bonus (``entropy_coef``) and GPPO's SFT term (``sft_coef``).

docs/methods/grpo.md#advantages-aggregation-and-clipping. :func:`grpo_surrogate` is the registered entry: a pure
function of the training forward (:class:`posttrain.families.rl.forward.RLForward`) and the method's params.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from posttrain.families.rl.forward import CORRECT, ENTROPY, REF_LOGPS
from posttrain.families.rl.parts import AGGREGATIONS, CLIPPINGS, POLICY_LOSSES, PartOptions

if TYPE_CHECKING:
    import torch

    from posttrain.families.rl.forward import RLForward


class SurrogateOptions(PartOptions):
    """The clipped surrogate's own terms besides its parts: the GPPO SFT term, the KL to the reference, the entropy
    bonus."""

    sft_coef: float | None = Field(
        None, ge=0.0, description="GPPO's NLL term on correct rollouts; default 0.1 with gppo, else 0."
    )
    beta: float = Field(
        0.0, ge=0.0, description="KL (k3) coefficient against the reference: `ref_model` when given, else a frozen "
        "copy of the initial policy (the adapter-disabled base with peft); no reference is loaded when 0."
    )
    use_bias_correction_kl: bool = Field(
        False, description="Multiply the per-token k3 by the importance ratio exp(logp - old_logp) (DeepSeek-V3.2, "
        "arXiv 2512.02556; TRL's GRPOConfig default). false: plain k3 as in DeepSeekMath GRPO. Needs beta > 0."
    )
    entropy_coef: float | None = Field(
        None, ge=0.0, description="Entropy bonus (loss -= coef * token-mean entropy); default 1e-4 for psr/nsr/w_reinforce "
        "(the paper's), else 0."
    )


def surrogate_needs(opts) -> frozenset[str]:
    """The reference's log-probs with the KL term, a differentiable entropy with the bonus, the correct rows with
    GPPO's SFT term."""
    return frozenset({*((REF_LOGPS,) if opts.beta != 0.0 else ()), *((ENTROPY,) if opts.entropy_coef else ()),
                      *((CORRECT,) if opts.sft_coef > 0 else ())})


@POLICY_LOSSES.register("grpo", doc="docs/methods/grpo.md#advantages-aggregation-and-clipping",
                        options_model=SurrogateOptions, needs=surrogate_needs)
def grpo_surrogate(fwd: RLForward, opts) -> tuple[torch.Tensor, dict]:
    """The clipped surrogate of one micro-batch (DeepSeekMath, arXiv 2402.03300, Eq. 3; docs/methods/grpo.md).

    ``CLIPPINGS[opts.clipping]`` gives the per-token objective from the ratio and the advantages (times the vLLM
    sampling weights when given); ``beta * kl_k3`` (or its bias-corrected form) is added per token and
    ``AGGREGATIONS[opts.aggregation]`` reduces the sum over ``fwd.normalizer`` (a micro-batch-mean aggregation is
    divided by the accumulation steps; with ΔL's row weights the KL term is aggregated unweighted with dr_grpo,
    docs/methods/grpo_aggregation.md#kl-term-under-delta-l). Then GPPO's SFT term (``sft_coef``) is added and the
    entropy bonus (``entropy_coef``, a token mean / accumulation steps) subtracted.

    Metrics: ``policy_loss`` (the aggregated surrogate at full-batch scale), ``kl``, ``ppo_kl`` (token mean of
    old - new, verl's), the clip fractions (``clip_ratio/*``, token means; ``low_min`` / ``high_max``: the extreme
    per-row fractions over all processes, as TRL), ``gppo/sft_loss`` and ``delta_l/normalizer``.
    """
    from trl.trainer.utils import nanmax, nanmin

    from posttrain.distributed import TokenMean
    from posttrain.families.rl.aggregations.dr_grpo import dr_grpo

    logps, old, mask, ga, norm = fwd.logps, fwd.old_logps, fwd.mask, fwd.accumulation_steps, fwd.normalizer
    rule = CLIPPINGS[opts.clipping]
    clip = rule.fn(logps, old, fwd.advantages, mask, opts)
    per_token = clip.per_token_loss
    if fwd.sampling_weights is not None:
        per_token = per_token * fwd.sampling_weights
    kl = None
    if opts.beta != 0.0:
        # plain k3 (docs/methods/grpo.md#kl-term) unless method.use_bias_correction_kl (TRL's GRPOConfig default is on)
        kl = (kl_k3_bias_corrected(logps, fwd.ref_logps, old) if opts.use_bias_correction_kl
              else kl_k3(logps, fwd.ref_logps))
    metrics: dict = {}
    agg = AGGREGATIONS[opts.aggregation]
    if agg.row_weights:  # ΔL weights scale the surrogate only
        loss = agg.fn(per_token, mask, norm)
        metrics["delta_l/normalizer"] = float(norm.num_rows) / norm.num_processes / ga * norm.max_completion_length
        if kl is not None:
            loss = loss + opts.beta * dr_grpo(kl, mask, norm)
    else:
        loss = agg.fn(per_token if kl is None else per_token + opts.beta * kl, mask, norm)
        if agg.per_micro_batch:  # a mean over the micro-batch alone: its share of the accumulated batch
            loss = loss / ga
    # each micro-batch's loss is its share (~1/GA) of the accumulated batch's: log the full-batch value
    metrics["policy_loss"] = loss.detach() * ga
    if opts.sft_coef > 0:
        sft = gppo_sft_loss(logps, mask, fwd.correct, coef=opts.sft_coef, num_correct_tokens=fwd.num_correct_tokens,
                            num_processes=norm.num_processes)
        loss = loss + sft
        metrics["gppo/sft_loss"] = sft.detach() * ga
    if opts.entropy_coef:
        loss = loss - opts.entropy_coef * (fwd.entropy * mask).sum() / mask.sum().clamp(min=1.0) / ga
    if kl is not None:
        metrics["kl"] = TokenMean.of(kl, mask)
    metrics["ppo_kl"] = TokenMean.of(old - logps, mask)
    metrics["clip_ratio/low_mean"] = TokenMean.of(clip.low_clipped.float(), mask)
    metrics["clip_ratio/high_mean"] = TokenMean.of(clip.high_clipped.float(), mask)
    metrics["clip_ratio/region_mean"] = TokenMean.of((clip.low_clipped | clip.high_clipped).float(), mask)
    if opts.dual_clip_c is not None:
        metrics["clip_ratio/dual_mean"] = TokenMean.of(clip.dual_clipped.float(), mask)
    if rule.gradient_preserved:
        metrics["clip_ratio/gradient_preserved_mean"] = TokenMean.of(clip.gradient_preserved.float(), mask)
    per_row = mask.sum(-1)
    metrics["clip_ratio/low_min"] = nanmin(fwd.gather((clip.low_clipped.float() * mask).sum(-1) / per_row))
    metrics["clip_ratio/high_max"] = nanmax(fwd.gather((clip.high_clipped.float() * mask).sum(-1) / per_row))
    return loss, metrics


def kl_k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """k3 KL estimator per token, as TRL: ``exp(ref - logp) - (ref - logp) - 1`` (>= 0, no clamping).

    Schulman's k3 approximation (http://joschu.net/blog/kl-approx.html), used by GRPO (DeepSeekMath, arXiv
    2402.03300, Eq. 4); docs/methods/grpo.md#kl-term. Gradient w.r.t. ``logps`` is ``1 - exp(ref - logp)``. Add
    ``beta * kl_k3`` to the per-token loss before aggregation.
    """
    import torch

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
    import torch

    return kl_k3(logps, ref_logps) * torch.exp(logps - old_logps.detach())


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
    docs/methods/grpo_clipping.md#gppo-sft-term. ``correct``: ``[B]`` bool (reward == correct value). The term is
    neither clipped nor ratio-weighted; its gradient is ``-coef / N_pos`` on each correct token. ``num_correct_tokens``
    is the correct-token count of the optimizer step's global accumulated batch (``N_pos``; local count when None),
    divided by ``num_processes`` like the dapo normaliser. No correct rows (or ``coef == 0``) gives 0 with no NaN.
    """
    import torch

    m = mask.to(logps.dtype) * torch.as_tensor(correct, device=logps.device).to(logps.dtype).reshape(-1, 1)
    if num_correct_tokens is None:
        n = m.sum()
    else:
        n = torch.as_tensor(num_correct_tokens, dtype=logps.dtype, device=logps.device)
    n = n.clamp(min=1.0) / num_processes
    return coef * (-(logps * m).sum() / n)
