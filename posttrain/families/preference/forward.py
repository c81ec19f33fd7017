"""What a preference-family objective receives and returns: the forward-pass needs, :class:`PreferenceForward`, and
the registry of objectives, :data:`PREFERENCE_LOSSES` (one entry per method, registered in ``methods/<name>.py``).

An objective is a pure ``fn(params, fwd) -> (loss, metrics)``: it never sees the trainer. Its entry declares
``needs(params)``, which of :data:`PREFERENCE_NEEDS` the trainer (``trainer.py``) computes into ``fwd`` besides the
policy's per-token log-probs. Importable without torch (objectives import it inside).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from posttrain.registry import PreferenceLossEntry, Registry

if TYPE_CHECKING:
    import torch

    from posttrain.distributed import TokenMean

# What an objective can ask of the forward pass besides the policy's per-token log-probs (its entry's ``needs``); the
# trainer computes exactly these before calling it.
REF_LOGPS = "ref_logps"  # summed reference log-probs of the chosen and rejected rows (live or precomputed)
LOG_ALIGNMENT = "log_alignment"  # WPO's per-token weight alignment (params.wpo_alignment)
TOKEN_KL = "token_kl"  # SparsePO: token KL to the reference, reference per-token log-probs and the token masks
PREFERENCE_NEEDS = frozenset({REF_LOGPS, LOG_ALIGNMENT, TOKEN_KL})


@dataclass(frozen=True)
class Collective:
    """The cross-process operations an objective's metrics and token means use: ``gather`` (every process's rows,
    ``accelerator.gather``) and ``token_share(mask)``, this process's share of every process's count of ``mask``'s
    tokens (None on one process: the local count)."""

    gather: Callable[[torch.Tensor], torch.Tensor]
    token_share: Callable[[torch.Tensor], torch.Tensor | None]


@dataclass(frozen=True)
class PreferenceForward:
    """What a preference objective receives: the policy forward of one batch of pairs (``[2B, ...]``, chosen rows
    first; per-token tensors are ``[2B, T-1]``, row ``b`` scoring token ``t+1`` of sequence ``b``) and the needs its
    entry declared (None when not declared)."""

    logps: torch.Tensor  # policy per-token log-probs, with grad
    mask: torch.Tensor  # shifted completion mask
    completion_mask: torch.Tensor  # unshifted [2B, T] (IPO's lengths)
    scored_mask: torch.Tensor  # every token the head scored (the prompt too with params.scores_prompt_tokens)
    chosen_logps: torch.Tensor  # summed over the completion [B]
    rejected_logps: torch.Tensor
    comm: Collective
    ref_chosen_logps: torch.Tensor | None = None  # REF_LOGPS, [B] each
    ref_rejected_logps: torch.Tensor | None = None
    log_alignment: torch.Tensor | None = None  # LOG_ALIGNMENT (None also with wpo_alignment: none)
    token_kl: torch.Tensor | None = None  # TOKEN_KL: KL(pi_ref || pi_theta) per token, with grad
    ref_token_logps: torch.Tensor | None = None  # TOKEN_KL: reference per-token log-probs
    token_masks: dict[str, torch.Tensor] | None = None  # TOKEN_KL: {"common"} or {"reward", "kl"}


PREFERENCE_LOSSES: Registry[PreferenceLossEntry] = Registry("preference loss", PreferenceLossEntry)
"""``method.name`` of the preference family -> its loss on one policy forward. The method's
:class:`~posttrain.methods.MethodInfo` says whether a reference model is used; its params say whether the policy's
last hidden states are needed (``needs_hidden_states``); the entry's ``needs(params)`` which of
:data:`PREFERENCE_NEEDS` the trainer computes."""


def chosen_nll(comm: Collective, logps: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, TokenMean]:
    """The SFT term of SimPO / ORPO, :func:`~posttrain.losses.preference.token_mean_nll` over the global micro-batch's
    tokens (each process divides by its share of all processes' token count), and its logged token mean."""
    import torch
    
    from posttrain.distributed import TokenMean
    from posttrain.losses.preference import sequence_logps, token_mean_nll

    nll = token_mean_nll(logps, mask, comm.token_share(mask))
    return nll, TokenMean(-sequence_logps(logps.detach(), mask).sum(), mask.to(torch.float32).sum())
