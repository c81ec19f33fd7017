"""The unlearning-family trainer (``ga``, ``grad_diff``, ``npo``, ``npo_rt``, ``npo_kl``, ``simnpo``, ``rmu``).

A thin subclass of ``transformers.Trainer`` (TRL has no unlearning trainer). Data: every item pairs one forget row
with one retain row (the forget set is the anchor, as in open-unlearning's ``ForgetRetainDataset``; the retain row is
drawn at random, seeded by ``seed``, item and epoch). Labels cover the answer tokens plus the EOS the collator appends
(TOFU); the question is ``-100``.

Each objective declares what it ``needs`` from the forward pass (``needs(params)`` of its entry in
:data:`~posttrain.families.unlearning.objective.UNLEARNING_OBJECTIVES`); the trainer computes exactly that, through the
log-prob engine (:mod:`posttrain.logprobs`: completion-only per-token log-probs, docs/logprob_engine.md). Per step the
policy is called once on ``[forget; retain]`` stacked for the NLL-retain methods, on the forget rows alone
otherwise. NPO calls the frozen reference (``ref_model``, or the adapter-disabled policy with ``peft`` and no
``ref_model``) once on the forget rows under ``no_grad``. The retain KL of ``npo_kl`` / ``ga_kl`` is the engine's tiled
KL: the reference's retain rows (hidden states and head, no gradient) go into the policy's retain call, which returns
KL(pi_ref || pi_theta) per answer token without a ``[B, T, V]`` tensor; only ``retain_kl_mask: none`` (every
position, prompt and padding included, which the engine does not score) keeps full-logits forwards (TRL's fused head
for the log-probs). ``use_engine = False`` runs that path for every objective (the path before the engine; the tests
compare both). The pure :func:`posttrain.families.unlearning.objective.unlearning_objective` turns these into the
loss; its metrics
(``forget_loss``, ``retain_loss``, ``forget_nll``, ``retain_nll`` / ``retain_kl``, ``npo/log_ratio_mean``,
``npo/weight_mean``, ``simnpo/*``) plus ``forget_answer_prob`` / ``retain_answer_prob`` (mean per-sequence
``exp(-avg answer NLL)``) are averaged over each logging interval and written to ``metrics.jsonl``.

RMU (an objective that needs ``forget_activations``) works on hidden states instead: a forward hook on one decoder
layer captures its output during the engine's calls on the forget rows and, for the retain term, on the retain rows of
the policy and of the frozen reference (the engine's ``Needs(hidden=...)`` gives the last layer's states, not one
chosen layer's, so the hook stays); only the weights its ``trainable_params`` select move (the others are frozen
before training), and its control vector is drawn once from the run's seed
(:func:`posttrain.losses.unlearning.rmu_control_vector`).

Loss reductions are per micro-batch (the HF ``outputs.loss`` convention of both reference code bases); with gradient
accumulation the loss is divided by the number of micro-batches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
import re
from collections import defaultdict
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback, TrainingArguments

from posttrain.distributed import TokenMean, reduce_metrics
from posttrain.errors import UserError
import posttrain.families.unlearning.methods  # noqa: F401  (registers every objective and term)
from posttrain.families.unlearning.objective import (
    FORGET_ACTIVATIONS,
    FORGET_REF_LOGPS,
    RETAIN_KL,
    RETAIN_LOGPS,
    RETAIN_NEEDS,
    UNLEARNING_NEEDS,
    UNLEARNING_OBJECTIVES,
    UnlearningForward,
    uses_reference,
    uses_retain,
)
from posttrain.logprobs import LogProbEngine, Needs, ensure_fused_head
from posttrain.logprobs.engine import log_once
from posttrain.losses.unlearning import rmu_control_vector
from posttrain.reference import Reference
from posttrain.registry import LogprobHead, logprob_head_field
from posttrain.trainers.common import AtomicCheckpointMixin

logger = logging.getLogger("posttrain")

SIDES = ("forget", "retain")


@dataclasses.dataclass
class UnlearningConfig(TrainingArguments):
    """``TrainingArguments`` plus the sequence cap of the unlearning data and the log-prob engine's head."""

    max_length: int = dataclasses.field(
        default=512, metadata={"help": "Truncate prompt + answer + EOS to this many tokens."}
    )
    logprob_head: LogprobHead = logprob_head_field()


