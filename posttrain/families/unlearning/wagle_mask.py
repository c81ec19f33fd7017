"""WAGLE: a weight-attribution mask that chooses which weights an unlearning run may change.

Jia et al., "WAGLE: Strategic Weight Attribution for Effective and Modular Unlearning in Large Language Models",
NeurIPS 2024 (arXiv 2410.17509); the method page is docs/methods/wagle.md.

Before unlearning, with the model at its initial weights ``theta`` (eval mode), ``g_f`` and ``g_r`` are the sums over
batches of the gradients of the mean token NLL of forget and retain batches. Every weight gets the score

    S = |(theta - g_r / gamma) * g_f|

(``gamma`` = the diagonal Hessian estimate; ``gamma -> inf`` gives the SNIP score ``|theta * g_f|``), and the
``k`` highest scores over all parameters together are selected (ties: the smaller flat index in
``named_parameters()`` order wins). Training multiplies every gradient by the mask, so only selected weights get a
gradient; :class:`FrozenWeights` restores the others after each optimizer step so that weight decay (or any
optimizer momentum) cannot move them either.
"""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Callable, Iterable

import torch


def keep_count(total: int, sparsity: float) -> int:
    """``k = floor((1 - sparsity) * total)``, computed on the decimal value of ``sparsity`` (no float fuzz:
    ``sparsity = 0.05`` of 100 weights keeps exactly 95)."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must lie in [0, 1], got {sparsity}")
    return int((Decimal(1) - Decimal(repr(float(sparsity)))) * total)  # int() floors a positive Decimal


def wagle_scores(theta: dict[str, torch.Tensor], grad_forget: dict[str, torch.Tensor],
                 grad_retain: dict[str, torch.Tensor] | None, gamma: float) -> dict[str, torch.Tensor]:
    """``S = |(theta - g_r / gamma) * g_f|`` per parameter, in fp32 (``gamma = inf`` or no ``g_r``: ``|theta g_f|``)."""
    scores = {}
    for name, value in theta.items():
        gf = grad_forget[name].float()
        base = value.detach().float()
        if grad_retain is not None and math.isfinite(gamma):
            base = base - grad_retain[name].float() / gamma
        scores[name] = (base * gf).abs()
    return scores


def top_k_mask(scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Boolean masks (True = updated) selecting the ``k`` largest scores over all tensors together, in dict order;
    among equal scores the smaller flat index wins (stable sort)."""
    names = list(scores)
    flat = torch.cat([scores[n].reshape(-1).float().cpu() for n in names])
    if not 0 <= k <= flat.numel():
        raise ValueError(f"k must lie in [0, {flat.numel()}], got {k}")
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    if k:
        order = torch.sort(flat, descending=True, stable=True).indices
        keep[order[:k]] = True
    out, offset = {}, 0
    for name in names:
        n = scores[name].numel()
        out[name] = keep[offset:offset + n].reshape(scores[name].shape).to(scores[name].device)
        offset += n
    return out


def wagle_mask(theta: dict[str, torch.Tensor], grad_forget: dict[str, torch.Tensor],
               grad_retain: dict[str, torch.Tensor] | None, gamma: float, sparsity: float) -> dict[str, torch.Tensor]:
    """The WAGLE mask: the top ``floor((1 - sparsity) N)`` of :func:`wagle_scores` (N = all weights)."""
    scores = wagle_scores(theta, grad_forget, grad_retain, gamma)
    total = sum(s.numel() for s in scores.values())
    return top_k_mask(scores, keep_count(total, sparsity))


def summed_gradients(model: torch.nn.Module, batches: Iterable, loss_fn: Callable) -> dict[str, torch.Tensor]:
    """``sum_b grad loss_fn(model, b)`` over ``batches`` for every trainable parameter, accumulated in fp32, with the
    model in eval mode (dropout off). Leaves the weights, ``.grad`` (zeroed: ``None``) and the train/eval mode as they
    were. A NaN/inf gradient raises ``ValueError`` naming the parameter."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in named}
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            for _, p in named:
                p.grad = None
            loss_fn(model, batch).backward()
            for n, p in named:
                if p.grad is not None:
                    acc[n] += p.grad.float()
    finally:
        for _, p in named:
            p.grad = None
        model.train(was_training)
    for n, g in acc.items():
        if not bool(torch.isfinite(g).all()):
            raise ValueError(f"the WAGLE scoring gradient of {n} holds NaN/inf")
    return acc


def selected_fraction_by_module(masks: dict[str, torch.Tensor]) -> dict[str, float]:
    """Fraction of selected weights per module type (the last name part before ``weight``/``bias``: q_proj,
    gate_proj, embed_tokens, norm, lm_head, ...), for the log."""
    kept: dict[str, int] = {}
    total: dict[str, int] = {}
    for name, mask in masks.items():
        parts = name.split(".")
        kind = parts[-2] if len(parts) > 1 else parts[-1]
        kind = "norm" if "norm" in kind else kind
        kept[kind] = kept.get(kind, 0) + int(mask.sum())
        total[kind] = total.get(kind, 0) + mask.numel()
    return {k: kept[k] / total[k] for k in sorted(total)}


class FrozenWeights:
    """The unselected entries of each parameter, saved once; :meth:`restore` writes them back bit for bit (after an
    optimizer step: undoes weight decay and any momentum on frozen weights). Memory: one copy of the frozen
    entries."""

    def __init__(self, params: dict[str, torch.nn.Parameter], masks: dict[str, torch.Tensor]):
        self.items = []
        for name, param in params.items():
            frozen = ~masks[name]
            if bool(frozen.any()):
                self.items.append((param, frozen, param.detach()[frozen].clone()))

    @torch.no_grad()
    def restore(self) -> None:
        for param, frozen, values in self.items:
            param.masked_scatter_(frozen, values)
