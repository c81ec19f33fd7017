"""The SFT-family trainer: a thin subclass of TRL's ``SFTTrainer``.

TRL does the data handling (prompt/completion and messages formats, tokenisation, completion masks, collation) and
patches the model with a fused LM head, so ``model(..., fused_lm_head=True)`` returns per-token log-probs tile by
tile without materialising the logits. This trainer calls that forward once per batch, computes what the method's entry
declares it ``needs`` (the per-token KL to the frozen anchor; the aligned models' scores) into an
:class:`~posttrain.families.sft.forward.SFTForward`, and the entry's pure objective (never given the trainer) turns it,
through the losses of :mod:`posttrain.losses.sft`, into the loss. The family's builders are at the bottom.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.checkpoint import checkpoint
from trl import SFTTrainer

import posttrain.families.sft.methods  # noqa: F401  (registers every method's objective)
from posttrain.distributed import TokenMean, reduce_metrics
from posttrain.errors import UserError
from posttrain.families.sft.forward import ALIGNED_SCORES, ANCHOR_KL, SFT_LOSSES, SFT_NEEDS, SFTForward
from posttrain.losses.sft import token_kl
from posttrain.reference import Reference
from posttrain.trainers.common import AtomicCheckpointMixin, CountedSFTTruncationMixin

POFT_SCORE_COLUMN = "poft_ref_score"
# the data column a need is read from (the collator keeps it in the batch)
NEED_COLUMNS = {ALIGNED_SCORES: POFT_SCORE_COLUMN}
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
    """The SFT family (every ``SFT_LOSSES`` entry) on top of ``trl.SFTTrainer``.

    Args:
        method: a key of :data:`~posttrain.families.sft.forward.SFT_LOSSES`.
        params: the method's hyperparameters (``methods/<method>.py``).
        anchor_model: frozen anchor of the ``ANCHOR_KL`` need; ``None`` with a PEFT policy uses the adapter-disabled
            base.
    """

    def __init__(self, *args, method: str, params, anchor_model=None, **kwargs):
        self.method = method
        self.params = params
        self.objective = SFT_LOSSES[method]
        self.needs = self.objective.needs(params)
        unknown = self.needs - SFT_NEEDS
        if unknown:
            raise ValueError(f"SFT loss {method!r} needs {sorted(unknown)}; the trainer computes {sorted(SFT_NEEDS)}")
        self.extra_columns = [NEED_COLUMNS[need] for need in sorted(self.needs) if need in NEED_COLUMNS]
        super().__init__(*args, **kwargs)
        self.anchor_model = anchor_model
        if anchor_model is not None:
            from posttrain.distributed import prepare_frozen

            self.anchor_model = prepare_frozen(anchor_model, self.accelerator)
        if self.extra_columns:
            self.data_collator = _ExtraColumnsCollator(self.data_collator, self.extra_columns)
        if not self.objective.token_sum_loss:
            # A per-sequence mean over the micro-batch (PoFT), not a token sum over num_items_in_batch: HF must divide
            # it by the accumulation steps, or gradient accumulation multiplies loss and gradient by them.
            self.loss_is_scaled_for_ga = False

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        missing = [c for c in self.extra_columns if c not in self._signature_columns]
        if missing:
            self._signature_columns = [*self._signature_columns, *missing]

    # ---------------------------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        columns = {c: inputs.pop(c, None) for c in self.extra_columns}
        inputs["use_cache"] = False

        hidden: dict[str, torch.Tensor] = {}
        hook = None
        if ANCHOR_KL in self.needs:  # the anchor KL projects the policy's last hidden states through its head
            backbone = _unwrap(model).base_model
            hook = backbone.register_forward_hook(lambda m, a, out: hidden.__setitem__("h", out.last_hidden_state))
        try:
            outputs = model(**inputs, fused_lm_head=True)
        finally:
            if hook is not None:
                hook.remove()
        logps, mask = outputs.log_probs, outputs.label_mask
        fwd = SFTForward(
            logps, mask, num_items_in_batch,
            anchor_kl=self._anchor_kl(model, inputs, hidden["h"][:, :-1], mask) if ANCHOR_KL in self.needs else None,
            aligned_scores=(columns[NEED_COLUMNS[ALIGNED_SCORES]].to(logps.device)
                            if ALIGNED_SCORES in self.needs else None),
        )
        loss, metrics = self.objective.fn(self.params, fwd)

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
        """The ``ANCHOR_KL`` need: per-token KL between the policy's and the anchor's next-token distributions
        (direction ``params.kl_direction``), on label positions only, in tiles."""
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
# Builders (FAMILIES["sft"])
# --------------------------------------------------------------------------------------------------------------------


def _reads_aligned_scores(recipe) -> bool:
    return ALIGNED_SCORES in SFT_LOSSES[recipe.method.name].needs(recipe.params)


def _sft_dataset(ctx, key: str):
    ds = ctx.dataset(key, "sft")
    if _reads_aligned_scores(ctx.recipe):  # aligned-model scores, computed or read
        from posttrain.families.sft.scoring import attach_scores

        ds = attach_scores(ds, ctx.recipe.params, key)
    return ds


def check_sft_data(recipe, datasets) -> None:
    """Checks of the loaded SFT data that need no model (preflight): the columns the method's needs read (PoFT's
    aligned scores, or the aligned models that will compute them)."""
    if not _reads_aligned_scores(recipe):
        return
    from posttrain.families.sft.scoring import check_scores

    for key in ("data.train", "data.eval"):
        if key in datasets:
            check_scores(datasets[key], recipe.params, key)


def sft_config(recipe, info):
    """The ``SFTConfig`` of an SFT-family recipe (built before any model loads, see :func:`posttrain.train.preflight`)."""
    from trl import SFTConfig

    from posttrain.trainers.common import training_config

    params = recipe.params
    if recipe.data.train is None:
        raise UserError("data.train: required key is missing")
    overrides = {"completion_only_loss": params.completion_only, "max_length": 512}
    if recipe.data.eval is not None:
        overrides.update(eval_strategy="steps", eval_steps=recipe.training.get("logging_steps", 10))
    return training_config(SFTConfig, recipe, overrides)


def build_sft_trainer(ctx):
    """Every SFT-family method on :class:`PosttrainSFTTrainer`."""
    from posttrain.adapters.trainer import make_trainer
    from posttrain.trainers.common import peft_config

    recipe, params = ctx.recipe, ctx.recipe.params
    config = ctx.config if ctx.config is not None else sft_config(recipe, ctx.info)
    train = _sft_dataset(ctx, "data.train")
    evals = _sft_dataset(ctx, "data.eval") if recipe.data.eval is not None else None
    return make_trainer(  # the peft.type variant (plora/goat/ggpo) wraps the class; plain LoRA: the class itself
        PosttrainSFTTrainer,
        recipe,
        uses_disabled_adapter_reference=recipe.reference.uses_disabled_adapter,
        model=ctx.model,
        args=config,
        train_dataset=train,
        eval_dataset=evals,
        processing_class=ctx.tokenizer,
        peft_config=peft_config(recipe),
        callbacks=ctx.callbacks,
        method=ctx.info.name,
        params=params,
        anchor_model=ctx.ref_model,
    )
