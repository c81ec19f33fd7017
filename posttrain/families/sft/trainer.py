"""The SFT-family trainer: a thin subclass of TRL's ``SFTTrainer``.

TRL does the data handling (prompt/completion and messages formats, tokenisation, the completion / assistant-only
labels, packing and padding-free collation). This trainer replaces ``compute_loss``: one policy forward through the
log-prob engine (:mod:`posttrain.logprobs`: the body once, the LM head of ``training.logprob_head`` over the scored
(label) positions only) gives per-token log-probs and TRL's logged statistics (entropy, top-1 accuracy) from the head's
own chunks; the trainer computes what the method's entry declares it ``needs`` (the per-token KL to the frozen anchor,
tiled against the anchor's rows of the same positions; the aligned models' scores) into an
:class:`~posttrain.families.sft.forward.SFTForward`, and the entry's pure objective (never given the trainer) turns it,
through the losses of :mod:`posttrain.losses.sft`, into the loss. Where the engine cannot run (a router aux loss, model
inputs other than token ids / masks / positions, such as images) TRL's fused head scores every position of the whole
causal LM instead (same losses, no saving; said once in the log). The family's builders are at the bottom.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint
from trl import SFTTrainer

import posttrain.families.sft.methods  # noqa: F401  (registers every method's objective)
from posttrain.distributed import SHARDED, TokenMean, backend_name, reduce_metrics
from posttrain.errors import UserError
from posttrain.families.sft.forward import ALIGNED_SCORES, ANCHOR_KL, SFT_LOSSES, SFT_NEEDS, SFTForward
from posttrain.logprobs.engine import LogProbEngine, Needs, log_once
from posttrain.losses.sft import token_kl
from posttrain.reference import Reference
from posttrain.trainers.common import AtomicCheckpointMixin, CountedSFTTruncationMixin

POFT_SCORE_COLUMN = "poft_ref_score"
# the data column a need is read from (the collator keeps it in the batch)
NEED_COLUMNS = {ALIGNED_SCORES: POFT_SCORE_COLUMN}
KL_CHUNK = 1024  # label positions per tile when full-vocab logits are needed (the ASFT anchor, TRL-head path)
# batch keys the engine reads or may leave aside: TRL's collation of token rows (padded, or padding-free / packed with
# restarting position ids and the varlen kernels' boundaries, which the body recovers from the position ids)
ENGINE_KEYS = frozenset({"input_ids", "attention_mask", "position_ids", "labels", "use_cache", "cu_seq_lens_q",
                         "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx"})


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


@dataclass
class _PolicyPass:
    """The policy forward of one batch, per label position ``[B, T-1]`` (position ``t`` scores token ``t+1``):
    log-probs with grad, the scored mask, TRL's statistics (entropy, top-1 hit; no grad), the ``ANCHOR_KL`` need
    (with grad) and the router aux loss (MoE, engine off)."""

    logps: torch.Tensor
    mask: torch.Tensor
    entropy: torch.Tensor
    is_top1: torch.Tensor
    anchor_kl: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


class PosttrainSFTTrainer(AtomicCheckpointMixin, CountedSFTTruncationMixin, SFTTrainer):
    """The SFT family (every ``SFT_LOSSES`` entry) on top of ``trl.SFTTrainer``.

    Args:
        method: a key of :data:`~posttrain.families.sft.forward.SFT_LOSSES`.
        params: the method's hyperparameters (``methods/<method>.py``).
        ref_model: the method's reference, the frozen anchor of the ``ANCHOR_KL`` need (``self.anchor_model``);
            ``None`` with a PEFT policy uses the adapter-disabled base.
    """

    def __init__(self, *args, method: str, params, ref_model=None, **kwargs):
        self.method = method
        self.params = params
        self.objective = SFT_LOSSES[method]
        self.needs = self.objective.needs(params)
        unknown = self.needs - SFT_NEEDS
        if unknown:
            raise ValueError(f"SFT loss {method!r} needs {sorted(unknown)}; the trainer computes {sorted(SFT_NEEDS)}")
        self.extra_columns = [NEED_COLUMNS[need] for need in sorted(self.needs) if need in NEED_COLUMNS]
        # one row per sequence: nothing to share between rows
        self.engine = LogProbEngine(getattr(kwargs.get("args"), "logprob_head", "auto"), share_prompts=False)
        self.use_engine = True  # False: TRL's fused head on every position (the path before the engine; tests compare)
        super().__init__(*args, **kwargs)
        self.anchor_model = ref_model
        if ref_model is not None:
            from posttrain.distributed import prepare_frozen

            self.anchor_model = prepare_frozen(ref_model, self.accelerator)
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
        policy = self._engine_pass(model, inputs) if self._uses_engine(inputs) else self._fused_pass(model, inputs)
        fwd = SFTForward(
            policy.logps, policy.mask, num_items_in_batch, anchor_kl=policy.anchor_kl,
            aligned_scores=(columns[NEED_COLUMNS[ALIGNED_SCORES]].to(policy.logps.device)
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
        if policy.aux_loss is not None:  # as TRL: a per-micro-batch mean, averaged over the accumulation steps
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = loss + self.router_aux_loss_coef * policy.aux_loss / steps
            metrics["aux_loss"] = policy.aux_loss.detach()

        self._log_token_metrics(mode, inputs, policy, metrics)
        if return_outputs:  # as TRL: the logits for compute_metrics, from an extra forward
            with torch.no_grad():
                outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
            return loss, outputs
        return loss

    def _uses_engine(self, inputs) -> bool:
        """The log-prob engine runs the forward (``use_engine``) unless the model's router aux loss needs the causal
        LM's own forward or the batch carries model inputs the engine does not pass (images, pre-shifted labels)."""
        if not self.use_engine:
            return False
        if self.aux_loss_enabled:
            self._refuse_head_outside_forward("the model's router aux loss needs the full causal-LM forward")
            log_once("log-prob engine off: the model's router aux loss needs the full causal-LM forward; TRL's fused "
                     "head scores every position (same losses, no saving)")
            return False
        other = sorted(set(inputs) - ENGINE_KEYS)
        if other:
            self._refuse_head_outside_forward(f"the batch carries {', '.join(other)}")
            log_once(f"log-prob engine off: the batch carries {', '.join(other)}; TRL's fused head scores every "
                     "position (same losses, no saving)")
            return False
        return True

    def _refuse_head_outside_forward(self, why: str) -> None:
        """Off the engine, the ``ANCHOR_KL`` need projects the policy's hidden states through its head after the
        forward, which ZeRO-3 / FSDP2 shard and gather only inside it (docs/distributed.md): refuse there."""
        backend = backend_name(self.accelerator)
        if ANCHOR_KL in self.needs and backend in SHARDED:
            raise UserError(
                f"method: the anchor KL cannot run with --distributed {backend} here: {why}, so the log-prob engine "
                "is off and the KL would project the policy's hidden states through its output head after the "
                "forward, where that backend keeps the head sharded; use --distributed ddp or zero2")

    def _engine_pass(self, model, inputs) -> _PolicyPass:
        """The policy through the log-prob engine: the label positions only, entropy and top-1 hit from the head's
        chunks, and the ``ANCHOR_KL`` need tiled against the anchor's rows of the same positions."""
        input_ids, labels = inputs["input_ids"], inputs["labels"]
        attention_mask, position_ids = inputs.get("attention_mask"), inputs.get("position_ids")
        scored = torch.zeros_like(labels, dtype=torch.bool)
        scored[:, 1:] = labels[:, 1:] != -100
        anchor_rows = None
        if ANCHOR_KL in self.needs:
            anchor = self.engine.reference_forward(Reference(self.anchor_model), model, input_ids, attention_mask,
                                                   scored, needs=Needs(rows=True), position_ids=position_ids)
            anchor_rows = anchor.rows
        out = self.engine.forward(model, input_ids, attention_mask, scored, position_ids=position_ids,
                                  needs=Needs(statistics=("entropy", "is_top1")), kl_with=anchor_rows,
                                  kl_direction=getattr(self.params, "kl_direction", "base_to_policy"))
        return _PolicyPass(logps=out.logps[:, 1:], mask=out.mask[:, 1:], entropy=out.statistics["entropy"][:, 1:],
                           is_top1=out.statistics["is_top1"][:, 1:].bool(),
                           anchor_kl=out.kl[:, 1:] if anchor_rows is not None else None)

    def _fused_pass(self, model, inputs) -> _PolicyPass:
        """The path before the engine: TRL's fused head on every position of the whole causal LM, the anchor KL
        from the policy's last hidden states through its head, in tiles."""
        hidden: dict[str, torch.Tensor] = {}
        hook = None
        if ANCHOR_KL in self.needs:  # the anchor KL projects the policy's last hidden states through its head
            backbone = _unwrap(model).base_model
            hook = backbone.register_forward_hook(lambda m, a, out: hidden.__setitem__("h", out.last_hidden_state))
        kwargs = dict(inputs, output_router_logits=True) if self.aux_loss_enabled else inputs
        try:
            outputs = model(**kwargs, fused_lm_head=True)
        finally:
            if hook is not None:
                hook.remove()
        mask = outputs.label_mask
        return _PolicyPass(
            logps=outputs.log_probs, mask=mask, entropy=outputs.entropy, is_top1=outputs.is_top1,
            anchor_kl=self._anchor_kl(model, inputs, hidden["h"][:, :-1], mask) if ANCHOR_KL in self.needs else None,
            aux_loss=outputs.aux_loss if self.aux_loss_enabled else None)

    def _log_token_metrics(self, mode: str, inputs, policy: _PolicyPass, extra: dict) -> None:
        """TRL's entropy, token accuracy and ``num_tokens`` plus the loss entry's metrics, reduced over processes in
        one call (:func:`posttrain.distributed.reduce_metrics`: token means over all processes' tokens)."""
        num_valid = policy.mask.sum()
        metrics = {"entropy": TokenMean(policy.entropy.detach().float().sum(), num_valid),
                   "mean_token_accuracy": TokenMean(policy.is_top1.float().sum(), num_valid)}
        for name, value in reduce_metrics(self.accelerator, {**metrics, **extra}).items():
            self._metrics[mode][name].append(value)
        if mode == "train":  # as TRL: every real token of the batch (the padding-free row's length without a mask)
            g = self.accelerator.gather_for_metrics
            if "attention_mask" in inputs:
                tokens = inputs["attention_mask"].sum()
            else:
                tokens = torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
            self._total_train_tokens += g(tokens).sum().item() // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]

    def _anchor_kl(self, model, inputs, policy_hidden, mask) -> torch.Tensor:
        """The ``ANCHOR_KL`` need on the TRL-head path: per-token KL between the policy's and the anchor's next-token
        distributions (direction ``params.kl_direction``), on label positions only, in tiles."""
        policy = _unwrap(model)
        head = policy.get_output_embeddings()
        with torch.no_grad():
            # the anchor model, or (PEFT policy, no anchor model) the adapter-disabled network
            net, anchor_ctx = Reference(self.anchor_model).resolve(model)
            anchor = _unwrap(net)
            with anchor_ctx:
                body = {k: inputs[k] for k in ("input_ids", "attention_mask", "position_ids") if k in inputs}
                anchor_out = anchor.base_model(**body, use_cache=False)
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
    """The :class:`~posttrain.families.sft.config.SFTFamilyConfig` (``SFTConfig`` + the log-prob engine's head) of an
    SFT-family recipe, built before any model loads (see :func:`posttrain.train.preflight`); a
    ``training.logprob_head`` that cannot run on this machine is refused here."""
    from posttrain.families.sft.config import SFTFamilyConfig
    from posttrain.logprobs.heads import check_head_here
    from posttrain.trainers.common import training_config

    params = recipe.params
    if recipe.data.train is None:
        raise UserError("data.train: required key is missing")
    overrides = {"completion_only_loss": params.completion_only, "max_length": 512}
    if recipe.data.eval is not None:
        overrides.update(eval_strategy="steps", eval_steps=recipe.training.get("logging_steps", 10))
    config = training_config(SFTFamilyConfig, recipe, overrides)
    check_head_here(config)
    return config


def build_sft_trainer(ctx):
    """Every SFT-family method on :class:`PosttrainSFTTrainer`."""
    from posttrain.adapters.trainer import make_trainer
    from posttrain.trainers.common import trainer_kwargs

    recipe = ctx.recipe
    config = ctx.config if ctx.config is not None else sft_config(recipe, ctx.info)
    train = _sft_dataset(ctx, "data.train")
    evals = _sft_dataset(ctx, "data.eval") if recipe.data.eval is not None else None
    return make_trainer(  # the peft.type variant (plora/goat/ggpo) wraps the class; plain LoRA: the class itself
        PosttrainSFTTrainer,
        recipe,
        uses_disabled_adapter_reference=recipe.reference.uses_disabled_adapter,
        **trainer_kwargs(ctx, config, train, evals),
        method=ctx.info.name,
    )
