"""The clipped surrogate of GRPO (DeepSeekMath, arXiv 2402.03300): the selected clipping rule on the selected
advantages, aggregated by the selected aggregation, plus this loss's own terms (their keys are its options): the KL to
the reference (k3, ``beta``), the entropy bonus (``entropy_coef``) and GPPO's SFT term (``sft_coef``).

docs/methods/grpo.md#advantages-aggregation-and-clipping. The trainer composes the surrogate from the parts
(:meth:`posttrain.families.rl.trainer.PosttrainGRPOTrainer._compute_loss`), so the entry has no function; the terms'
math is here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from posttrain.families.rl.parts import POLICY_LOSSES, PartOptions

if TYPE_CHECKING:
    import torch


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


# the surrogate has no function of its own: the trainer composes it from the selected parts
POLICY_LOSSES.add("grpo", None, doc="docs/methods/grpo.md#advantages-aggregation-and-clipping",
                  options_model=SurrogateOptions)


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
