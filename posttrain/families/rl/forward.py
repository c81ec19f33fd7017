"""What a GRPO-family policy loss (``method.loss``) receives: :class:`RLForward`, the training forward of one
micro-batch of completions and what the loss's entry declared it needs (:data:`RL_NEEDS`).

A policy loss is a pure ``fn(fwd, opts) -> (loss, metrics)`` (``opts``: the method's params): it never sees the
trainer. Its entry (:class:`posttrain.registry.PolicyLossEntry`) declares ``needs(opts)``; the trainer
(:mod:`posttrain.families.rl.trainer`) fills exactly those fields besides the log-probs, the mask and the advantages.
``metrics`` maps names to numbers or :class:`~posttrain.distributed.TokenMean` (reduced over processes by the trainer).
Importable without torch (the losses import it inside).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from posttrain.families.rl.common import Normalizer, RowTargets

# What a policy loss can ask of the training forward besides the policy's per-token log-probs (its entry's ``needs``).
REF_LOGPS = "ref_logps"  # the reference's per-token log-probs (computed at generation, under no_grad)
ENTROPY = "entropy"  # per-token entropy of the policy with gradient (an entropy bonus)
CORRECT = "correct"  # which rows are correct, and the accumulated batch's count of their tokens (GPPO's SFT term)
ROWS = "rows"  # each row's label and group (a loss over whole groups: PACS)
RL_NEEDS = frozenset({REF_LOGPS, ENTROPY, CORRECT, ROWS})


@dataclass(frozen=True)
class RLForward:
    """One micro-batch's training forward (per-token tensors ``[B, T]`` over the completion tokens, row tensors
    ``[B]``) and the needs its loss declared (None when not declared).

    ``old_logps``: detached log-probs of the policy that generated the rows (``logps.detach()`` on-policy).
    ``mask``: the tokens that enter the loss (completion, tool and truncation masks, dropped rows removed).
    ``normalizer``: what an aggregation may divide by (:class:`~posttrain.families.rl.common.Normalizer`).
    ``accumulation_steps``: micro-batches per optimizer step (1 in evaluation). ``gather``: every process's rows of a
    tensor (``accelerator.gather``). ``sampling_weights``: the vLLM importance-sampling correction per token (None
    without it). ``num_correct_tokens``: the correct rows' tokens in the accumulated global batch (``CORRECT``).
    """

    logps: torch.Tensor
    old_logps: torch.Tensor
    mask: torch.Tensor
    advantages: torch.Tensor
    normalizer: Normalizer
    accumulation_steps: int
    gather: Callable[[torch.Tensor], torch.Tensor]
    sampling_weights: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None  # REF_LOGPS
    entropy: torch.Tensor | None = None  # ENTROPY, with gradient
    correct: torch.Tensor | None = None  # CORRECT, [B] float 0/1
    num_correct_tokens: torch.Tensor | float | None = None  # CORRECT
    rows: RowTargets | None = None  # ROWS