# --------------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------------


def tokenize_rows(rows, tokenizer, max_length: int, key: str = "data") -> list[tuple[list[int], list[int]]]:
    """``(input_ids, labels)`` per ``{prompt, completion}`` row: prompt + completion + EOS, or a conversational row
    through the chat template with the labels on the completion's assistant turns and their end-of-turn token
    (:func:`posttrain.data.formatting.tokenize_prompt_completion`); other labels ``-100``, truncated to
    ``max_length``. Truncated rows are counted in the log; rows whose completion is truncated away entirely (the
    prompt alone fills ``max_length``: nothing to score) are dropped and counted."""
    from posttrain.data.formatting import tokenize_prompt_completion

    prompts, completions = list(rows["prompt"]), list(rows["completion"])
    out, truncated, dropped = [], [], []
    for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        row = tokenize_prompt_completion(prompt, completion, tokenizer, f"{key}: row {i}")
        ids = row.input_ids[:max_length]
        labels = row.labels()[:max_length]
        if all(label == -100 for label in labels):
            dropped.append(i)
            continue
        if len(row.input_ids) > max_length:
            truncated.append(i)
        out.append((ids, labels))
    if truncated:
        logger.warning("%s: truncated %d of %d rows to training.max_length=%d tokens (first: row %d)",
                       key, len(truncated), len(prompts), max_length, truncated[0])
    if dropped:
        logger.warning("%s: dropped %d of %d rows whose answer is truncated away entirely by training.max_length=%d "
                       "(first: row %d)", key, len(dropped), len(prompts), max_length, dropped[0])
    if not out:
        raise UserError(f"{key}: no rows left: every answer is truncated away by training.max_length={max_length}")
    return out


class ForgetRetainDataset(torch.utils.data.Dataset):
    """Item ``i`` = forget row ``i`` + a retain row drawn from ``Random((seed, epoch, i))`` (``None`` without a retain
    set). ``set_epoch`` (called by :class:`_EpochCallback`) redraws the pairing every epoch."""

    def __init__(self, forget: list, retain: list | None, seed: int = 0):
        self.forget, self.retain, self.seed, self.epoch = forget, retain, seed, 0
        # per forget row, the precomputed reference's log-prob of each answer token (None: a live reference)
        self.forget_ref_logps: list[torch.Tensor] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.forget)

    def retain_index(self, i: int) -> int:
        return random.Random(f"{self.seed}-{self.epoch}-{i}").randrange(len(self.retain))

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {"forget": self.forget[i]}
        if self.retain:
            item["retain"] = self.retain[self.retain_index(i)]
        if self.forget_ref_logps is not None:
            item["forget_ref_logps"] = self.forget_ref_logps[i]
        return item


class ForgetRetainCollator:
    """Right-pads each side: ``{side}_input_ids``, ``{side}_attention_mask``, ``{side}_labels`` for forget/retain."""

    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id

    def _pad(self, pairs) -> dict[str, torch.Tensor]:
        width = max(len(ids) for ids, _ in pairs)
        ids = [x + [self.pad] * (width - len(x)) for x, _ in pairs]
        attn = [[1] * len(x) + [0] * (width - len(x)) for x, _ in pairs]
        labels = [y + [-100] * (width - len(y)) for _, y in pairs]
        return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(attn), "labels": torch.tensor(labels)}

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = {}
        for side in SIDES:
            if side in items[0]:
                batch.update({f"{side}_{k}": v for k, v in self._pad([it[side] for it in items]).items()})
        if "forget_ref_logps" in items[0]:  # each scored token's precomputed log-prob at its own position
            scored = _scored(batch["forget_labels"])
            ref = torch.zeros(scored.shape, dtype=torch.float32)
            for b, item in enumerate(items):
                ref[b, scored[b]] = item["forget_ref_logps"]
            batch["forget_ref_logps"] = ref
        return batch


