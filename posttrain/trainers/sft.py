"""The SFT-family trainer: a thin subclass of TRL's ``SFTTrainer``.

TRL does the data handling (prompt/completion and messages formats, tokenisation, completion masks, collation) and
patches the model with a fused LM head, so ``model(..., fused_lm_head=True)`` returns per-token log-probs tile by
tile without materialising the logits. This trainer calls that forward once per batch and hands the log-probs to the
pure losses in :mod:`posttrain.losses.sft`.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint
from trl import SFTTrainer

from posttrain.trainers.common import AtomicCheckpointMixin, CountedSFTTruncationMixin
from posttrain.losses.sft import asft_anchored_loss, dft_loss, nll_loss, poft_loss, token_kl

POFT_SCORE_COLUMN = "poft_ref_score"
KL_CHUNK = 1024  # label positions per tile when full-vocab logits are needed (the ASFT anchor)


def _unwrap(model):
    from peft import PeftModel

    while hasattr(model, "module") and not isinstance(model, torch.nn.Linear):
        model = model.module
    return model.get_base_model() if isinstance(model, PeftModel) else model


class _ExtraColumnsCollator:
    """Adds float columns (per-example scalars such as PoFT scores) to a TRL collator's batch."""

    def __init__(self, base, columns: list[str]):
        self.base, self.columns = base, columns

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.base(examples)
        for col in self.columns:
            batch[col] = torch.tensor([float(e[col]) for e in examples], dtype=torch.float32)
        return batch


