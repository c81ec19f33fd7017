"""The SFT-family trainer: a thin subclass of TRL's ``SFTTrainer``.

TRL does the data handling (prompt/completion and messages formats, tokenisation, completion masks, collation) and
patches the model with a fused LM head, so ``model(..., fused_lm_head=True)`` returns per-token log-probs tile by
tile without materialising the logits. This trainer calls that forward once per batch and hands the log-probs to the
pure losses in :mod:`posttrain.losses.sft`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint
from trl import SFTTrainer

from posttrain.distributed import TokenMean, reduce_metrics
from posttrain.reference import Reference
from posttrain.registry import SFTLossEntry, Registry
from posttrain.trainers.common import AtomicCheckpointMixin, CountedSFTTruncationMixin
from posttrain.losses.sft import asft_anchored_loss, dft_loss, dft_token_loss, nll_loss, poft_loss, token_kl

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
        self.objective = SFT_LOSSES[method]
        super().__init__(*args, **kwargs)
        self.anchor_model = anchor_model
        if anchor_model is not None:
            from posttrain.distributed import prepare_frozen

            self.anchor_model = prepare_frozen(anchor_model, self.accelerator)
        if self.objective.extra_columns:
            self.data_collator = _ExtraColumnsCollator(self.data_collator, list(self.objective.extra_columns))
        if not self.objective.token_sum_loss:
            # A per-sequence mean over the micro-batch (PoFT), not a token sum over num_items_in_batch: HF must divide
            # it by the accumulation steps, or gradient accumulation multiplies loss and gradient by them.
            self.loss_is_scaled_for_ga = False

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        missing = [c for c in self.objective.extra_columns if c not in self._signature_columns]
        if missing:
            self._signature_columns = [*self._signature_columns, *missing]

    # ---------------------------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        extra = {c: inputs.pop(c, None) for c in self.objective.extra_columns}
        inputs["use_cache"] = False

        hidden: dict[str, torch.Tensor] = {}
        hook = None
        if self.params.needs_hidden_states:
            backbone = _unwrap(model).base_model
            hook = backbone.register_forward_hook(lambda m, a, out: hidden.__setitem__("h", out.last_hidden_state))
        try:
            outputs = model(**inputs, fused_lm_head=True)
        finally:
            if hook is not None:
                hook.remove()
        step = SFTStep(model, inputs, outputs, hidden.get("h"), extra, num_items_in_batch)
        loss, metrics = self.objective.fn(self, step)

        # Like Trainer.compute_loss: num_items_in_batch counts every rank's tokens and DDP averages gradients.
        if (
            self.objective.token_sum_loss
            and self.args.average_tokens_across_devices
            and num_items_in_batch is not None
        ):
            loss = loss * self.accelerator.num_processes

        self._log_token_metrics(mode, outputs, metrics)
        return (loss, outputs) if return_outputs else loss

    def _log_token_metrics(self, mode: str, outputs, extra: dict) -> None:
        """TRL's entropy and token accuracy plus the loss entry's metrics, reduced over processes in one call
        (:func:`posttrain.distributed.reduce_metrics`: token means over all processes' tokens)."""
        metrics = {}
        num_valid = outputs.label_mask.sum()
        if outputs.entropy is not None:
            metrics["entropy"] = TokenMean(outputs.entropy.detach().float().sum(), num_valid)
        if outputs.is_top1 is not None:
            metrics["mean_token_accuracy"] = TokenMean(outputs.is_top1.float().sum(), num_valid)
        for name, value in reduce_metrics(self.accelerator, {**metrics, **extra}).items():
            self._metrics[mode][name].append(value)

    def _anchor_kl(self, model, inputs, policy_hidden, mask) -> torch.Tensor:
        """Per-token KL between policy and anchor next-token distributions, on label positions only, in tiles."""
        policy = _unwrap(model)
        head = policy.get_output_embeddings()
        with torch.no_grad():
            # the anchor model, or (PEFT policy, no anchor model) the adapter-disabled network
            net, anchor_ctx = Reference(self.anchor_model).resolve(model)
            anchor = _unwrap(net)
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


# --------------------------------------------------------------------------------------------------------------------
# SFT-family losses: one registered entry per method, ``fn(trainer, step: SFTStep) -> (loss, metrics)``. ``meta``:
# ``extra_columns`` (per-example float columns the collator keeps), ``token_sum_loss`` (the loss is a sum over the
# tokens divided by ``num_items_in_batch``: scaled by the number of processes, as ``Trainer.compute_loss`` does).
# --------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SFTStep:
    """What one policy forward gives every SFT-family loss."""

    model: Any
    inputs: dict
    outputs: Any  # TRL fused-head output: log_probs, label_mask, entropy, is_top1
    hidden: torch.Tensor | None  # last hidden states (when the params' needs_hidden_states)
    extra: dict[str, torch.Tensor | None]  # the entry's extra columns
    num_items_in_batch: Any


SFT_LOSSES: Registry[SFTLossEntry] = Registry("SFT-family loss", SFTLossEntry)


@SFT_LOSSES.register("sft", doc="docs/methods/sft.md#objective", extra_columns=(), token_sum_loss=True)
def sft_objective(trainer, s: SFTStep):
    """Token-mean NLL on completion tokens (Ouyang et al. 2022, arXiv 2203.02155): :func:`nll_loss`."""
    return nll_loss(s.outputs.log_probs, s.outputs.label_mask, s.num_items_in_batch), {}


@SFT_LOSSES.register("dft", doc="docs/methods/dft.md#objective", extra_columns=(), token_sum_loss=True)
def dft_objective(trainer, s: SFTStep):
    """Dynamic Fine-Tuning (Wu et al. 2025, arXiv 2508.05629): :func:`dft_loss`, NLL logged."""
    logps, mask = s.outputs.log_probs, s.outputs.label_mask
    loss = dft_loss(logps, mask, s.num_items_in_batch)
    return loss, {"nll": TokenMean.of(-logps, mask)}


@SFT_LOSSES.register("asft_anchored", doc="docs/methods/asft_anchored.md#objective", extra_columns=(),
                     token_sum_loss=True)
def asft_anchored_objective(trainer, s: SFTStep):
    """Anchored SFT (Zhu et al. 2025, arXiv 2509.23753): DFT plus a token-level KL to the frozen anchor."""
    logps, mask = s.outputs.log_probs, s.outputs.label_mask
    kl = trainer._anchor_kl(s.model, s.inputs, s.hidden[:, :-1], mask)
    loss = asft_anchored_loss(logps, kl, mask, trainer.params.asft_kl_coef, s.num_items_in_batch)
    metrics = {
        "dft_loss": TokenMean.of(dft_token_loss(logps.detach()), mask),
        "kl": TokenMean.of(kl, mask),
        "nll": TokenMean.of(-logps, mask),
    }
    return loss, metrics


@SFT_LOSSES.register("poft", doc="docs/methods/poft.md#objective", extra_columns=(POFT_SCORE_COLUMN,),
                     token_sum_loss=False)
def poft_objective(trainer, s: SFTStep):
    """PoFT (Fan et al. 2025, arXiv 2412.12865): Bradley-Terry of the target's mean log-likelihood against the
    aligned LLMs' scores (column ``poft_ref_score``). ``poft_target_tokens: all`` is handled by the config
    (completion_only_loss=False): every label counts."""
    p, logps, mask = trainer.params, s.outputs.log_probs, s.outputs.label_mask
    out = poft_loss(logps, mask, s.extra[POFT_SCORE_COLUMN].to(logps.device), p.poft_beta, p.poft_gamma)
    margin = (out.reward_target - out.reward_aligned).detach()
    metrics = {
        "ce_loss": -out.reward_target.detach().mean(),
        "poft/reward_target": out.reward_target.detach().mean(),
        "poft/reward_aligned": out.reward_aligned.mean(),
        "poft/margin": margin.mean(),
        "poft/accuracy": (margin > 0).float().mean(),
        "poft/tau_mean": out.tau.mean(),
    }
    return out.loss, metrics
