"""The unpaired-preference trainer (``kto``): a thin subclass of TRL's ``KTOTrainer``.

TRL does the tokenisation of plain-text rows (EOS appended to the completion), the collation of each row and of its
mismatched KL sequence, the reference-model plumbing (a given frozen model, or the adapter-disabled base with PEFT) and
the optional precomputation of reference log-probs. posttrain replaces:

* ``_prepare_dataset``: paired rows (``prompt, chosen, rejected``) are shuffled once with the run's seed and unpaired
  with ``trl.data_utils`` one pair at a time, each pair's two rows side by side (TRL's unpairing puts a thousand chosen
  rows before their rejected ones, and KTO reads its data in order); conversational rows are tokenised by
  :func:`posttrain.data.formatting.tokenize_prompt_completion` (the completion's assistant turns and their end-of-turn
  tokens, for any chat template); rows whose prompt fills ``max_length`` are dropped and truncated rows counted, both
  logged; the mismatched KL completions are built after that, never from a row of the same prompt
  (:func:`posttrain.losses.preference.rotate_within_batches`);
* ``_compute_loss``: one policy forward through the log-prob engine (:mod:`posttrain.logprobs`: completion rows only,
  docs/logprob_engine.md), the KL sequences (mismatched prompt / completion rows: no prompt to share) and the
  reference forwards through the same engine under ``no_grad`` (or the precomputed columns, also computed through the
  engine), then the pure :func:`posttrain.losses.preference.kto_loss` with the reference point of
  :func:`~posttrain.losses.preference.kto_reference_point`, and TRL's metrics (entropy and mean logit from the
  engine's head chunks). A model with a router aux loss (MoE) needs the whole causal-LM forward: TRL's fused head
  runs then (``use_engine = False`` runs it always: the path before the engine, which the tests compare).

Method page: docs/methods/kto.md.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from trl import KTOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer import kto_trainer as _trl_kto

from posttrain.distributed import reduce_metrics
from posttrain.errors import UserError
from posttrain.logprobs.engine import LogProbEngine, Needs, log_once
from posttrain.losses.preference import kto_loss, kto_reference_point, rotate_within_batches, sequence_logps
from posttrain.reference import Reference, peft_model_of
from posttrain.trainers.common import AtomicCheckpointMixin, _NoMaxLength, log_length_effects

logger = logging.getLogger("posttrain")

TURN_MASK, KL_TURN_MASK = "completion_turn_mask", "KL_completion_turn_mask"
_NON_MODEL_KEYS = {"completion_mask", "KL_input_ids", "KL_attention_mask", "KL_completion_mask", "label", "ref_logps",
                   "ref_KL_logps", TURN_MASK, KL_TURN_MASK}


class TurnMaskedUnpairedCollator(_trl_kto.DataCollatorForUnpairedPreference):
    """TRL's unpaired collator, with the completion masks narrowed to the scored tokens of conversational rows
    (``completion_turn_mask`` / ``KL_completion_turn_mask``); rows without them collate exactly as in TRL."""

    def torch_call(self, examples):
        batch = super().torch_call(examples)
        for prefix, column in (("", TURN_MASK), ("KL_", KL_TURN_MASK)):
            if column not in examples[0]:
                continue
            masks = [[0] * len(e["prompt_ids"]) + list(e[column]) for e in examples]
            if self.max_length is not None:  # the collator's own truncation (keep_start)
                masks = [m[: self.max_length] for m in masks]
            target = batch[f"{prefix}completion_mask"]
            turns = torch.tensor([m + [0] * (target.shape[1] - len(m)) for m in masks], dtype=target.dtype)
            batch[f"{prefix}completion_mask"] = target * turns
        return batch


@contextlib.contextmanager
def _collator_class(cls):
    original = _trl_kto.DataCollatorForUnpairedPreference
    _trl_kto.DataCollatorForUnpairedPreference = cls
    try:
        yield
    finally:
        _trl_kto.DataCollatorForUnpairedPreference = original


@contextlib.contextmanager
def _without_kl(trainer):
    """TRL's dataset preparation without its KL columns (posttrain adds them after dropping rows)."""
    saved = trainer.calculate_KL
    trainer.calculate_KL = False
    try:
        yield
    finally:
        trainer.calculate_KL = saved