class _EpochCallback(TrainerCallback):
    def __init__(self, dataset: ForgetRetainDataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(math.floor((state.epoch or 0.0) + 1e-9))


# --------------------------------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------------------------------


def _peft_model(model):
    from peft import PeftModel

    while hasattr(model, "module") and not isinstance(model, PeftModel):
        model = model.module
    return model if isinstance(model, PeftModel) else None


def _stack(a: torch.Tensor, b: torch.Tensor, pad) -> torch.Tensor:
    width = max(a.shape[1], b.shape[1])
    a = F.pad(a, (0, width - a.shape[1]), value=pad)
    b = F.pad(b, (0, width - b.shape[1]), value=pad)
    return torch.cat([a, b])


def _decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layers of a causal LM (through DDP/accelerate ``.module`` wrappers): ``model.base_model.layers``."""
    while hasattr(model, "module") and not isinstance(model, torch.nn.ModuleList):
        model = model.module
    layers = getattr(getattr(model, "base_model", model), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise UserError(f"method.rmu_layer: {type(model).__name__} has no decoder layers at base_model.layers (RMU "
                        "steers the output of one of them; Llama/Qwen2-style models have them)")
    return layers


@contextlib.contextmanager
def _captured_output(module: torch.nn.Module):
    """Collects ``module``'s output (the hidden states, first element of a tuple output) on every forward inside."""
    got: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda m, args, out: got.append(out[0] if isinstance(out, tuple) else out))
    try:
        yield got
    finally:
        handle.remove()


def _scored(labels: torch.Tensor) -> torch.Tensor:
    """The engine's ``completion_mask`` of a row's labels: the answer tokens (a label in the first column has no
    token to be predicted from and is never scored, as in the shifted-labels loss)."""
    mask = labels != -100
    mask[:, 0] = False
    return mask


