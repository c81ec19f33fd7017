"""The WAGLE weight mask in the unlearning trainer (``method.mask: wagle``; docs/methods/wagle.md).

Built once when the trainer is built, from the initial weights (also on ``--resume``: the run's base model is loaded
before the checkpoint, so the same mask comes out). The math is :mod:`posttrain.families.unlearning.wagle_mask`.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from posttrain.errors import UserError
from posttrain.families.unlearning.wagle_mask import (
    FrozenWeights,
    keep_count,
    selected_fraction_by_module,
    summed_gradients,
    wagle_mask,
)

logger = logging.getLogger("posttrain")


def _mean_token_nll(model, batch) -> torch.Tensor:
    """HF's causal-LM loss: mean next-token cross-entropy over the batch's answer tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=-100)


class WagleMask:
    """Scores the trainer's model, selects the weights, and attaches the gradient mask and the frozen-weight restore
    to the optimizer (:meth:`attach`)."""

    def __init__(self, trainer, forget_rows: list, retain_rows: list, collator_cls):
        """``collator_cls``: the unlearning trainer's ForgetRetainCollator (passed in: this module sits below it)."""
        params = trainer.params
        model = trainer.model
        tok = trainer.processing_class
        pad = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0
        collate = collator_cls(pad)._pad
        size = trainer.args.per_device_train_batch_size
        weights = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if keep_count(weights, params.mask_sparsity) == 0:
            raise UserError(f"method.mask_sparsity: {params.mask_sparsity} freezes every one of this model's {weights} "
                            "weights (floor((1 - mask_sparsity) N) = 0), so the run could not change anything; lower it")
        batches = math.ceil(len(forget_rows) / size)
        if params.mask_num_batches is not None:
            batches = min(batches, params.mask_num_batches)
        device = next(model.parameters()).device

        def chunks(rows, cycle: bool):
            for b in range(batches):
                idx = [(b * size + j) % len(rows) for j in range(size)] if cycle else \
                    list(range(b * size, min((b + 1) * size, len(rows))))
                yield {k: v.to(device) for k, v in collate([rows[i] for i in idx]).items()}

        g_f = summed_gradients(model, chunks(forget_rows, cycle=False), _mean_token_nll)
        g_r = summed_gradients(model, chunks(retain_rows, cycle=True), _mean_token_nll)
        named = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.masks = wagle_mask({n: p.detach() for n, p in named.items()}, g_f, g_r, params.mask_gamma,
                                params.mask_sparsity)
        del g_f, g_r
        self.params = named
        total = sum(m.numel() for m in self.masks.values())
        selected = sum(int(m.sum()) for m in self.masks.values())
        self.metrics = {"wagle/ratio": selected / total if total else 0.0, "wagle/num_selected": float(selected)}
        fractions = selected_fraction_by_module(self.masks)
        logger.info("method.mask: wagle: %d of %d weights may change (%.4f; %d forget and %d retain batches scored, "
                    "gamma=%g); selected fraction per module: %s", selected, total, self.metrics["wagle/ratio"],
                    batches, batches, params.mask_gamma, ", ".join(f"{k} {v:.3f}" for k, v in fractions.items()))
        self.before_clip = params.mask_before_clip
        self.frozen = None if params.mask_decay_masked else FrozenWeights(named, self.masks)
        self._handles = []
        if self.before_clip:  # every backward pass: the global clip then sees only the selected coordinates
            for name, param in named.items():
                mask = self.masks[name].to(param.dtype)
                self._handles.append(param.register_hook(lambda g, m=mask: g * m))

    @torch.no_grad()
    def mask_gradients(self) -> None:
        for name, param in self.params.items():
            if param.grad is not None:
                param.grad.mul_(self.masks[name])

    def attach(self, optimizer) -> None:
        """Mask the gradients just before each optimizer step (after HF's clip, the authors' order) unless they were
        masked in the backward pass, and restore the frozen weights after it (unless ``mask_decay_masked``)."""
        if not self.before_clip:
            optimizer.register_step_pre_hook(lambda *_: self.mask_gradients())
        if self.frozen is not None:
            optimizer.register_step_post_hook(lambda *_: self.frozen.restore())