def unpair(dataset, seed: int):
    """Paired rows (``chosen``, ``rejected``) as unpaired ``prompt, completion, label`` rows: the pairs are shuffled
    once with ``seed``, then each pair gives its desirable row and, right after it, its undesirable one
    (``trl.data_utils.unpair_preference_dataset``, one pair per map batch). KTO reads its rows in order, so with an
    even micro-batch size both rows of a pair share a micro-batch: every micro-batch is half desirable, and the gradient
    the two rows share (the prompt, the end-of-sequence token, the digits both answers use) cancels within it instead
    of only on average over many steps (docs/methods/kto.md#data)."""
    from trl.data_utils import extract_prompt, unpair_preference_dataset

    if "chosen" not in dataset.column_names:
        return dataset
    if "prompt" not in dataset.column_names:
        dataset = dataset.map(extract_prompt)
    return unpair_preference_dataset(dataset.shuffle(seed=seed).flatten_indices(), batch_size=1)


class PosttrainKTOTrainer(AtomicCheckpointMixin, KTOTrainer):
    """KTO (docs/methods/kto.md) on top of ``trl.KTOTrainer``.

    Args:
        params: :class:`posttrain.methods.KTOParams`; the ``KTOConfig``'s ``beta``, weights and
            ``precompute_ref_log_probs`` must agree with them (``build_kto_trainer`` sets them).
        assistant_turns: which assistant turns of a conversational completion are scored (``data.assistant_turns``).
    """

    def __init__(self, *args, params, assistant_turns: str = "all", **kwargs):
        self.params = params
        self.assistant_turns = assistant_turns
        # a KTO row's KL sequence has another prompt: nothing to share
        self.engine = LogProbEngine(getattr(kwargs.get("args"), "logprob_head", "auto"), share_prompts=False)
        self.use_engine = True  # False: TRL's fused head on whole rows (the path before the engine)
        with _collator_class(TurnMaskedUnpairedCollator):
            super().__init__(*args, **kwargs)
        if self.precompute_ref_logps:
            self.ref_model = None  # the precomputed columns replace the reference: do not keep it in memory

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        missing = [c for c in (TURN_MASK, KL_TURN_MASK) if c not in self._signature_columns]
        if missing:
            self._signature_columns = [*self._signature_columns, *missing]

    # ---------------------------------------------------------------------------------------------------------------
    # data

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        from datasets import Dataset

        if not isinstance(dataset, Dataset):
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if "prompt_ids" in dataset.column_names:  # prepared already
            return dataset
        key = f"data.{dataset_name}"
        dataset = unpair(dataset, args.seed)
        from posttrain.data.formatting import is_conversation

        if any(is_conversation(dataset[0].get(col)) for col in ("prompt", "completion")):
            dataset = self._tokenize_conversations(dataset, processing_class, key)
        else:
            with _NoMaxLength(args), _without_kl(self):
                dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        dataset = self._apply_max_length(dataset, args, key)
        if self.calculate_KL:
            # mismatched pairs: each row with the completion of another prompt's row in its step's global batch (the
            # micro-batches of all processes), so N processes pair the rows as one process does on that batch
            size = args.per_device_train_batch_size * args.world_size
            from posttrain.data.sources import column_values

            prompts = [tuple(p) for p in column_values(dataset, "prompt_ids")]
            dataset = dataset.add_column(
                "KL_completion_ids", rotate_within_batches(column_values(dataset, "completion_ids"), size, prompts))
            if TURN_MASK in dataset.column_names:
                dataset = dataset.add_column(
                    KL_TURN_MASK, rotate_within_batches(column_values(dataset, TURN_MASK), size, prompts))
        return dataset

    def _tokenize_conversations(self, dataset, tokenizer, key):
        """Prompt ids, completion ids and the scored-token mask of conversational rows (any chat template); rows with
        no assistant turn to score are dropped with a logged count."""
        from posttrain.data.formatting import row_tools, tokenize_prompt_completion

        out: dict[str, list] = {"prompt_ids": [], "completion_ids": [], TURN_MASK: []}
        keep = []
        for i, row in enumerate(dataset):
            tokens = tokenize_prompt_completion(row["prompt"], row["completion"], tokenizer, f"{key}: row {i}",
                                                self.assistant_turns, row_tools(row))
            if not tokens.spans:
                continue
            start = tokens.spans[0][0]
            out["prompt_ids"].append(tokens.input_ids[:start])
            out["completion_ids"].append(tokens.input_ids[start:])
            out[TURN_MASK].append(tokens.mask[start:])
            keep.append(i)
        if len(keep) < len(dataset):
            logger.warning("%s: skipped %d of %d rows with no assistant turn to score", key, len(dataset) - len(keep),
                           len(dataset))
        if not keep:
            raise UserError(f"{key}: no row has an assistant turn to score")
        dataset = dataset.select(keep) if len(keep) < len(dataset) else dataset
        for column, values in out.items():
            dataset = dataset.add_column(column, values)
        return dataset

    @staticmethod
    def _apply_max_length(dataset, args, key):
        """TRL's drop of rows whose prompt fills ``max_length`` (keep_start: nothing of the completion would be left),
        counted, and the rows its collator truncates counted; both logged."""
        from posttrain.data.sources import column_values

        if args.max_length is None:
            return dataset
        prompts = [len(p) for p in column_values(dataset, "prompt_ids")]
        completions = [len(c) for c in column_values(dataset, "completion_ids")]
        keep = [i for i, n in enumerate(prompts) if n < args.max_length]
        truncated = sum(1 for i in keep if prompts[i] + completions[i] > args.max_length)
        if len(keep) < len(dataset):
            dataset = dataset.select(keep)
        log_length_effects(key, len(prompts), truncated, len(prompts) - len(keep), args.max_length,
                           "the prompt alone fills max_length")
        return dataset

    # ---------------------------------------------------------------------------------------------------------------
    # loss

    @property
    def _uses_engine(self) -> bool:
        """The log-prob engine runs the forwards (``use_engine``); a router aux loss (MoE) needs the whole causal LM's
        forward, so TRL's fused head runs instead."""
        if self.aux_loss_enabled and self.use_engine:
            log_once("log-prob engine off: the model's router aux loss needs the full causal-LM forward; TRL's fused "
                     "head scores every row whole (same losses, no saving)")
        return self.use_engine and not self.aux_loss_enabled

    def _sequence_logps(self, net, kwargs, input_ids, completion_mask):
        labels = input_ids.masked_fill(completion_mask == 0, -100)
        out = net(**kwargs, labels=labels, fused_lm_head=True)
        mask = completion_mask[:, 1:]
        return out, out.log_probs[:, -mask.size(1):], mask

    @staticmethod
    def _rows(batch, prefix: str = ""):
        """``input_ids``, ``attention_mask`` and the completion mask of the target rows (``prefix`` ``KL_``: of the
        mismatched KL rows), the mask without its first column (a token there has nothing to be predicted from)."""
        completion = batch[f"{prefix}completion_mask"].clone()
        completion[:, 0] = 0
        return batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"], completion

    def _kl_logps(self, model, batch):
        """Summed log-probs ``[B]`` of the KL rows' completions under ``model`` (no gradient)."""
        if not self._uses_engine:
            return self._compute_kl_logps(model, batch)
        with torch.no_grad():
            return self.engine.forward(model, *self._rows(batch, "KL_")).sequence_logps()

    def _reference_logps(self, reference: Reference, batch):
        """The reference's summed log-probs ``([B], [B])`` of the target rows and of the KL rows: the engine's
        forwards under ``no_grad``, or TRL's fused head when the engine is off."""
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            if self._uses_engine:
                target = self.engine.reference_forward(reference, self.model, *self._rows(batch))
                kl = self.engine.reference_forward(reference, self.model, *self._rows(batch, "KL_"))
                return target.sequence_logps(), kl.sequence_logps()
            net, context = reference.resolve(self.model)
            with context:
                kl = self._compute_kl_logps(net, batch)
                kwargs = {k: v for k, v in batch.items() if k not in _NON_MODEL_KEYS}
                _, per_token, mask = self._sequence_logps(net, {**kwargs, "use_cache": False}, batch["input_ids"],
                                                          batch["completion_mask"])
            return sequence_logps(per_token, mask), kl

    def _precompute_ref_logps(self, dataset, name, batch_size):
        """TRL's one-off reference pass of ``precompute_ref_log_probs`` (its ``ref_logps`` / ``ref_KL_logps``
        columns) through the shared plan (:func:`posttrain.logprobs.reference.precomputed_reference`: the engine's
        reference forward over the collated rows, cached in ``$POSTTRAIN_CACHE/reference`` keyed by model + rows +
        chat template, so that a rerun reads it). The reference: ``ref_model``, or the policy with its adapter
        disabled."""
        from posttrain.logprobs.reference import precomputed_reference

        prefixes = ("", "KL_") if self.calculate_KL else ("",)
        rows: dict[str, list[dict]] = {prefix: [] for prefix in prefixes}
        for start in range(0, len(dataset), batch_size):
            batch = self.data_collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            for prefix in prefixes:
                ids, attention, completion = self._rows(batch, prefix)
                for b in range(ids.shape[0]):
                    keep = attention[b].bool()
                    rows[prefix].append({"input_ids": ids[b][keep].tolist(),
                                         "completion_mask": completion[b][keep].tolist()})
        model = self.ref_model or self.model
        if self.ref_model is None and self.is_deepspeed_enabled:  # the adapter-disabled policy, placed as TRL does
            from trl.models import prepare_deepspeed

            if self._precompute_engine is None:
                self._precompute_engine = prepare_deepspeed(self.model, self.accelerator)
            model = self._precompute_engine
        reference = Reference(None if self.ref_model is None and peft_model_of(model) is not None else model)
        every_row = [row for prefix in prefixes for row in rows[prefix]]
        logps = precomputed_reference(
            reference, model, every_row, accelerator=self.accelerator, engine=self.engine,
            template=getattr(self._tokenizer, "chat_template", None), batch_size=batch_size,
            pad_token_id=self._tokenizer.pad_token_id).sums()
        n = len(dataset)
        dataset = dataset.add_column("ref_logps", logps[:n].tolist())
        if self.calculate_KL:
            dataset = dataset.add_column("ref_KL_logps", logps[n:].tolist())
        return dataset

    def _policy_pass(self, model, batch, model_kwargs):
        """The policy's per-token log-probs ``[B, T-1]`` with grad, their mask, the per-token entropy and mean logit
        TRL's metrics log, and the router aux loss (engine off)."""
        if self._uses_engine:
            out = self.engine.forward(model, *self._rows(batch), needs=Needs(statistics=("entropy", "mean_logits")))
            stats = out.statistics
            return (out.logps[:, 1:], out.mask[:, 1:], stats["entropy"][:, 1:], stats["mean_logits"][:, 1:],
                    None)
        outputs, per_token, mask = self._sequence_logps(model, model_kwargs, batch["input_ids"],
                                                        batch["completion_mask"])
        width = mask.size(1)
        return (per_token, mask, outputs.entropy[:, -width:], outputs.mean_logits[:, -width:],
                outputs.aux_loss if self.aux_loss_enabled else None)

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        p, gather = self.params, self.accelerator.gather_for_metrics
        batch = {k: (v.to(self.accelerator.device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        desirable = batch["label"].to(torch.bool)
        model_kwargs = {k: v for k, v in batch.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        if self.aux_loss_enabled:
            model_kwargs["output_router_logits"] = True
        per_token, mask, entropy, mean_logits, aux_loss = self._policy_pass(model, batch, model_kwargs)
        logps = sequence_logps(per_token, mask)

        kl_logps = self._kl_logps(model, batch)  # no grad: the reference point is a constant
        if self.precompute_ref_logps:
            ref_logps, ref_kl_logps = batch["ref_logps"], batch.get("ref_KL_logps")
        else:
            missing = RuntimeError("no reference model: pass ref_model, use PEFT, or precompute reference log-probs")
            ref_logps, ref_kl_logps = self._reference_logps(Reference(self.ref_model, missing=missing), batch)
        if self.calculate_KL:
            z0 = kto_reference_point(gather((kl_logps - ref_kl_logps.to(kl_logps.device)).float()))
        else:  # pragma: no cover - posttrain's KTO always estimates the KL term
            z0 = torch.zeros((), device=logps.device)
        out = kto_loss(logps - ref_logps.to(logps.device), desirable, z0, beta=p.beta,
                       desirable_weight=p.desirable_weight, undesirable_weight=p.undesirable_weight)
        loss = out.losses.mean()
        if aux_loss is not None:
            loss = loss + self.router_aux_loss_coef * aux_loss
            # each process's value for its equal share of the batch: reduced over processes as the other metrics
            self._metrics[mode]["aux_loss"].append(reduce_metrics(self.accelerator, {"aux": aux_loss.detach()})["aux"])
        self._log_kto_metrics(mode, batch, entropy, mean_logits, mask, desirable, logps.detach(), out, z0)
        if return_outputs:
            with torch.no_grad():
                outputs = model(**model_kwargs)
        return (loss, outputs) if return_outputs else loss

    def _log_kto_metrics(self, mode, batch, entropy, mean_logits, mask, desirable, logps, out, z0):
        """TRL's KTO metrics: kl, entropy, num_tokens, logits/*, rewards/* and logps/* (means over all processes'
        desirable / undesirable rows), rewards/margins."""
        g = self.accelerator.gather_for_metrics
        m = self._metrics[mode]
        m["kl"].append(z0.item())
        entropy, tokens = g((entropy.detach() * mask).sum()).sum(), g(mask.sum()).sum()
        m["entropy"].append((entropy / tokens).item() if tokens > 0 else 0.0)
        if mode == "train":
            self._total_train_tokens += g(batch["attention_mask"].sum()).sum().item() // self._tp_size
        m["num_tokens"] = [self._total_train_tokens]
        counts = {}
        for name, rows, rewards in (("chosen", desirable, out.chosen_rewards), ("rejected", ~desirable,
                                                                                 out.rejected_rewards)):
            sel = mask[rows].bool()
            total, count = g(mean_logits[rows][sel].sum()).sum().item(), g(sel.sum()).sum().item()
            if count > 0:
                m[f"logits/{name}"].append(total / count)
            counts[name] = g(rows.sum()).sum().item()
            if counts[name] > 0:
                m[f"rewards/{name}"].append(g(rewards.nansum()).nansum().item() / counts[name])
                m[f"logps/{name}"].append(g(logps[rows].nansum()).nansum().item() / counts[name])
        if counts["chosen"] > 0 and counts["rejected"] > 0:
            m["rewards/margins"].append(m["rewards/chosen"][-1] - m["rewards/rejected"][-1])


# ----------------------------------------------------------------------------------------------------------------------
# Building from a recipe
# ----------------------------------------------------------------------------------------------------------------------

# KTOConfig fields that a method's own keys set; a recipe must set them under `method:`.
_METHOD_OWNED = {
    "beta": "method.beta",
    "desirable_weight": "method.desirable_weight",
    "undesirable_weight": "method.undesirable_weight",
    "precompute_ref_log_probs": "method.precompute_ref_log_probs",
    "loss_type": "method.name (kto)",
}


def kto_config(recipe, info):
    """The :class:`UnpairedConfig` (``KTOConfig`` + ``logprob_head``) of a ``kto`` recipe, built before any model
    loads; a ``training.logprob_head`` that cannot run on this machine is refused here."""
    from posttrain.families.unpaired.config import UnpairedConfig
    from posttrain.logprobs.heads import check_head_here
    from posttrain.trainers.common import training_config

    p = recipe.params
    for key, where in _METHOD_OWNED.items():
        if key in recipe.training:
            raise UserError(f"training.{key}: set by the method; use {where}")
    if recipe.data.train is None:
        raise UserError("data.train: required key is missing")
    if recipe.training.get("train_sampling_strategy", "sequential") != "sequential":
        raise UserError("training.train_sampling_strategy: KTO's KL estimate pairs each row with its neighbours in a "
                        "fixed order; leave it at sequential (posttrain shuffles paired data once when unpairing)")
    if recipe.training.get("per_device_train_batch_size", 8) < 2:
        raise UserError("training.per_device_train_batch_size: KTO's KL estimate needs at least 2 rows per micro-batch "
                        "(each row is paired with another row's completion)")
    if recipe.training.get("use_liger_kernel"):
        raise UserError("training.use_liger_kernel: not supported by posttrain's KTO trainer")
    overrides = {"beta": p.beta, "desirable_weight": p.desirable_weight, "undesirable_weight": p.undesirable_weight,
                 "precompute_ref_log_probs": p.precompute_ref_log_probs, "loss_type": "kto", "max_length": 512}
    if recipe.data.eval is not None:
        overrides.update(eval_strategy="steps", eval_steps=recipe.training.get("logging_steps", 10))
    config = training_config(UnpairedConfig, recipe, overrides)
    check_head_here(config)
    if config.sync_ref_model and p.precompute_ref_log_probs:
        raise UserError("training.sync_ref_model: needs a live reference model (precompute_ref_log_probs keeps none)")
    return config


def build_kto_trainer(ctx):
    """``kto`` on :class:`PosttrainKTOTrainer`."""
    from posttrain.adapters.trainer import make_trainer
    from posttrain.trainers.common import trainer_kwargs

    recipe = ctx.recipe
    config = ctx.config if ctx.config is not None else kto_config(recipe, ctx.info)
    train = ctx.dataset("data.train", "unpaired")
    evals = ctx.dataset("data.eval", "unpaired") if recipe.data.eval is not None else None
    return make_trainer(
        PosttrainKTOTrainer,
        recipe,
        uses_disabled_adapter_reference=recipe.reference.uses_disabled_adapter,
        **trainer_kwargs(ctx, config, train, evals),
        assistant_turns=recipe.data.assistant_turns,
    )
