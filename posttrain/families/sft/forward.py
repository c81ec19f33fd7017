"""What an SFT-family objective receives and returns: the forward-pass needs, :class:`SFTForward`, and the registry of
objectives, :data:`SFT_LOSSES` (one entry per method, registered in ``methods/<name>.py``).

An objective is a pure ``fn(params, fwd) -> (loss, metrics)``: it never sees the trainer. Its entry declares
``needs(params)``, which of :data:`SFT_NEEDS` the trainer (``trainer.py``) computes into ``fwd`` besides the policy's
per-token log-probs of the labels. Importable without torch (objectives import it inside).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from posttrain.registry import Registry, SFTLossEntry

if TYPE_CHECKING:
    import torch

# What an objective can ask of the forward pass besides the policy's per-token log-probs (its entry's ``needs``); the
# trainer computes exactly these before calling it.
ANCHOR_KL = "anchor_kl"  # per-token KL between the policy's and the frozen anchor's next-token distributions (ASFT)
ALIGNED_SCORES = "aligned_scores"  # per-row scores of the aligned models, a data column (PoFT)
SFT_NEEDS = frozenset({ANCHOR_KL, ALIGNED_SCORES})


@dataclass(frozen=True)
class SFTForward:
    """What an SFT-family objective receives: the policy forward of one micro-batch (per-token tensors ``[B, T]``, one
    position per label token) and the needs its entry declared (None when not declared)."""

    logps: torch.Tensor  # log-prob of each label token under the policy, with grad
    mask: torch.Tensor  # 1 on the scored (label) tokens
    num_items: Any  # the accumulated optimizer step's label count (HF num_items_in_batch), or None: the micro-batch's
    anchor_kl: torch.Tensor | None = None  # ANCHOR_KL: [B, T], with grad (direction: params.kl_direction)
    aligned_scores: torch.Tensor | None = None  # ALIGNED_SCORES: [B] (or [B, M], one column per aligned model)


SFT_LOSSES: Registry[SFTLossEntry] = Registry("SFT-family loss", SFTLossEntry)
"""``method.name`` of the SFT family -> its loss on one policy forward. The entry's ``needs(params)`` says which of
:data:`SFT_NEEDS` the trainer computes; ``token_sum_loss`` that the loss is a token sum over ``num_items`` (scaled by
the number of processes as ``Trainer.compute_loss`` does), otherwise a mean over the micro-batch's rows."""