def _answer_prob(logps: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over rows of ``exp(summed answer log-prob / answer tokens)`` (TOFU's Prob, on the training batch)."""
    m = mask.to(torch.float32)
    avg = (logps.detach().float() * m).sum(-1) / m.sum(-1).clamp(min=1.0)
    return float(avg.exp().mean())


class PosttrainUnlearningTrainer(AtomicCheckpointMixin, Trainer):
    """GA, GradDiff, NPO (+RT / +KL), SimNPO and RMU on :class:`ForgetRetainDataset` batches.

    Args:
        method: a key of :data:`posttrain.families.unlearning.objective.UNLEARNING_OBJECTIVES`.
        params: the method's hyperparameters (``methods/<page>.py``).
        ref_model: frozen reference for NPO / KL; ``None`` with a PEFT policy uses the adapter-disabled model.
        peft_config: wrap ``model`` with this adapter (the fused head must already be on ``model``).
    """

    def __init__(self, *args, method: str, params, ref_model=None, peft_config=None, model=None, mask_rows=None,
                 **kwargs):
        self.method = method
        self.params = params
        self.objective = UNLEARNING_OBJECTIVES[method]
        self.needs = self.objective.needs(params)
        unknown = self.needs - UNLEARNING_NEEDS
        if unknown:
            raise ValueError(f"unlearning objective {method!r} needs {sorted(unknown)}; the trainer computes "
                             f"{sorted(UNLEARNING_NEEDS)}")
        # forget and retain rows share no prompt
        self.engine = LogProbEngine(getattr(kwargs.get("args"), "logprob_head", "auto"), share_prompts=False)
        self.use_engine = True  # False: TRL's fused head / full logits on whole rows (the path before the engine)
        wrapped = _peft_model(model)
        ensure_fused_head(model if wrapped is None else wrapped.get_base_model())  # no-op when already patched
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        super().__init__(*args, model=model, **kwargs)
        self.model_accepts_loss_kwargs = False  # micro-batch means: the Trainer divides by the accumulation steps
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self.ref_model = None
        if ref_model is not None:
            from posttrain.distributed import prepare_frozen

            ensure_fused_head(ref_model)
            self.ref_model = prepare_frozen(ref_model, self.accelerator)
        if isinstance(self.train_dataset, ForgetRetainDataset):
            self.add_callback(_EpochCallback(self.train_dataset))
            if FORGET_REF_LOGPS in self.needs and getattr(params, "precompute_ref_log_probs", False):
                self._precompute_forget_reference(self.train_dataset)
        self.control_vector = self._steering_setup() if FORGET_ACTIVATIONS in self.needs else None
        self.weight_mask = None
        if mask_rows is not None:
            from posttrain.families.unlearning.wagle import WagleMask

            self.weight_mask = WagleMask(self, *mask_rows, collator_cls=ForgetRetainCollator)

    def _precompute_forget_reference(self, dataset: ForgetRetainDataset) -> None:
        """The reference's log-probs of every forget answer token, once before training, through the shared plan
        (:func:`posttrain.logprobs.reference.precomputed_reference`: cached on disk, a rerun reads them). The live
        reference is then dropped unless the retain KL still reads its distributions (npo_kl)."""
        from posttrain.logprobs.reference import precomputed_reference

        rows = []
        for ids, labels in dataset.forget:
            scored = _scored(torch.tensor([labels]))[0]
            rows.append({"input_ids": ids, "completion_mask": scored.long().tolist()})
        tok = self.processing_class
        pad = 0 if tok is None or tok.pad_token_id is None else tok.pad_token_id
        policy = self.model
        if self.ref_model is None and self.is_deepspeed_enabled:  # the adapter-disabled policy, placed as TRL does
            from trl.models import prepare_deepspeed

            policy = prepare_deepspeed(self.model, self.accelerator)
        reference = precomputed_reference(
            self._reference_of(), policy, rows, accelerator=self.accelerator, engine=self.engine,
            template=getattr(tok, "chat_template", None), batch_size=self.args.per_device_train_batch_size,
            pad_token_id=pad)
        dataset.forget_ref_logps = reference.token_logps
        if RETAIN_KL not in self.needs:
            self.ref_model = None  # the precomputed log-probs replace the reference: do not keep it in memory

    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        if self.weight_mask is not None:
            self.weight_mask.attach(optimizer)
        return optimizer

    # ---------------------------------------------------------------------------------------------------------------

    def _steering_setup(self) -> torch.Tensor:
        """RMU: check the steered layer, freeze every weight ``trainable_params`` does not select, draw the control
        vector (docs/methods/rmu.md#which-weights-move)."""
        p = self.params
        layers = _decoder_layers(self.model)
        if p.rmu_layer >= len(layers):
            raise UserError(f"method.rmu_layer: {p.rmu_layer} is not a decoder layer of the model (it has "
                            f"{len(layers)}: 0..{len(layers) - 1})")
        patterns = p.trainable_patterns()
        named = list(self.model.named_parameters())
        which = "" if p.trainable_params is not None else "the paper's default "
        for pattern in patterns:
            if not any(re.fullmatch(pattern, name) for name, _ in named):
                raise UserError(f"method.trainable_params: {which}{pattern!r} matches no parameter of the model (names "
                                f"look like {named[-1][0]!r})")
        moving = 0

        def numel(q):  # the whole parameter's size, also when ZeRO-3 holds only a partition here
            return getattr(q, "ds_numel", q.numel())

        for name, param in named:
            selected = any(re.fullmatch(pattern, name) for pattern in patterns)
            param.requires_grad_(selected)
            moving += numel(param) if selected else 0
        logger.info("rmu: steering decoder layer %d; %d of %d weights train (%s)", p.rmu_layer, moving,
                    sum(numel(q) for _, q in named), ", ".join(patterns))
        if self.args.gradient_checkpointing:  # frozen embeddings: keep a gradient path into checkpointed layers
            self.model.enable_input_require_grads()
        hidden = self.model.config.get_text_config().hidden_size
        return rmu_control_vector(hidden, p.steering_coeff, seed=self.args.seed)

    def _steering_loss(self, model, inputs):
        """RMU's loss and metrics: hidden states of ``rmu_layer`` on the forget rows (policy) and on the retain rows
        (policy and frozen reference), in the :class:`UnlearningForward` its objective reads."""
        p = self.params
        f_ids, f_attn, f_lab = self._side(inputs, "forget")
        with _captured_output(_decoder_layers(model)[p.rmu_layer]) as got:
            logps, mask = self._logps(model, f_ids, f_attn, f_lab)
        kwargs: dict[str, Any] = {"forget_activations": got[0], "forget_mask": f_lab != -100,
                                  "control_vector": self.control_vector}
        metrics = {"forget_answer_prob": _answer_prob(logps, mask)}
        if self.uses_retain:
            r_ids, r_attn, r_lab = self._side(inputs, "retain")
            with _captured_output(_decoder_layers(model)[p.rmu_layer]) as got_r:
                logps_r, mask_r = self._logps(model, r_ids, r_attn, r_lab)
            with torch.no_grad(), self._reference(model) as ref, _captured_output(
                    _decoder_layers(ref)[p.rmu_layer]) as got_ref:
                if self.use_engine:  # the reference's activations only: its head scores the answer rows alone
                    self.engine.forward(ref, r_ids, r_attn, _scored(r_lab))
                else:
                    ref(input_ids=r_ids, attention_mask=r_attn, use_cache=False)
            kwargs.update(retain_activations=got_r[0], retain_ref_activations=got_ref[0], retain_mask=r_lab != -100)
            metrics["retain_answer_prob"] = _answer_prob(logps_r, mask_r)
        result = self.objective.fn(p, UnlearningForward(**kwargs))
        metrics.update({k: v for k, v in result.metrics.items() if k != "loss"})
        return result, metrics

    @property
    def uses_retain(self) -> bool:
        return bool(self.needs & RETAIN_NEEDS)

    @property
    def _uses_engine(self) -> bool:
        """The log-prob engine computes the needs (``use_engine``), except for a retain KL over every position
        (``retain_kl_mask: none``: prompt and padding positions, which the engine does not score)."""
        every_position = RETAIN_KL in self.needs and self.params.retain_kl_every_position
        if every_position and self.use_engine:
            log_once("log-prob engine off: the retain KL over every position (retain_kl_mask: none) needs full logits "
                     "at prompt and padding positions; full-logits forwards run instead (same loss, no saving)")
        return self.use_engine and not every_position

    def _logps(self, model, ids, attn, labels) -> tuple[torch.Tensor, torch.Tensor]:
        """The policy's per-token log-probs and mask ``[B, T-1]`` of the answer tokens (row ``t`` scoring token
        ``t + 1``): the engine's completion rows, or TRL's fused head when the engine is off."""
        if self.use_engine:
            out = self.engine.forward(model, ids, attn, _scored(labels))
            return out.logps[:, 1:], out.mask[:, 1:]
        res = model(input_ids=ids, attention_mask=attn, labels=labels, fused_lm_head=True, use_cache=False)
        return res.log_probs, res.label_mask

    def _reference_of(self) -> Reference:
        missing = UserError(f"ref_model: method '{self.method}' needs a reference model")
        return Reference(self.ref_model, missing=missing)

    def _reference(self, model):
        return self._reference_of().network(model)

    def _side(self, inputs, side):
        return inputs[f"{side}_input_ids"], inputs[f"{side}_attention_mask"], inputs[f"{side}_labels"]

    def engine_tensors(self, model, inputs) -> dict[str, torch.Tensor]:
        """The needs through the log-prob engine: per-token log-probs / masks ``[B, T-1]`` of the answer tokens, the
        reference's on the forget rows (``no_grad``), and the retain KL(pi_ref || pi_theta) per answer token from the
        engine's tiled KL against the reference's retain rows (no ``[B, T, V]`` tensor)."""
        needs = self.needs
        f_ids, f_attn, f_lab = self._side(inputs, "forget")
        out: dict[str, torch.Tensor] = {}
        if RETAIN_LOGPS in needs:  # one call on [forget; retain]
            r_ids, r_attn, r_lab = self._side(inputs, "retain")
            pad = self.processing_class.pad_token_id if self.processing_class is not None else 0
            res = self.engine.forward(model, _stack(f_ids, r_ids, pad), _stack(f_attn, r_attn, 0),
                                      _scored(_stack(f_lab, r_lab, -100)))
            b, wf, wr = f_ids.shape[0], f_ids.shape[1], r_ids.shape[1]
            out["forget_logps"], out["forget_mask"] = res.logps[:b, 1:wf], res.mask[:b, 1:wf]
            out["retain_logps"], out["retain_mask"] = res.logps[b:, 1:wr], res.mask[b:, 1:wr]
        else:
            out["forget_logps"], out["forget_mask"] = self._logps(model, f_ids, f_attn, f_lab)
        if "forget_ref_logps" in inputs:  # precomputed before training
            out["forget_ref_logps"] = inputs["forget_ref_logps"][:, 1:]
        elif FORGET_REF_LOGPS in needs:
            ref = self.engine.reference_forward(self._reference_of(), model, f_ids, f_attn, _scored(f_lab))
            out["forget_ref_logps"] = ref.logps[:, 1:]
        if RETAIN_KL in needs:
            r_ids, r_attn, r_lab = self._side(inputs, "retain")
            ref = self.engine.reference_forward(self._reference_of(), model, r_ids, r_attn, _scored(r_lab),
                                                needs=Needs(rows=True))
            res = self.engine.forward(model, r_ids, r_attn, _scored(r_lab), kl_with=ref.rows,
                                      kl_direction="base_to_policy")
            out["retain_token_kl"], out["retain_kl_mask"] = res.kl[:, 1:], res.mask[:, 1:]
            out["retain_nll_logps"] = res.logps[:, 1:]  # for the logged retain NLL and answer probability
        return out

    def policy_and_reference_logps(self, model, inputs) -> dict[str, torch.Tensor]:
        """The needs on the path before the engine: per-token log-probs / masks from TRL's fused head (and full
        logits of the policy and the reference for the KL term); :meth:`objective_inputs` turns them into the
        objective's :class:`UnlearningForward`."""
        f_ids, f_attn, f_lab = self._side(inputs, "forget")
        pad = self.processing_class.pad_token_id if self.processing_class is not None else 0
        out: dict[str, torch.Tensor] = {}
        kl = RETAIN_KL in self.needs
        if RETAIN_LOGPS in self.needs:  # one fused call on [forget; retain]
            r_ids, r_attn, r_lab = self._side(inputs, "retain")
            res = model(
                input_ids=_stack(f_ids, r_ids, pad),
                attention_mask=_stack(f_attn, r_attn, 0),
                labels=_stack(f_lab, r_lab, -100),
                fused_lm_head=True,
                use_cache=False,
            )
            b, wf, wr = f_ids.shape[0], f_ids.shape[1] - 1, r_ids.shape[1] - 1
            out["forget_logps"], out["forget_mask"] = res.log_probs[:b, :wf], res.label_mask[:b, :wf]
            out["retain_logps"], out["retain_mask"] = res.log_probs[b:, :wr], res.label_mask[b:, :wr]
        else:
            res = model(input_ids=f_ids, attention_mask=f_attn, labels=f_lab, fused_lm_head=True, use_cache=False)
            out["forget_logps"], out["forget_mask"] = res.log_probs, res.label_mask
        if kl:
            r_ids, r_attn, r_lab = self._side(inputs, "retain")
            out["retain_logits"] = model(input_ids=r_ids, attention_mask=r_attn, use_cache=False).logits
            out["retain_labels"] = r_lab
        precomputed = "forget_ref_logps" in inputs
        if precomputed:
            out["forget_ref_logps"] = inputs["forget_ref_logps"][:, 1:]
        if kl or (FORGET_REF_LOGPS in self.needs and not precomputed):
            with torch.no_grad(), self._reference(model) as ref:
                if FORGET_REF_LOGPS in self.needs and not precomputed:
                    ref_res = ref(input_ids=f_ids, attention_mask=f_attn, labels=f_lab, fused_lm_head=True,
                                  use_cache=False)
                    out["forget_ref_logps"] = ref_res.log_probs
                if kl:
                    out["retain_ref_logits"] = ref(input_ids=r_ids, attention_mask=r_attn, use_cache=False).logits
        return out

    def objective_inputs(self, t: dict[str, torch.Tensor]) -> UnlearningForward:
        """The objective's :class:`UnlearningForward`: the retain KL's positions (``params.retain_kl_every_position``)
        and, with several processes, each process's share of the global token counts."""
        kwargs: dict[str, Any] = {key: t.get(key) for key in (
            "forget_logps", "forget_mask", "forget_ref_logps", "retain_logps", "retain_mask", "retain_token_kl",
            "retain_kl_mask")}
        if "retain_logits" in t:
            if self.params.retain_kl_every_position:
                kwargs["retain_logits"], kwargs["retain_ref_logits"] = t["retain_logits"], t["retain_ref_logits"]
            else:
                kwargs["retain_logits"] = t["retain_logits"][:, :-1]
                kwargs["retain_ref_logits"] = t["retain_ref_logits"][:, :-1]
                kwargs["retain_kl_mask"] = t["retain_labels"][:, 1:] != -100
        if self.accelerator.num_processes > 1:
            # token means over the global micro-batch: each process's token sum over its share of all processes'
            # tokens (the gradient averaging over processes does the rest)
            from posttrain.distributed import process_share

            kwargs["forget_num_items"] = process_share(self.accelerator, t["forget_mask"].sum())
            if kwargs.get("retain_mask") is not None:
                kwargs["retain_num_items"] = process_share(self.accelerator, kwargs["retain_mask"].sum())
            elif RETAIN_KL in self.needs:
                scored = kwargs.get("retain_kl_mask")
                count = scored.sum() if scored is not None else kwargs["retain_logits"].shape[:-1].numel()
                kwargs["retain_num_items"] = process_share(self.accelerator, count)
        return UnlearningForward(**kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.control_vector is not None:  # RMU: hidden states, not log-probs
            result, metrics = self._steering_loss(model, inputs)
            self._record(metrics)
            return (result.loss, result) if return_outputs else result.loss
        engine = self._uses_engine
        t = self.engine_tensors(model, inputs) if engine else self.policy_and_reference_logps(model, inputs)
        result = self.objective.fn(self.params, self.objective_inputs(t))
        metrics = {k: v for k, v in result.metrics.items() if k != "loss"}
        metrics["forget_answer_prob"] = _answer_prob(t["forget_logps"], t["forget_mask"])
        if "retain_logps" in t:
            metrics["retain_answer_prob"] = _answer_prob(t["retain_logps"], t["retain_mask"])
        elif "retain_nll_logps" in t:
            metrics["retain_nll"] = TokenMean.of(-t["retain_nll_logps"], t["retain_kl_mask"])
            metrics["retain_answer_prob"] = _answer_prob(t["retain_nll_logps"], t["retain_kl_mask"])
        elif "retain_logits" in t:
            with torch.no_grad():
                labels = t["retain_labels"][:, 1:]
                mask = labels != -100
                lp = torch.log_softmax(t["retain_logits"][:, :-1].float(), -1)
                lp = lp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
                metrics["retain_nll"] = TokenMean.of(-lp, mask)
                metrics["retain_answer_prob"] = _answer_prob(lp, mask)
        self._record(metrics)
        return (result.loss, result) if return_outputs else result.loss

    def _record(self, metrics: dict) -> None:
        """Reduced over processes (:func:`posttrain.distributed.reduce_metrics`): the objective's token means use the
        processes' shares of the global token counts, so their mean over processes is the global one."""
        for name, value in reduce_metrics(self.accelerator, metrics).items():
            self._metrics[name].append(value)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._metrics:
            logs = {**logs, **{k: sum(v) / len(v) for k, v in self._metrics.items() if v}}
            self._metrics.clear()
        if "loss" in logs and self.weight_mask is not None:
            logs = {**logs, **self.weight_mask.metrics}
        super().log(logs, *args, **kwargs)


# --------------------------------------------------------------------------------------------------------------------
# Builder
# --------------------------------------------------------------------------------------------------------------------


def _objective_uses_retain(recipe, name: str) -> bool:
    return uses_retain(name, recipe.params)


def _needs_retain(recipe, name: str) -> bool:
    """Whether data.retain is read: by the objective's retain term, or by the WAGLE mask's scoring pass."""
    return _objective_uses_retain(recipe, name) or recipe.params.uses_weight_mask


def unlearning_config(recipe, info) -> UnlearningConfig:
    """The :class:`UnlearningConfig` of an unlearning recipe, after the data-key checks (before any model loads); a
    ``training.logprob_head`` that cannot run on this machine is refused here."""
    from posttrain.logprobs.heads import check_head_here
    from posttrain.trainers.common import training_config

    name, data = info.name, recipe.data
    if data.train is not None:
        raise UserError(f"data.train: unlearning method '{name}' reads data.forget and data.retain, not data.train")
    if data.eval is not None:
        raise UserError(
            f"data.eval: unlearning method '{name}' has no eval-loss loop; set eval.steps for forget/retain metrics "
            "during training, or evaluate the run with `posttrain eval RUN_DIR --suite tofu`"
        )
    if data.forget is None:
        raise UserError(
            f"data.forget: method '{name}' needs a forget set (e.g. data.forget: {{source: builtin:facts, "
            "split: forget05}})"
        )
    if recipe.params.uses_weight_mask:
        if data.retain is None:
            raise UserError("data.retain: method.mask: wagle scores the weights with retain-set gradients; set "
                            "data.retain (e.g. {source: builtin:facts, split: retain95})")
        if recipe.peft is not None:
            raise UserError("method.mask: wagle selects base-model weights, which a peft adapter freezes; remove "
                            "peft or the mask")
        for key in ("deepspeed", "fsdp"):
            if recipe.training.get(key):
                raise UserError(f"training.{key}: method.mask: wagle needs whole parameters (a global top-k over "
                                "every weight); not supported with DeepSpeed or FSDP")
    if UNLEARNING_OBJECTIVES[name].steers_activations and recipe.peft is not None:
        raise UserError(f"peft: method '{name}' chooses the base-model weights that move (method.trainable_params), "
                        "which a peft adapter freezes; remove peft")
    if data.retain is not None and not _needs_retain(recipe, name):
        has_retain_term = UNLEARNING_OBJECTIVES[name].retain is not None
        why = "method.alpha is 0" if has_retain_term else "the method has no retain term"
        raise UserError(f"data.retain: method '{name}' would not read it ({why}, and no method.mask: wagle); remove "
                        "it, or use a method with a retain term (grad_diff, npo_rt, npo_kl, simnpo, rmu)")
    if _needs_retain(recipe, name) and data.retain is None:
        raise UserError(
            f"data.retain: method '{name}' needs a retain set (e.g. data.retain: {{source: builtin:facts, "
            "split: retain95}}), or set method.alpha: 0"
        )
    config = training_config(UnlearningConfig, recipe, {"remove_unused_columns": False})
    check_head_here(config)
    return config


def build_unlearning_trainer(ctx):
    """Build the unlearning trainer from a run context (see :mod:`posttrain.train`)."""
    from posttrain.adapters.trainer import make_trainer
    from posttrain.trainers.common import trainer_kwargs

    recipe, info, params = ctx.recipe, ctx.info, ctx.recipe.params
    name, data = info.name, recipe.data
    config = ctx.config if ctx.config is not None else unlearning_config(recipe, info)
    needs_retain = _needs_retain(recipe, name)
    tok = ctx.tokenizer
    forget = tokenize_rows(ctx.dataset("data.forget", "unlearning"), tok, config.max_length, "data.forget")
    retain = None
    if needs_retain:
        retain = tokenize_rows(ctx.dataset("data.retain", "unlearning"), tok, config.max_length, "data.retain")
    mask_rows = (forget, retain) if params.uses_weight_mask else None
    if not _objective_uses_retain(recipe, name):
        retain = None  # read only by the WAGLE scoring pass
    dataset = ForgetRetainDataset(forget, retain, seed=recipe.seed)
    ensure_fused_head(ctx.model)  # before any adapter wraps the model (TRL's order)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return make_trainer(
        PosttrainUnlearningTrainer,
        recipe,
        uses_disabled_adapter_reference=(recipe.reference.uses_disabled_adapter
                                         and uses_reference(name, params)),
        **trainer_kwargs(ctx, config, dataset),
        data_collator=ForgetRetainCollator(pad),
        method=name,
        mask_rows=mask_rows,
    )