class PosttrainSFTTrainer(AtomicCheckpointMixin, CountedSFTTruncationMixin, SFTTrainer):
    """SFT, DFT, Anchored SFT and PoFT on top of ``trl.SFTTrainer``.

    Args:
        method: ``sft`` | ``dft`` | ``asft_anchored`` | ``poft``.
        params: the method's hyperparameters (:mod:`posttrain.methods`).
        anchor_model: frozen anchor for ``asft_anchored``; ``None`` with a PEFT policy uses the adapter-disabled base.
    """

    def __init__(self, *args, method: str, params, anchor_model=None, **kwargs):
        self.method = method
        self.params = params
        super().__init__(*args, **kwargs)
        self.anchor_model = anchor_model
        if anchor_model is not None:
            anchor_model.eval().requires_grad_(False)
            self.anchor_model = self.accelerator.prepare_model(anchor_model, evaluation_mode=True)
        if method == "poft":
            self.data_collator = _ExtraColumnsCollator(self.data_collator, [POFT_SCORE_COLUMN])
            # PoFT's loss is a mean over the micro-batch's sequences (not a token sum over num_items_in_batch): HF must
            # divide it by the accumulation steps, or gradient accumulation multiplies loss and gradient by them.
            self.loss_is_scaled_for_ga = False

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self.method == "poft" and POFT_SCORE_COLUMN not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, POFT_SCORE_COLUMN]

    # ---------------------------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        aligned_scores = inputs.pop(POFT_SCORE_COLUMN, None)
        inputs["use_cache"] = False

        hidden: dict[str, torch.Tensor] = {}
        hook = None
        if self.method == "asft_anchored":
            backbone = _unwrap(model).base_model
            hook = backbone.register_forward_hook(lambda m, a, out: hidden.__setitem__("h", out.last_hidden_state))
        try:
            outputs = model(**inputs, fused_lm_head=True)
        finally:
            if hook is not None:
                hook.remove()
        logps, mask = outputs.log_probs, outputs.label_mask
        metrics: dict[str, torch.Tensor] = {}

        if self.method == "sft":
            loss = nll_loss(logps, mask, num_items_in_batch)
        elif self.method == "dft":
            loss = dft_loss(logps, mask, num_items_in_batch)
            metrics["nll"] = nll_loss(logps.detach(), mask)
        elif self.method == "asft_anchored":
            kl = self._anchor_kl(model, inputs, hidden["h"][:, :-1], mask)
            loss = asft_anchored_loss(logps, kl, mask, self.params.asft_kl_coef, num_items_in_batch)
            denom = mask.sum().clamp(min=1)
            metrics["dft_loss"] = dft_loss(logps.detach(), mask)
            metrics["kl"] = (kl.detach() * mask).sum() / denom
            metrics["nll"] = nll_loss(logps.detach(), mask)
        elif self.method == "poft":
            # `poft_target_tokens: all` is handled by the config (completion_only_loss=False): every label counts.
            out = poft_loss(logps, mask, aligned_scores.to(logps.device), self.params.poft_beta, self.params.poft_gamma)
            loss = out.loss
            metrics["ce_loss"] = -out.reward_target.detach().mean()
            metrics["poft/reward_target"] = out.reward_target.detach().mean()
            metrics["poft/reward_aligned"] = out.reward_aligned.mean()
            margin = (out.reward_target - out.reward_aligned).detach()
            metrics["poft/margin"] = margin.mean()
            metrics["poft/accuracy"] = (margin > 0).float().mean()
            metrics["poft/tau_mean"] = out.tau.mean()
        else:  # pragma: no cover - guarded by the registry
            raise ValueError(f"unknown SFT-family method {self.method!r}")

        # Like Trainer.compute_loss: num_items_in_batch counts every rank's tokens and DDP averages gradients.
        if (
            self.method != "poft"
            and self.args.average_tokens_across_devices
            and num_items_in_batch is not None
        ):
            loss = loss * self.accelerator.num_processes

        self._log_token_metrics(mode, outputs, metrics)
        return (loss, outputs) if return_outputs else loss

    def _log_token_metrics(self, mode: str, outputs, extra: dict[str, torch.Tensor]) -> None:
        gather = self.accelerator.gather_for_metrics
        num_valid = gather(outputs.label_mask.sum()).sum()
        if outputs.entropy is not None:
            entropy = gather(outputs.entropy.detach().sum()).sum()
            self._metrics[mode]["entropy"].append((entropy / num_valid).item() if num_valid > 0 else 0.0)
        if outputs.is_top1 is not None:
            correct = gather(outputs.is_top1.sum()).sum()
            self._metrics[mode]["mean_token_accuracy"].append((correct / num_valid).item() if num_valid > 0 else 0.0)
        for name, value in extra.items():
            self._metrics[mode][name].append(gather(value.detach().reshape(1)).float().mean().item())

    def _anchor_kl(self, model, inputs, policy_hidden, mask) -> torch.Tensor:
        """Per-token KL between policy and anchor next-token distributions, on label positions only, in tiles."""
        policy = _unwrap(model)
        head = policy.get_output_embeddings()
        with torch.no_grad():
            if self.anchor_model is not None:
                anchor = _unwrap(self.anchor_model)
                anchor_ctx = contextlib.nullcontext()
            else:  # PEFT policy: the adapter-disabled network is the anchor
                anchor = policy
                peft_model = model
                while hasattr(peft_model, "module"):
                    peft_model = peft_model.module
                anchor_ctx = peft_model.disable_adapter()
            with anchor_ctx:
                anchor_out = anchor.base_model(
                    input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), use_cache=False
                )
                anchor_hidden = anchor_out.last_hidden_state[:, :-1][mask]
            anchor_head = anchor.get_output_embeddings()
        h = policy_hidden[mask]
        direction = self.params.kl_direction
        weight, bias = head.weight, head.bias

        def tile_kl(h_tile, a_tile):
            policy_logits = torch.nn.functional.linear(h_tile, weight, bias)
            with torch.no_grad():
                anchor_logits = anchor_head(a_tile)
            return token_kl(policy_logits, anchor_logits, direction)

        pieces = []
        for start in range(0, h.shape[0], KL_CHUNK):
            h_tile, a_tile = h[start : start + KL_CHUNK], anchor_hidden[start : start + KL_CHUNK]
            if torch.is_grad_enabled():
                pieces.append(checkpoint(tile_kl, h_tile, a_tile, use_reentrant=False))
            else:
                pieces.append(tile_kl(h_tile, a_tile))
        flat = torch.cat(pieces) if pieces else h.new_zeros(0)
        return flat.new_zeros(mask.shape).masked_scatter(mask, flat)
