"""The preference-family trainer: a thin subclass of TRL's ``DPOTrainer``.

TRL does the data handling (prompt extraction, EOS, tokenisation, the ``[chosen rows; rejected rows]`` collation with
a completion mask) and the reference-model handling (a given frozen model, or the adapter-disabled base with PEFT).
This trainer replaces ``_compute_loss`` and TRL's one-off precomputation of reference log-probs
(``precompute_ref_log_probs``: through the shared plan of :mod:`posttrain.logprobs.reference`, cached on disk): one
policy forward through the log-prob engine (:mod:`posttrain.logprobs`:
completion rows only, each pair's prompt computed once for chosen and rejected, the head of
``training.logprob_head``) gives per-token log-probs, the trainer computes what the method's entry declares
it ``needs`` (the reference's summed log-probs, live or precomputed; WPO's weight alignment; SparsePO's token KL and
masks) into a :class:`PreferenceForward`, and the entry's pure objective (never given the trainer) turns it, through
the losses of :mod:`posttrain.losses.preference`, into the loss of ``dpo`` (sigmoid / cDPO / robust / IPO), ``wpo``,
``sparsepo`` (MaPO reference mask or learned mask) or the reference-free ``asft_aligned``, ``simpo`` and ``orpo``
(ORPO's SFT term may also score the prompt tokens: ``params.scores_prompt_tokens``).

Per-token tensors are ``[2B, T-1]`` (row ``b`` scores token ``t+1`` of sequence ``b``) with the shifted completion mask;
chosen rows come first. SparsePO also needs the token KL against the reference and reference activations: its
reference runs first, through the engine on the unshared rows (the MaPO mask reads per-row activations), and the KL
is tiled inside the policy's forward against the reference's rows, as every head projection with gradients is (so it
runs under ZeRO-3 and FSDP2). A Mixture-of-Experts model whose router aux loss is on runs TRL's fused head on the
whole causal LM instead of the engine (same losses, no saving; said once in the log).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from trl import DPOTrainer
from trl.trainer import dpo_trainer as _trl_dpo
from trl.models.utils import disable_gradient_checkpointing

from posttrain.distributed import SHARDED, backend_name, full_weight, gathered, process_share, reduce_metrics
from posttrain.errors import UserError
from posttrain.families.preference.forward import (
    LOG_ALIGNMENT,
    PREFERENCE_LOSSES,
    PREFERENCE_NEEDS,
    REF_LOGPS,
    TOKEN_KL,
    Collective,
    PreferenceForward,
)
from posttrain.losses.preference import (
    SparsePOMaskNet,
    mapo_mask,
    sequence_logps,
    sparsepo_token_kl,
    wpo_log_alignment,
)
from posttrain.logprobs.engine import HeadRows, LogProbEngine, Needs, log_once
from posttrain.reference import Reference, peft_model_of, trl_reference_factory
from posttrain.registry import METHODS
from posttrain.trainers.common import AtomicCheckpointMixin, CountedDPOTruncationMixin

logger = logging.getLogger("posttrain")

MASK_FILE = "sparsepo_mask.safetensors"
TILE = 1024  # completion positions per tile when full-vocab logits are needed
_NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}


def _unwrap(model):
    """The bare ``PreTrainedModel`` (through DDP/accelerate wrappers and PEFT)."""
    from peft import PeftModel

    while hasattr(model, "module") and not isinstance(model, torch.nn.Linear):
        model = model.module
    return model.get_base_model() if isinstance(model, PeftModel) else model


def _decoder_layers(backbone):
    layers = getattr(backbone, "layers", None)
    if layers is None:
        raise UserError(
            "method.mask: reference (MaPO) hooks Llama/Qwen2-style decoder layers (backbone.layers[i].mlp.down_proj, "
            f"self_attn.q/k/v/o_proj); {type(backbone).__name__} has none. Use mask: learned."
        )
    return layers


def _mapo_hooks(backbone, streams: dict[str, list[torch.Tensor]]) -> list:
    """Forward hooks on the decoder layers of ``backbone`` that append the MaPO activation streams (the MLP's
    down-projection input, the attention's q/k/v outputs and o-projection input, each averaged over its last
    dimension) to ``streams`` (docs/methods/sparsepo.md#reference-mask-mapo); the caller removes them."""

    def save(stream, which):
        def fn(module, args, out=None):
            t = args[0] if which == "in" else out
            streams[stream].append(t.detach().float().mean(-1))

        return fn

    hooks = []
    for layer in _decoder_layers(backbone):
        attn, mlp = layer.self_attn, layer.mlp
        hooks.append(mlp.down_proj.register_forward_pre_hook(save("mlp", "in")))
        for proj in ("q_proj", "k_proj", "v_proj"):
            hooks.append(getattr(attn, proj).register_forward_hook(save("attn", "out")))
        hooks.append(attn.o_proj.register_forward_pre_hook(save("attn", "in")))
    return hooks


TURN_MASK_COLUMNS = ("chosen_mask", "rejected_mask")


@contextlib.contextmanager
def _collator_class(cls):
    """While ``DPOTrainer.__init__`` runs, it builds its default collator from ``cls`` (which then also serves the
    optional precomputation of reference log-probs there)."""
    original = _trl_dpo.DataCollatorForPreference
    _trl_dpo.DataCollatorForPreference = cls
    try:
        yield
    finally:
        _trl_dpo.DataCollatorForPreference = original


class TurnMaskedPreferenceCollator(_trl_dpo.DataCollatorForPreference):
    """TRL's preference collator, with the completion mask narrowed to the scored tokens of conversational pairs
    (``chosen_mask`` / ``rejected_mask``: a tool result inside a multi-message completion is not scored). Rows without
    those columns collate exactly as in TRL."""

    def torch_call(self, examples):
        batch = super().torch_call(examples)
        if TURN_MASK_COLUMNS[0] not in examples[0]:
            return batch
        masks = [[0] * len(e["prompt_ids"]) + list(e[col]) for col in TURN_MASK_COLUMNS for e in examples]
        if self.max_length is not None:  # the collator's own truncation of the sequences
            sl = slice(None, self.max_length) if self.truncation_mode == "keep_start" else slice(-self.max_length, None)
            masks = [m[sl] for m in masks]
        width = batch["completion_mask"].shape[1]
        turns = torch.tensor([m + [0] * (width - len(m)) for m in masks], dtype=batch["completion_mask"].dtype)
        batch["completion_mask"] = batch["completion_mask"] * turns
        return batch


class ConversationalPairsMixin:
    """``DPOTrainer._prepare_dataset`` for conversational pairs: the prompt, chosen and rejected token ids and the
    scored tokens come from :func:`posttrain.data.formatting.tokenize_prompt_completion` (the completion's assistant
    turns and each one's end-of-turn token, for any chat template) instead of TRL's "everything after the prompt".
    Plain-text pairs go to TRL unchanged. Pairs with no assistant turn to score are dropped with a logged count."""

    assistant_turns = "all"

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        from datasets import Dataset

        from posttrain.data.formatting import is_conversation, row_tools, tokenize_prompt_completion

        columns = getattr(dataset, "column_names", None) or []
        if not isinstance(dataset, Dataset) or len(dataset) == 0 or "prompt_ids" in columns or not any(
            is_conversation(dataset[0].get(col)) for col in ("prompt", "chosen", "rejected")
        ):
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if "prompt" not in columns:  # an implicit prompt: the turns chosen and rejected share
            from trl.data_utils import extract_prompt

            dataset = dataset.map(extract_prompt)
        key = f"data.{dataset_name}"
        out: dict[str, list] = {c: [] for c in ("prompt_ids", "chosen_ids", "rejected_ids", *TURN_MASK_COLUMNS)}
        keep = []
        for i, row in enumerate(dataset):
            where, tools = f"{key}: row {i}", row_tools(row)
            chosen, rejected = (tokenize_prompt_completion(row["prompt"], row[side], processing_class, where,
                                                           self.assistant_turns, tools)
                                for side in ("chosen", "rejected"))
            if not chosen.spans or not rejected.spans:
                continue
            start = min(chosen.spans[0][0], rejected.spans[0][0])
            if chosen.input_ids[:start] != rejected.input_ids[:start]:
                raise UserError(f"{where}: the chat template renders the prompt differently before chosen and "
                                "rejected")
            out["prompt_ids"].append(chosen.input_ids[:start])
            for side, tokens in (("chosen", chosen), ("rejected", rejected)):
                out[f"{side}_ids"].append(tokens.input_ids[start:])
                out[f"{side}_mask"].append(tokens.mask[start:])
            keep.append(i)
        if len(keep) < len(dataset):
            logger.warning("%s: skipped %d of %d pairs with no assistant turn to score", key, len(dataset) - len(keep),
                           len(dataset))
        if not keep:
            raise UserError(f"{key}: no pair has an assistant turn to score")
        dataset = dataset.select(keep) if len(keep) < len(dataset) else dataset
        for column, values in out.items():
            dataset = dataset.add_column(column, values)
        return dataset


class PosttrainPreferenceTrainer(AtomicCheckpointMixin, CountedDPOTruncationMixin, ConversationalPairsMixin,
                                 DPOTrainer):
    """The preference family (every ``PREFERENCE_LOSSES`` entry) on top of ``trl.DPOTrainer``.

    Args:
        method: the method name (:mod:`posttrain.methods`).
        params: its hyperparameters. ``beta``, ``loss_type``, ``label_smoothing``, ``precompute_ref_log_probs`` and
            ``use_weighting`` of the ``DPOConfig`` must agree with them (``build_preference_trainer`` sets them).
    """

    def __init__(self, *args, method: str, params, assistant_turns: str = "all", **kwargs):
        self.method = method
        self.params = params
        self.assistant_turns = assistant_turns
        self.mask_net: torch.nn.ModuleDict | None = None
        self.objective = PREFERENCE_LOSSES[method]
        config = kwargs.get("args")
        share = getattr(config, "share_prompts", True)
        if share and getattr(self, "counts_body_tokens", False):
            log_once("shared prompts off: the adapter's balance loss counts the tokens of every row (GOAT); every row "
                     "runs whole (same results, no saving)")
            share = False
        self.engine = LogProbEngine(getattr(config, "logprob_head", "auto"), share_prompts=share)
        self.use_engine = True  # False: TRL's fused head on whole rows (the path before the engine; tests compare both)
        if not self.engine.share_prompts:
            log_once("shared prompts off (training.share_prompts: false): chosen and rejected rows run whole")
        unknown = self.objective.needs(params) - PREFERENCE_NEEDS
        if unknown:
            raise ValueError(f"preference loss {method!r} needs {sorted(unknown)}; the trainer computes "
                             f"{sorted(PREFERENCE_NEEDS)}")
        reference_free = METHODS[method].reference_free
        with contextlib.ExitStack() as patches:
            # A reference-free method needs no reference: stop DPOTrainer from loading a second copy of the policy.
            if reference_free:
                patches.enter_context(trl_reference_factory(_trl_dpo, None))
            patches.enter_context(_collator_class(TurnMaskedPreferenceCollator))
            super().__init__(*args, **kwargs)
        if reference_free:
            self.ref_model = None
        elif self.precompute_ref_logps and self.ref_model is not None:
            self.ref_model = None  # precomputed columns replace the reference: do not keep it in memory
        if params.learned_mask:
            cfg = _unwrap(self.model).config.get_text_config()
            eps = getattr(cfg, "rms_norm_eps", None) or getattr(cfg, "layer_norm_eps", None) or 1e-5
            names = ["reward", "kl"] if params.rw_kl_independent else ["common"]
            self.mask_net = torch.nn.ModuleDict(
                {
                    n: SparsePOMaskNet(cfg.hidden_size, cfg.num_hidden_layers, eps, params.mask_dropout)
                    for n in names
                }
            ).to(self.args.device)
            if self.accelerator.num_processes > 1:  # not wrapped in DDP: average its gradients across ranks
                world = self.accelerator.num_processes

                def _mean_over_ranks(grad):
                    grad = grad.clone()
                    torch.distributed.all_reduce(grad)
                    return grad / world

                for param in self.mask_net.parameters():
                    param.register_hook(_mean_over_ranks)

    @property
    def _collective(self) -> Collective:
        accelerator = self.accelerator

        def token_share(mask):
            return process_share(accelerator, mask.sum()) if accelerator.num_processes > 1 else None

        return Collective(gather=accelerator.gather, token_share=token_share)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        missing = [c for c in TURN_MASK_COLUMNS if c not in self._signature_columns]
        if missing:
            self._signature_columns = [*self._signature_columns, *missing]

    # ---------------------------------------------------------------------------------------------------------------
    # Learned SparsePO mask: optimised jointly, saved next to the policy
    # ---------------------------------------------------------------------------------------------------------------

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if self.mask_net is not None and not any(
            p is q for g in optimizer.param_groups for p in g["params"] for q in self.mask_net.parameters()
        ):
            optimizer.add_param_group(
                {"params": list(self.mask_net.parameters()), "weight_decay": self.params.mask_weight_decay}
            )
            # HF's loop only calls model.zero_grad() after each optimizer step; the mask network is not part of the
            # model, so without this its gradients would keep accumulating over all steps.
            mask_net = self.mask_net
            optimizer.register_step_post_hook(lambda *_: mask_net.zero_grad(set_to_none=True))
        return optimizer

    def _save(self, output_dir: str | None = None, state_dict=None):
        super()._save(output_dir, state_dict)
        if self.mask_net is not None and self.args.should_save:
            from safetensors.torch import save_file

            out = Path(output_dir if output_dir is not None else self.args.output_dir)
            tensors = {k: v.detach().cpu().contiguous() for k, v in self.mask_net.state_dict().items()}
            save_file(tensors, str(out / MASK_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = Path(resume_from_checkpoint) / MASK_FILE
        if self.mask_net is not None and path.is_file():
            from safetensors.torch import load_file

            self.mask_net.load_state_dict(load_file(str(path), device=str(self.args.device)))

    # ---------------------------------------------------------------------------------------------------------------
    # Forwards
    # ---------------------------------------------------------------------------------------------------------------

    def _reference(self):
        """The live reference (:class:`Reference`: the frozen ``ref_model``, or the adapter-disabled policy)."""
        missing = RuntimeError("no reference model: pass ref_model, use PEFT, or precompute reference log-probs")
        return Reference(self.ref_model, missing=missing)

    @property
    def _uses_engine(self) -> bool:
        """The log-prob engine runs the forwards (``use_engine``); a router aux loss (MoE) needs the whole causal LM's
        forward, so TRL's fused head runs instead."""
        if self.aux_loss_enabled and self.use_engine:
            log_once("log-prob engine off: the model's router aux loss needs the full causal-LM forward; TRL's fused "
                     "head scores every row whole (same losses, no saving)")
        return self.use_engine and not self.aux_loss_enabled

    def _ref_forward_context(self):
        return disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs)

    def _ref_sequence_logps(self, inputs, batch: "_Batch", device):
        """The ``ref_logps`` need: summed reference log-probs of the chosen and of the rejected rows, precomputed
        (the ``precompute_ref_log_probs`` columns, :meth:`_precompute_ref_logps`) or from a live reference forward."""
        if self.precompute_ref_logps:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_chosen, ref_rejected = self._reference_pass(self.model, self._reference(), batch)
        return ref_chosen.to(device), ref_rejected.to(device)

    def _reference_pass(self, model, reference: Reference, batch: "_Batch"):
        """Summed reference log-probs ``([B], [B])`` of the chosen and rejected rows: the engine's forward under
        ``no_grad`` (pairs sharing their prompt), or TRL's fused head when the engine is off."""
        if self._uses_engine:
            with self._ref_forward_context():
                ref = self.engine.reference_forward(reference, model, batch.input_ids, batch.attention_mask,
                                                    batch.ref_mask, groups=batch.groups)
            return ref.logps.sum(-1).chunk(2, dim=0)
        ref_kwargs = {k: v for k, v in batch.model_kwargs.items() if k != "output_router_logits"}
        labels = batch.input_ids.masked_fill(batch.ref_mask == 0, -100)
        with torch.no_grad(), self._ref_forward_context(), reference.network(model) as net:
            out = net(**ref_kwargs, labels=labels, fused_lm_head=True)
        return sequence_logps(out.log_probs[:, -batch.mask.size(1):], batch.mask).chunk(2, dim=0)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        """TRL's one-off reference pass of ``precompute_ref_log_probs`` (its ``ref_chosen_logps`` /
        ``ref_rejected_logps`` columns, which the collator puts in each batch, so shuffling, accumulation and sharding
        read each pair's own values) through the shared plan
        (:func:`posttrain.logprobs.reference.precomputed_reference`): the collated pairs, scored as the live reference
        scores them (the engine's reference forward, each pair's prompt shared by its two rows), on every process,
        cached in ``$POSTTRAIN_REFERENCE_CACHE`` (else ``$POSTTRAIN_CACHE/reference``) keyed by model + rows + chat
        template, so that a rerun reads the file. The reference: ``ref_model``, or the policy (adapter disabled with
        PEFT; before training it is the reference). A method that reads no summed reference log-probs (reference-free)
        has nothing to precompute: the dataset is returned as it is."""
        from datasets import Dataset

        from posttrain.logprobs.reference import precomputed_reference

        if REF_LOGPS not in self.objective.needs(self.params):
            return dataset
        if not isinstance(dataset, Dataset):  # TRL refuses an IterableDataset
            return super()._precompute_ref_logps(dataset, name, batch_size)
        sides: tuple[list[dict], list[dict]] = ([], [])
        for columns in dataset.iter(batch_size):  # a slice of columns at a time: reading row by row is slow
            rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
            batch = _Batch.of(self.data_collator(rows), self.params, aux_loss=False)
            pairs = batch.input_ids.shape[0] // 2
            for row in range(2 * pairs):
                keep = batch.attention_mask[row].bool()
                sides[row // pairs].append({"input_ids": batch.input_ids[row][keep].tolist(),
                                            "completion_mask": batch.ref_mask[row][keep].tolist()})
        model = self.model if self.ref_model is None else self.ref_model
        if self.ref_model is None and self.is_deepspeed_enabled:  # the policy, placed as TRL does
            from trl.models import prepare_deepspeed

            if self._precompute_engine is None:
                self._precompute_engine = prepare_deepspeed(self.model, self.accelerator)
            model = self._precompute_engine
        reference = Reference(None if self.ref_model is None and peft_model_of(model) is not None else model)
        n = len(dataset)
        with self.accelerator.autocast(), self._ref_forward_context():
            logps = precomputed_reference(
                reference, model, [*sides[0], *sides[1]], accelerator=self.accelerator, engine=self.engine,
                template=getattr(self._tokenizer, "chat_template", None), groups=list(range(n)) * 2,
                batch_size=2 * batch_size, pad_token_id=self._tokenizer.pad_token_id).sums()
        return dataset.add_column("ref_chosen_logps", logps[:n].tolist()).add_column(
            "ref_rejected_logps", logps[n:].tolist())

    def _policy_pass(self, model, batch: "_Batch", needs) -> "_PolicyPass":
        """The policy's per-token log-probs ``[2B, T-1]`` with grad and the per-token statistics TRL's metrics log
        (entropy, mean logit, top-1 hit; ``log sum p^2`` for WPO's sampled alignment), plus the hidden rows that
        predict the scored tokens when a need projects them again (WPO greedy; SparsePO off the engine). On the
        engine, SparsePO's token KL is tiled inside the policy's forward against the reference's rows (where ZeRO-3 /
        FSDP2 have the policy's head gathered), the reference run first (:meth:`_sparsepo_reference`)."""
        p = self.params
        greedy = LOG_ALIGNMENT in needs and p.wpo_alignment == "greedy"
        sum_sq = LOG_ALIGNMENT in needs and p.wpo_alignment == "sampled"
        if self._uses_engine:
            sparsepo = self._sparsepo_reference(model, batch) if TOKEN_KL in needs else None
            statistics = ("entropy", "mean_logits", "is_top1", *(("log_sum_sq_probs",) if sum_sq else ()))
            out = self.engine.forward(model, batch.input_ids, batch.attention_mask, batch.scored, groups=batch.groups,
                                      needs=Needs(rows=greedy, statistics=statistics), share_until=batch.share_until,
                                      kl_with=None if sparsepo is None else sparsepo.rows,
                                      kl_direction="base_to_policy")  # KL(pi_ref || pi_theta)
            stats = out.statistics
            token_kl = None
            if sparsepo is not None:
                token_kl = (torch.where(batch.mask.bool(), out.kl[:, 1:], 0.0), sparsepo.ref_token_logps,
                            sparsepo.masks)
            return _PolicyPass(
                logps=out.logps[:, 1:], entropy=stats["entropy"][:, 1:], mean_logits=stats["mean_logits"][:, 1:],
                is_top1=stats["is_top1"][:, 1:],
                log_sum_sq=stats["log_sum_sq_probs"][:, 1:] if sum_sq else None,
                rows=out.rows.hidden if greedy else None,
                head=(out.rows.weight, out.rows.bias) if greedy else None, token_kl=token_kl)
        want_rows = TOKEN_KL in needs or greedy
        hidden: dict[str, torch.Tensor] = {}
        hook = None
        if want_rows:
            hook = _unwrap(model).base_model.register_forward_hook(
                lambda m, a, out: hidden.__setitem__("h", out.last_hidden_state))
        labels = batch.input_ids.masked_fill(batch.scored == 0, -100)
        try:
            outputs = model(**batch.model_kwargs, labels=labels, fused_lm_head=True)
        finally:
            if hook is not None:
                hook.remove()
        seq_len = batch.mask.size(1)
        head = _unwrap(model).get_output_embeddings()
        return _PolicyPass(
            logps=outputs.log_probs[:, -seq_len:], entropy=outputs.entropy[:, -seq_len:],
            mean_logits=outputs.mean_logits[:, -seq_len:], is_top1=outputs.is_top1[:, -seq_len:],
            log_sum_sq=outputs.log_sum_sq_probs[:, -seq_len:] if sum_sq else None,
            rows=hidden["h"][:, :-1][batch.scored[:, 1:].bool()] if want_rows else None,
            head=(head.weight, head.bias) if want_rows else None,
            aux_loss=outputs.aux_loss if self.aux_loss_enabled else None)

    # ---------------------------------------------------------------------------------------------------------------
    # Loss
    # ---------------------------------------------------------------------------------------------------------------

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        p = self.params
        batch = _Batch.of(inputs, p, self.aux_loss_enabled)
        mask = batch.mask
        needs = self.objective.needs(p)
        policy = self._policy_pass(model, batch, needs)
        per_token_logps = policy.logps
        chosen_logps, rejected_logps = sequence_logps(per_token_logps, mask).chunk(2, dim=0)
        computed: dict[str, Any] = {}
        if REF_LOGPS in needs:
            computed["ref_chosen_logps"], computed["ref_rejected_logps"] = self._ref_sequence_logps(
                inputs, batch, chosen_logps.device)
        if LOG_ALIGNMENT in needs:
            computed["log_alignment"] = self._wpo_log_alignment(policy, mask)
        if TOKEN_KL in needs:
            computed["token_kl"], computed["ref_token_logps"], computed["token_masks"] = (
                policy.token_kl if policy.token_kl is not None else self._sparsepo_forward(model, batch, policy.rows))
        fwd = PreferenceForward(
            logps=per_token_logps, mask=mask, completion_mask=batch.completion_mask,
            scored_mask=batch.scored[:, 1:].bool(), chosen_logps=chosen_logps,
            rejected_logps=rejected_logps, comm=self._collective, **computed)
        loss, metrics = self.objective.fn(p, fwd)

        if policy.aux_loss is not None:
            loss = loss + self.router_aux_loss_coef * policy.aux_loss
            metrics["aux_loss"] = policy.aux_loss.detach()
        # values already gathered over processes stay as they are; per-process ones are averaged, token means pooled
        for name, value in reduce_metrics(self.accelerator, metrics).items():
            self._metrics[mode][name].append(value)
        self._log_trl_metrics(mode, inputs, policy, mask)
        if return_outputs:
            with torch.no_grad():
                outputs = model(**batch.model_kwargs)
            return loss, outputs
        return loss

    # WPO ---------------------------------------------------------------------------------------------------------

    def _wpo_log_alignment(self, policy: "_PolicyPass", mask):
        """The ``log_alignment`` need: WPO's per-token ``log sum_v pi(v)^2`` (sampled) or greedy alignment ``[2B, T-1]``
        (None with ``wpo_alignment: none``)."""
        alignment = self.params.wpo_alignment
        if alignment == "none":
            return None
        if alignment == "sampled":  # log sum_v pi(v)^2 from the head's own chunks (no full logits kept)
            return policy.log_sum_sq.detach()
        # greedy: max(z) - logsumexp(z) over the scored rows, no grad (the head's weights read whole: gathered under
        # ZeRO-3, all-gathered from FSDP2's shards)
        head_weight, head_bias = policy.head
        sel = mask.bool()
        with torch.no_grad(), gathered(head_weight, head_bias):
            weight = full_weight(head_weight)
            bias = None if head_bias is None else full_weight(head_bias)
            h = policy.rows.detach()
            pieces = [
                wpo_log_alignment(F.linear(h[i : i + TILE], weight, bias).float(), "greedy")
                for i in range(0, h.shape[0], TILE)
            ]
        flat = torch.cat(pieces) if pieces else h.new_zeros(0)
        return flat.new_zeros(mask.shape).masked_scatter(sel, flat.float())

    # SparsePO ----------------------------------------------------------------------------------------------------

    def _sparsepo_reference(self, model, batch: "_Batch") -> "_SparsePOReference":
        """SparsePO's reference side on the engine: one forward of the reference under ``no_grad`` over the caller's
        rows (unshared: the MaPO mask reads per-row activations) for its per-token log-probs ``[2B, T-1]``, its rows
        and head for the token KL (a gathered copy of the head under ZeRO-3 / FSDP2) and the token masks
        (:meth:`_sparsepo_masks`)."""
        streams: dict[str, list[torch.Tensor]] = {"mlp": [], "attn": [], "resid": [], "logits": []}
        reference = self._reference()
        net, _ = reference.resolve(model)
        hooks = [] if self.params.learned_mask else _mapo_hooks(_unwrap(net).base_model, streams)
        try:
            with self._ref_forward_context():
                ref = self.engine.reference_forward(reference, model, batch.input_ids, batch.attention_mask,
                                                    batch.scored, needs=Needs(rows=True, hidden=True,
                                                                              layer_states=True))
        finally:
            for h in hooks:
                h.remove()
        mask = batch.mask.bool()
        masks = self._sparsepo_masks(streams, ref.layer_states, ref.hidden, ref.rows.weight, ref.rows.bias, mask)
        return _SparsePOReference(ref.rows, torch.where(mask, ref.logps[:, 1:], 0.0), masks)

    def _sparsepo_masks(self, streams, layer_states, last_hidden, head_weight, head_bias, mask):
        """SparsePO's token masks from the reference's forward: the MaPO mask (``{"common"}``) from the hooked
        ``streams``, the layer states and the last hidden state through the head's mean row, or the learned mask
        network (``{"common"}`` or ``{"reward", "kl"}``) on the layer states."""
        if self.params.learned_mask:
            self.mask_net.train(self.model.training)
            layer_states = [h[:, :-1] for h in layer_states[1:]]
            return {name: m(layer_states) for name, m in self.mask_net.items()}
        streams["resid"] = [h.detach().float().mean(-1) for h in layer_states]
        w_mean = head_weight.float().mean(0)
        b_mean = head_bias.float().mean() if head_bias is not None else 0.0
        streams["logits"] = [last_hidden.float() @ w_mean + b_mean]
        aligned = {k: [t[:, :-1] for t in v] for k, v in streams.items()}
        return {"common": mapo_mask(aligned, mask)}

    def _sparsepo_forward(self, model, batch: "_Batch", h_pol):
        """SparsePO off the log-prob engine (the path before it): the ``token_kl``, ``ref_token_logps`` and
        ``token_masks`` needs from the reference's backbone, the token KL(pi_ref || pi_theta) projected through the
        policy's head after its forward (with grad through the policy's hidden states), in tiles. ZeRO-3 / FSDP2
        keep that head sharded there: refused."""
        backend = backend_name(self.accelerator)
        if backend in SHARDED:
            raise UserError(
                f"method.name: {self.method} cannot run with --distributed {backend} here: the log-prob engine is off "
                "(the model's router aux loss needs the full causal-LM forward), so the token KL would project the "
                "policy's hidden states through its output head after the forward, where that backend keeps the head "
                "sharded; use --distributed ddp or zero2")
        mask = batch.mask
        sel = mask.bool()
        net, ctx = self._reference().resolve(self.model)
        ref = _unwrap(net)
        backbone = ref.base_model
        streams: dict[str, list[torch.Tensor]] = {"mlp": [], "attn": [], "resid": [], "logits": []}
        hooks = [] if self.params.learned_mask else _mapo_hooks(backbone, streams)
        ref_kwargs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        try:
            with (
                torch.no_grad(),
                disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
                ctx,
            ):
                ref_out = backbone(**ref_kwargs, output_hidden_states=True, use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        ref_hidden = ref_out.last_hidden_state[:, :-1]
        ref_head = ref.get_output_embeddings()
        policy_head = _unwrap(model).get_output_embeddings()

        # token KL(pi_ref || pi_theta) and reference log-probs on completion positions, in tiles
        targets = batch.input_ids[:, 1:][sel]
        h_ref = ref_hidden[sel]
        weight, bias = policy_head.weight, policy_head.bias

        def tile(hp, hr, y):
            policy_logits = F.linear(hp, weight, bias)
            with torch.no_grad():
                ref_logits = ref_head(hr).float()
                ref_lp = ref_logits.gather(-1, y[:, None]).squeeze(-1) - ref_logits.logsumexp(-1)
            return sparsepo_token_kl(policy_logits, ref_logits), ref_lp

        kls, ref_lps = [], []
        for i in range(0, h_pol.shape[0], TILE):
            args = (h_pol[i : i + TILE], h_ref[i : i + TILE], targets[i : i + TILE])
            kl, rl = checkpoint(tile, *args, use_reentrant=False) if torch.is_grad_enabled() else tile(*args)
            kls.append(kl)
            ref_lps.append(rl)
        zeros = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        token_kl = zeros.masked_scatter(sel, torch.cat(kls)) if kls else zeros
        ref_per_token = zeros.masked_scatter(sel, torch.cat(ref_lps)) if ref_lps else zeros
        masks = self._sparsepo_masks(streams, ref_out.hidden_states, ref_out.last_hidden_state, ref_head.weight,
                                     ref_head.bias, mask)
        return token_kl, ref_per_token, masks

    # Shared TRL metrics ------------------------------------------------------------------------------------------

    def _log_trl_metrics(self, mode, inputs, policy: "_PolicyPass", mask):
        """TRL's extra DPO metrics: entropy, num_tokens, logits/chosen|rejected, mean_token_accuracy."""
        g = self.accelerator.gather_for_metrics
        m = self._metrics[mode]
        ent, tok = g((policy.entropy.detach() * mask).sum()).sum(), g(mask.sum()).sum()
        m["entropy"].append((ent / tok).item() if tok > 0 else 0.0)
        if mode == "train":
            self._total_train_tokens += g(inputs["attention_mask"].sum()).sum().item() // self._tp_size
        m["num_tokens"] = [self._total_train_tokens]
        c_mask, r_mask = mask.chunk(2, dim=0)
        c_logits, r_logits = policy.mean_logits.chunk(2, dim=0)
        for name, lg, mk in (("chosen", c_logits, c_mask), ("rejected", r_logits, r_mask)):
            total, count = g(lg[mk.bool()].sum()).sum().item(), g(mk.sum()).sum().item()
            m[f"logits/{name}"].append(total / count if count > 0 else 0.0)
        top1, _ = policy.is_top1.chunk(2, dim=0)
        correct, total = g((top1 & c_mask.bool()).sum()).sum(), g(c_mask.sum()).sum()
        m["mean_token_accuracy"].append((correct / total).item() if total > 0 else 0.0)


@dataclass
class _Batch:
    """One collated batch of pairs (``[2B, T]``, chosen rows first) as the forwards read it. ``scored``: the tokens the
    head scores (the completions, plus the prompts when the method's SFT term reads them: ORPO), each predicted from
    a real token; ``ref_mask``: the completions so scored; ``mask``: ``ref_mask`` shifted (``[2B, T-1]``, what the
    losses sum over); ``groups``: pair ids (chosen row ``b`` and rejected row ``b`` share their prompt);
    ``share_until``: where the shared prompt ends when ``scored`` starts before it."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    scored: torch.Tensor
    ref_mask: torch.Tensor
    mask: torch.Tensor
    groups: list[int]
    share_until: torch.Tensor | None
    model_kwargs: dict[str, Any]

    @classmethod
    def of(cls, inputs, params, aux_loss: bool) -> "_Batch":
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        completion_mask = inputs["completion_mask"]
        # a token is scored only when the token before it is real: never the first column (an empty prompt), never
        # right after left padding
        predicted = torch.zeros_like(attention_mask)
        predicted[:, 1:] = attention_mask[:, :-1] * attention_mask[:, 1:]
        ref_mask = completion_mask * predicted
        scored = predicted if params.scores_prompt_tokens else ref_mask
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        if aux_loss:
            model_kwargs["output_router_logits"] = True
        pairs = input_ids.shape[0] // 2
        return cls(input_ids, attention_mask, completion_mask, scored, ref_mask, ref_mask[:, 1:],
                   list(range(pairs)) * 2, completion_mask if params.scores_prompt_tokens else None, model_kwargs)


@dataclass
class _PolicyPass:
    """The policy forward of one batch: per-token ``[2B, T-1]`` log-probs (with grad) and statistics, the hidden rows
    predicting the scored tokens (``[N, H]``, in ``mask.nonzero()`` order) and the head's ``(weight, bias)`` when a
    need projects them again, and the router aux loss (MoE, engine off)."""

    logps: torch.Tensor
    entropy: torch.Tensor
    mean_logits: torch.Tensor
    is_top1: torch.Tensor
    log_sum_sq: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    head: tuple | None = None
    aux_loss: torch.Tensor | None = None
    token_kl: tuple | None = None  # SparsePO on the engine: (token KL, reference log-probs, token masks)


@dataclass
class _SparsePOReference:
    """SparsePO's reference side (:meth:`PosttrainPreferenceTrainer._sparsepo_reference`): the reference's rows and
    head for the token KL, its per-token log-probs ``[2B, T-1]`` and the token masks."""

    rows: HeadRows
    ref_token_logps: torch.Tensor
    masks: dict[str, torch.Tensor]


# ----------------------------------------------------------------------------------------------------------------------
# Building from a recipe
# ----------------------------------------------------------------------------------------------------------------------

# DPOConfig fields that a method's own keys set; a recipe must set them under `method:`.
_METHOD_OWNED = {
    "beta": "method.beta",
    "loss_type": "method.loss",
    "label_smoothing": "method.label_smoothing",
    "precompute_ref_log_probs": "method.precompute_ref_log_probs",
    "use_weighting": "method.name: wpo (method.use_weighting)",
}
_UNSUPPORTED = ("loss_weights", "ld_alpha", "f_divergence_type", "f_alpha_divergence_coef", "use_liger_kernel")


def preference_config(recipe, info):
    """The :class:`PreferenceConfig` (``DPOConfig`` + the log-prob engine's keys) of a preference-family recipe, built
    before any model loads; a ``training.logprob_head`` that cannot run on this machine is refused here."""
    from posttrain.families.preference.config import PreferenceConfig
    from posttrain.logprobs.heads import check_head_here
    from posttrain.trainers.common import training_config

    params, name = recipe.params, info.name
    for key, where in _METHOD_OWNED.items():
        if key in recipe.training:
            raise UserError(f"training.{key}: set by the method; use {where}")
    for key in _UNSUPPORTED:
        if key in recipe.training:
            raise UserError(f"training.{key}: not supported by posttrain's preference trainer")
    if recipe.data.train is None:
        raise UserError("data.train: required key is missing")
    overrides = {
        "beta": params.beta,
        "loss_type": [getattr(params, "loss", "sigmoid")],
        "label_smoothing": getattr(params, "label_smoothing", 0.0),
        "precompute_ref_log_probs": getattr(params, "precompute_ref_log_probs", False),
        # WPO: makes TRL's fused LM head also return log(sum_v p_v^2) (the sampled weight alignment)
        "use_weighting": params.fused_weighting,
        "max_length": 512,
    }
    if recipe.data.eval is not None:
        overrides.update(eval_strategy="steps", eval_steps=recipe.training.get("logging_steps", 10))
    config = training_config(PreferenceConfig, recipe, overrides)
    check_head_here(config)
    if config.sync_ref_model and (not recipe.reference.used or overrides["precompute_ref_log_probs"]):
        why = f"method '{name}' uses none" if not recipe.reference.used else "precompute_ref_log_probs keeps none"
        raise UserError(f"training.sync_ref_model: needs a live reference model ({why})")
    return config


def build_preference_trainer(ctx):
    """Every preference-family method on :class:`PosttrainPreferenceTrainer`."""
    from posttrain.adapters.trainer import make_trainer
    from posttrain.trainers.common import trainer_kwargs

    recipe = ctx.recipe
    config = ctx.config if ctx.config is not None else preference_config(recipe, ctx.info)
    train = ctx.dataset("data.train", "preference")
    evals = ctx.dataset("data.eval", "preference") if recipe.data.eval is not None else None
    return make_trainer(  # the peft.type variant (plora/goat/ggpo) wraps the class; plain LoRA: the class itself
        PosttrainPreferenceTrainer,
        recipe,
        uses_disabled_adapter_reference=recipe.reference.uses_disabled_adapter,
        **trainer_kwargs(ctx, config, train, evals),
        method=ctx.info.name,
        assistant_turns=recipe.data.assistant_turns,
    )
