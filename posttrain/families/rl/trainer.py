"""The RL-family trainer: a thin subclass of TRL's ``GRPOTrainer`` whose advantages and policy loss are posttrain's.

TRL keeps generation (transformers or vLLM), reward-function plumbing, the reference model, ``num_iterations`` and
buffering. Three methods are overridden (checked against TRL 1.16 by ``tests/families/rl/test_rl_trainer.py``):

* ``_calculate_rewards``: calls TRL's, and stashes the gathered per-function rewards plus, for stratified
  advantages, the gathered stratum keys of the batch.
* ``_generate_and_score_completions``: calls TRL's, then recomputes the advantages over the gathered generation batch
  with the selected estimator (``fn(rewards, groups, params)``, :mod:`posttrain.families.rl.advantages`), keeps this
  process's rows, and adds the row-keep mask
  (PSR/NSR drop rows from every denominator), the correctness of each row (GPPO's SFT term), ΔL row weights (computed
  once per generation batch, over the global batch) and the token counts the global normalisers need.
* ``_compute_loss``: fills the micro-batch's :class:`~posttrain.families.rl.forward.RLForward` with what the selected
  ``method.loss`` entry declares it needs and calls it (``fn(fwd, params)``, :mod:`posttrain.families.rl.policy_losses`:
  the clipped surrogate of the selected parts, or PACS).
* ``_get_per_token_logps_and_entropies`` (the old policy's and the reference's log-probs at generation) and the
  training forward run on the log-prob engine (:mod:`posttrain.logprobs`, docs/logprob_engine.md): completion-only
  log-probs from a chunked head, and the rows with the same prompt packed into one sequence (the prompt computed once
  for its G completions, under a block attention mask; ``training.share_prompts: false`` turns it off). A router aux
  loss (MoE) or image inputs fall back to TRL's fused head on whole rows, said once in the log.

Each training generation batch is also summarised for :class:`posttrain.families.rl.diagnostics.SignalMonitor`
(``log`` is extended to close its logging windows), which warns when the learning signal vanishes (docs/rlvr.md "No
learning signal"). ``build_rl_trainer`` hands the recipe's rewards (functions and reward models), tools, environment and
rollout function to TRL; ``check_rl_recipe`` imports and checks them before any model is loaded. With
``training.use_vllm``, TRL gets the vLLM generation class the training device needs (on CPU, a weight sync that
survives vLLM's repacked kernels: :mod:`posttrain.rl.vllm_sync`).

Method pages: docs/methods/grpo.md, grpo_advantages.md, grpo_aggregation.md, grpo_clipping.md, rloo.md,
reinforce_pp.md, gspo.md, cispo.md.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Hashable
from typing import Any

import torch
from trl import GRPOTrainer

from posttrain.distributed import TokenMean, reduce_metrics
from posttrain.errors import UserError
from posttrain.families.rl.advantages.stratified import stratified_stats
from posttrain.families.rl.aggregations.delta_l import delta_l_weights
from posttrain.families.rl.common import (
    AdvantageOutput,
    Groups,
    Normalizer,
    RowTargets,
    combine_rewards,
    normalize_then_sum,
    prompt_groups,
    stratum_ids,
)
from posttrain.families.rl.diagnostics import SignalMonitor, batch_signal
from posttrain.families.rl.forward import CORRECT as NEEDS_CORRECT
from posttrain.families.rl.forward import ENTROPY, REF_LOGPS, RL_NEEDS, ROWS, RLForward
from posttrain.families.rl.parts import ADVANTAGES, AGGREGATIONS, POLICY_LOSSES
from posttrain.logprobs.engine import LogProbEngine, Needs, log_once
from posttrain.models import model_identity
from posttrain.reference import trl_reference_factory
from posttrain.rl.strata import count_tool_calls
from posttrain.rl.vllm_sync import check_vllm_recipe, vllm_generation_for
from posttrain.trainers.common import AtomicCheckpointMixin

logger = logging.getLogger("posttrain")

# Keys this trainer adds to TRL's generation-batch dict ([B] tensors are shuffled and split with the rest; 0-dim
# tensors are kept whole).
KEEP, CORRECT, DL_WEIGHTS, NUM_CORRECT = "rl_keep", "rl_correct", "rl_delta_l_weights", "rl_num_correct_tokens"
# [B] label (the combined reward) and group id of each row, for a row objective (a method.loss without the parts)
ROW_LABEL, ROW_GROUP = "rl_row_label", "rl_row_group"
NUM_ROWS = "rl_num_kept_rows"  # kept rows of the gathered generation batch (row-based normalisers)
MAX_LOGGED_STRATUM_KEYS = 16  # san/reward_mean/<key> is logged while a batch has at most this many key values
SINGLETON_WARNING = 0.5  # warn when more than this fraction of strata hold a single rollout

# TRL methods this trainer overrides or calls, with the parameters it relies on (tests check they still exist).
TRL_HOOKS: dict[str, tuple[str, ...]] = {
    "_calculate_rewards": ("inputs", "prompts", "completions", "completion_ids_list"),
    "_generate_and_score_completions": ("inputs",),
    "_compute_loss": ("model", "inputs"),
    "_get_per_token_logps_and_entropies": (
        "model", "input_ids", "attention_mask", "logits_to_keep", "batch_size", "compute_entropy", "compute_aux_loss",
    ),
    "log": ("logs", "start_time"),
}


class PosttrainGRPOTrainer(AtomicCheckpointMixin, GRPOTrainer):
    """``trl.GRPOTrainer`` with posttrain's advantage estimators, clipping, aggregation and SFT term.

    Args:
        params: :class:`posttrain.methods.GRPOParams` (advantage, aggregation, clipping and their options).
        stratum_fn: ``fn(row, prompt, completion) -> Hashable``, the stratum key of a rollout (stratified only).
        ref_model: the KL reference (``beta > 0`` only), prepared like TRL prepares its own (dropout off, fused LM
            head, ``accelerator.prepare_model(evaluation_mode=True)`` / DeepSpeed / FSDP). ``None``: TRL's default, the
            adapter-disabled base with PEFT, else a model loaded from the policy's path (``posttrain train`` always
            passes one without PEFT: ``ref_model:`` or a frozen copy of the initial policy).

    With a policy that is already a ``PeftModel`` (GOAT) and ``beta > 0``, TRL would add a ``"ref"`` copy of the adapter
    (re-initialising GOAT's layers); the reference is the adapter-disabled base instead, which is the initial policy.
    """

    loss_is_scaled_for_ga = True  # like TRL: the loss already accounts for gradient accumulation

    def __init__(self, *args, params, stratum_fn: Callable[..., Hashable] | None = None, ref_model=None, **kwargs):
        import trl.trainer.grpo_trainer as trl_grpo
        from accelerate.utils import is_peft_model

        self.params = params
        self.stratum_fn = stratum_fn
        self._rl_stash: dict[str, Any] | None = None
        model = kwargs.get("model", args[0] if args else None)
        config = kwargs.get("args", args[2] if len(args) > 2 else None)
        beta = float(getattr(config, "beta", 0.0) or 0.0)
        prewrapped = is_peft_model(model)
        peft = prewrapped or kwargs.get("peft_config") is not None
        if ref_model is not None:
            if beta == 0.0:
                raise UserError("ref_model: the reference is only used for the KL term, which is off (method.beta: 0)")
            if isinstance(model, str):
                raise TypeError("PosttrainGRPOTrainer: pass the policy as a model instance when passing ref_model")
        if beta != 0.0 and peft and getattr(config, "sync_ref_model", False):
            raise UserError("training.sync_ref_model: not supported with peft (TRL keeps no reference model to sync)")
        # TRL builds its reference with create_model_from_path (full fine-tuning): hand it ours instead, so TRL
        # applies its own preparation (dropout, fp32 LM head, fused LM head, DeepSpeed/FSDP/accelerate, sync callback)
        hand_over = ref_model is not None and not peft
        # a pre-built PeftModel with beta > 0 makes TRL add a "ref" adapter copy: keep beta at 0 while TRL builds
        zero_beta = beta != 0.0 and prewrapped
        factory = trl_reference_factory(trl_grpo, ref_model) if hand_over else contextlib.nullcontext([])
        try:
            if zero_beta:
                config.beta = 0.0
            # use_vllm: the weight sync the training device needs (posttrain/rl/vllm_sync.py)
            with factory as handed, vllm_generation_for(trl_grpo, config):
                super().__init__(*args, **kwargs)
        finally:
            if zero_beta:
                config.beta = beta
        if zero_beta:
            self.beta = beta
        if hand_over and len(handed) != 1:  # pragma: no cover - TRL changed how it builds its reference
            raise RuntimeError("GRPOTrainer no longer builds its reference with create_model_from_path; "
                               "posttrain's RL trainer needs updating")
        if ref_model is not None and peft:
            self.ref_model = self._prepare_reference(ref_model)
        share = getattr(self.args, "share_prompts", True)
        if share and getattr(self, "counts_body_tokens", False):
            log_once("shared prompts off: the adapter's balance loss counts the tokens of every row (GOAT); every row "
                     "runs whole (same results, no saving)")
            share = False
        elif not share:
            log_once("shared prompts off (training.share_prompts: false): every completion runs with its prompt")
        self.engine = LogProbEngine(getattr(self.args, "logprob_head", "auto"), share_prompts=share,
                                    temperature=self.temperature)
        self.use_engine = True  # False: TRL's fused head on whole rows (the path before the engine; tests compare both)
        self.signal_monitor = SignalMonitor(patience=getattr(params, "warn_no_signal_after", 2),
                                            max_completion_length=self.max_completion_length,
                                            correct_reward=getattr(params, "correct_reward", 1.0))
        self._run_warnings: list[str] = []
        self._warned: set[str] = set()

    @property
    def objective(self):
        """The ``method.loss`` entry (:data:`~posttrain.families.rl.parts.POLICY_LOSSES`), checked to need only what
        this trainer computes."""
        entry = POLICY_LOSSES[self.params.loss]
        unknown = entry.needs(self.params) - RL_NEEDS
        if unknown:
            raise ValueError(f"policy loss {entry.name!r} needs {sorted(unknown)}; the trainer computes "
                             f"{sorted(RL_NEEDS)}")
        return entry

    def _prepare_reference(self, ref_model):
        """What TRL's ``__init__`` does to the reference it builds, for one given with a PEFT policy."""
        from trl.trainer.utils import add_fused_lm_head

        from posttrain.distributed import prepare_frozen

        # TRL also casts the LM head weight to fp32; the projection in fp32 is what matters for the log-probs
        add_fused_lm_head(ref_model, temperature=self.temperature, cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32)
        return prepare_frozen(ref_model, self.accelerator, disable_dropout=self.args.disable_dropout)

    # ---------------------------------------------------------------------------------------------------------------
    # advantages

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        stash: dict[str, Any] = {"rewards_per_func": rewards_per_func}
        if ADVANTAGES[self.params.advantage].needs_strata:
            from accelerate.utils import gather_object

            keys = [self.stratum_fn(row, p, c) for row, p, c in zip(inputs, prompts, completions, strict=True)]
            stash["strata"] = gather_object(keys)
        self._rl_stash = stash
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        stash, self._rl_stash = self._rl_stash, None
        if stash is None:  # pragma: no cover - TRL stopped calling _calculate_rewards
            raise RuntimeError("GRPOTrainer no longer calls _calculate_rewards; posttrain's RL trainer needs updating")
        p = self.params
        mode = "train" if self.model.training else "eval"
        device = self.accelerator.device
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        rpf = stash["rewards_per_func"]
        weights = self.reward_weights.to(rpf.device)
        rewards = combine_rewards(rpf, weights)
        estimator = ADVANTAGES[p.advantage]
        if estimator.normalize_then_sum and self.multi_objective_aggregation == "normalize_then_sum":
            adv = normalize_then_sum(rpf, num_generations, weights)
            out = AdvantageOutput(adv, torch.ones(adv.shape, dtype=torch.bool, device=adv.device))
        else:
            measured: dict[str, Any] = dict(self._advantage_options(estimator, rewards, mode))
            if estimator.needs_strata:
                measured["strata"] = stratum_ids(stash["strata"], device=rewards.device)
            if estimator.needs_lengths:  # completion tokens per row (REINFORCE++'s token whitening)
                tokens = output["completion_mask"] * output.get("tool_mask", 1)
                measured["lengths"] = self.accelerator.gather(tokens.sum(-1).float()).to(rewards.device)
            out = estimator.fn(torch.as_tensor(rewards), Groups(num_generations, **measured), p)
        correct = rewards == p.correct_reward

        local = output["completion_mask"].size(0)
        rows = slice(self.accelerator.process_index * local, (self.accelerator.process_index + 1) * local)
        keep = out.keep[rows].to(device)
        loss_mask = output["completion_mask"] if "tool_mask" not in output else output["completion_mask"] * output[
            "tool_mask"]
        kept_mask = loss_mask * keep.unsqueeze(1).to(loss_mask.dtype)
        output["advantages"] = out.advantages[rows].to(device=device, dtype=torch.float32)
        output[KEEP] = keep.to(torch.float32)
        output["num_items_in_batch"] = self.accelerator.gather(kept_mask.sum()).sum()
        output[NUM_ROWS] = self.accelerator.gather(keep.sum().to(torch.float32)).sum()
        if NEEDS_CORRECT in self.objective.needs(p):  # GPPO's SFT term
            output[CORRECT] = correct[rows].to(device=device, dtype=torch.float32)
            output[NUM_CORRECT] = self.accelerator.gather((kept_mask * output[CORRECT].unsqueeze(1)).sum()).sum()
        if AGGREGATIONS[p.aggregation].row_weights:
            lengths = self.accelerator.gather(kept_mask.sum(-1).float())
            w = delta_l_weights(lengths, alpha=p.delta_l_alpha, scope=p.delta_l_scope, num_generations=num_generations)
            output[DL_WEIGHTS] = w[rows].to(device)
            valid = w[lengths > 0]
            if valid.numel():
                self._metrics[mode]["delta_l/weight_mean"].append(valid.mean().item())
                self._metrics[mode]["delta_l/weight_min"].append(valid.min().item())
                self._metrics[mode]["delta_l/weight_max"].append(valid.max().item())
            self._metrics[mode]["delta_l/length_mean"].append(lengths[lengths > 0].mean().nan_to_num().item())
            self._metrics[mode]["delta_l/length_std"].append(lengths[lengths > 0].std().nan_to_num().item())

        if ROWS in self.objective.needs(p):  # labels and groups travel with the rows (TRL shuffles them together)
            if self.objective.check_labels is not None:
                self.objective.check_labels(rewards)
            output[ROW_LABEL] = rewards[rows].to(device=device, dtype=torch.float32)
            output[ROW_GROUP] = (torch.arange(rewards.numel(), device=device) // num_generations)[rows]
        self._log_advantage_metrics(mode, out.advantages, out.keep, correct, rewards, num_generations, stash)
        if mode == "train":
            self.signal_monitor.add(batch_signal(
                rewards, out.advantages, out.keep, num_generations, clipped=self._clipped(output), rewards_per_func=rpf,
                names=self.reward_func_names))
        # the completions table (log_completions) shows the advantages actually used
        logged = self._logs.get("advantages") if isinstance(self._logs, dict) else None
        if logged is not None and len(logged) >= out.advantages.numel():
            for _ in range(out.advantages.numel()):
                logged.pop()
            logged.extend(out.advantages.tolist())
        return output

    def _advantage_options(self, estimator, rewards: torch.Tensor, mode: str) -> dict[str, Any]:
        """Fields of :class:`~posttrain.families.rl.common.Groups` an estimator needs from a subclass's own state
        (SPO's per-prompt baseline ``p_hat``: SPOGRPOTrainer)."""
        return {}

    def _clipped(self, output) -> torch.Tensor:
        """[B] over all processes: completions cut at max_completion_length (they do not end in a stop token)."""
        ids, mask = output["completion_ids"], output["completion_mask"]
        lengths = mask.sum(-1).long()
        last = ids.gather(1, (lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
        stops = torch.tensor([*self.eos_token_ids, self._tokenizer.pad_token_id], device=ids.device)
        clipped = (lengths == 0) | ~torch.isin(last, stops)
        return self.accelerator.gather(clipped.to(torch.int32)).bool()  # ints: gloo gathers no bools

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        train_log = not any(k.startswith("eval_") for k in logs)
        grad = logs.get("grad_norm")
        super().log(logs, start_time)
        if train_log and self.accelerator.is_main_process:
            self.signal_monitor.on_log({} if grad is None else {"grad_norm": grad})

    def run_warnings(self) -> list[str]:
        """Warnings for the end of the run (run summary and the CLI): the no-signal and stratum warnings issued,
        and a final line when most generation batches had no learning signal."""
        final = self.signal_monitor.summary() if self.accelerator.is_main_process else None
        if final:
            logger.warning("warning: %s", final)
        return [*self._run_warnings, *self.signal_monitor.warnings, *([final] if final else [])]

    def _warn_once(self, tag: str, message: str) -> None:
        if tag not in self._warned and self.accelerator.is_main_process:
            self._warned.add(tag)
            self._run_warnings.append(message)
            logger.warning("warning: %s", message)

    def _log_advantage_metrics(self, mode, adv, keep, correct, rewards, num_generations, stash) -> None:
        m = self._metrics[mode]
        kept = adv[keep]
        if kept.numel():
            m["advantages/mean"].append(kept.mean().item())
            m["advantages/std"].append(kept.std().nan_to_num().item() if kept.numel() > 1 else 0.0)
            m["advantages/min"].append(kept.min().item())
            m["advantages/max"].append(kept.max().item())
        m["advantages/frac_zero"].append((adv == 0).float().mean().item())
        m["rl/kept_rows_frac"].append(keep.float().mean().item())
        m["rl/correct_frac"].append(correct.float().mean().item())
        # counts per generation batch (all processes), docs/methods/grpo_advantages.md#metrics
        scored = ~torch.isnan(rewards)
        m["rl/correct_count"].append(float(correct.sum().item()))
        m["rl/incorrect_count"].append(float((scored & ~correct).sum().item()))
        m["rl/effective_examples"].append(float(keep.sum().item()))
        solved = correct.view(-1, num_generations)
        m["rl/frac_prompts_all_correct"].append(solved.all(dim=1).float().mean().item())
        m["rl/frac_prompts_none_correct"].append((~solved).all(dim=1).float().mean().item())
        if "strata" in stash:
            keys = stash["strata"]
            p = self.params
            strata = stratum_ids(keys, device=rewards.device)
            stats = stratified_stats(rewards, Groups(num_generations, strata=strata), p)
            for name, value in stats.items():
                m[f"san/{name}"].append(value)
            if stats["frac_singleton_strata"] > SINGLETON_WARNING:
                self._warn_once(
                    "singleton_strata",
                    f"method.stratum_key: {p.stratum_key} puts {stats['frac_singleton_strata']:.0%} of strata at a "
                    f"single rollout, whose SAN advantage is 0, so those rows keep only (1 - san_alpha) = "
                    f"{1 - p.san_alpha:g} of the GRPO advantage; use a coarser key (the default, tool_calls, is one "
                    "stratum per group on free text)")
            numeric = [float(k) for k in keys if isinstance(k, int | float) and not isinstance(k, bool)]
            if len(numeric) == len(keys):
                m["san/stratum_key_mean"].append(sum(numeric) / max(len(numeric), 1))
            # reward mean per key value (docs/methods/grpo_advantages.md#metrics), while the keys are few enough to read
            distinct = sorted(set(keys), key=str)
            if len(distinct) <= MAX_LOGGED_STRATUM_KEYS:
                for key in distinct:
                    picked = torch.tensor([k == key for k in keys], device=rewards.device) & ~torch.isnan(rewards)
                    if bool(picked.any()):
                        m[f"san/reward_mean/{key}"].append(rewards[picked].mean().item())

    # ---------------------------------------------------------------------------------------------------------------
    # loss

    def _compute_loss(self, model, inputs):
        """The selected ``method.loss`` entry (``fn(fwd, params)``) on this micro-batch's :class:`RLForward`, with
        the needs its entry declares."""
        p = self.params
        mode = "train" if self.model.training else "eval"
        needs = self.objective.needs(p)
        completion_mask = inputs["completion_mask"]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        if KEEP in inputs:
            mask = mask * inputs[KEEP].unsqueeze(1).to(mask.dtype)
        logps, entropies, aux_loss = self._training_logps(model, inputs, entropy_grad=ENTROPY in needs)
        old = inputs.get("old_per_token_logps")
        old = logps.detach() if old is None else old

        ga = self.current_gradient_accumulation_steps if mode == "train" else 1
        # N_glob of the optimizer step's global accumulated batch: TRL's num_items_in_batch spans the generation
        # batch, i.e. steps_per_generation micro-batches (docs/methods/grpo_aggregation.md#the-dapo-normaliser).
        window = ga / self.args.steps_per_generation if mode == "train" else 1.0
        # Row-based normalisers (grpo, dr_grpo, delta_l) count the kept rows of the optimizer step's global batch:
        # PSR/NSR/W-REINFORCE drop rows from the update entirely (docs/rlvr.md); the result already spans the
        # accumulated batch, so it is not divided by GA (equal to TRL's B_mb and /GA when every row is kept).
        normalizer = Normalizer(
            num_items_in_batch=inputs["num_items_in_batch"] * window if "num_items_in_batch" in inputs else None,
            num_processes=self.accelerator.num_processes, max_completion_length=self.max_completion_length,
            num_rows=inputs[NUM_ROWS] * window if NUM_ROWS in inputs else None, row_weights=inputs.get(DL_WEIGHTS))
        sampling = inputs["importance_sampling_ratio"] if self.use_vllm and self.vllm_importance_sampling_correction \
            else None
        fwd = RLForward(
            logps=logps, old_logps=old, mask=mask, advantages=inputs.get("advantages"), normalizer=normalizer,
            accumulation_steps=ga, gather=self.accelerator.gather, sampling_weights=sampling,
            ref_logps=inputs["ref_per_token_logps"] if REF_LOGPS in needs else None,
            entropy=entropies if ENTROPY in needs else None,
            correct=inputs[CORRECT] if NEEDS_CORRECT in needs else None,
            num_correct_tokens=inputs[NUM_CORRECT] * window if NEEDS_CORRECT in needs else None,
            rows=self._row_targets(inputs, mode) if ROWS in needs else None)
        loss, logged = self.objective.fn(fwd, p)
        metrics = self._metrics[mode]
        if aux_loss is not None:
            loss = loss + self.router_aux_loss_coef * aux_loss / ga
            metrics["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
        # token means over every process's tokens, the other values averaged over processes: one reduction
        logged = {**logged, "entropy": TokenMean.of(entropies.detach(), mask)}
        for name, value in reduce_metrics(self.accelerator, logged).items():
            metrics[name].append(value)
        return loss

    def _row_targets(self, inputs, mode: str) -> RowTargets:
        """Each row's label and group id (0-based within the micro-batch) for a loss over whole groups (PACS)."""
        groups, inverse, counts = torch.unique(inputs[ROW_GROUP], return_inverse=True, return_counts=True)
        expected = self.num_generations if mode == "train" else self.num_generations_eval
        if bool((counts != expected).any()):  # pragma: no cover - rl_config refuses the settings that split groups
            raise UserError(f"training.per_device_train_batch_size: method.loss: {self.params.loss} needs every "
                            "micro-batch to hold whole groups (a multiple of num_generations, "
                            "gradient_accumulation_steps: 1)")
        return RowTargets(inputs[ROW_LABEL], inverse)

    # ---------------------------------------------------------------------------------------------------------------
    # log-probs: the engine (docs/logprob_engine.md), each prompt computed once for its group

    def _training_logps(self, model, inputs, entropy_grad: bool):
        """Per-token log-probs ``[B, C]`` of the micro-batch's completions (with gradient), the per-token entropy
        (with gradient when a loss needs it, else a detached statistic for the metric) and the router aux loss."""
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        multimodal = {k: inputs.get(k) for k in _MULTIMODAL_KEYS if inputs.get(k) is not None}
        keep = inputs["completion_ids"].size(1)
        if self._engine_runs(self.aux_loss_enabled, multimodal):
            logps, entropies = self._engine_logps(model, input_ids, attention_mask, keep, entropy_grad=entropy_grad,
                                                  entropy_statistic=not entropy_grad)
            return logps, entropies, None
        return super()._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, keep, compute_entropy=True, compute_aux_loss=self.aux_loss_enabled,
            **multimodal)

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **multimodal):
        """TRL's hook for the old policy's and the reference's log-probs (at generation, under ``no_grad``): the
        engine, in chunks of ``batch_size`` rows, each prompt computed once for the completions of its group."""
        multimodal = {k: v for k, v in multimodal.items() if v is not None}
        if not self._engine_runs(compute_aux_loss, multimodal):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **multimodal)
        size = batch_size or input_ids.size(0)
        parts = [self._engine_logps(model, input_ids[i:i + size], attention_mask[i:i + size], logits_to_keep,
                                    entropy_grad=compute_entropy, entropy_statistic=False)
                 for i in range(0, input_ids.size(0), size)]
        logps = torch.cat([lp for lp, _ in parts])
        return logps, (torch.cat([e for _, e in parts]) if compute_entropy else None), None

    def _engine_runs(self, aux_loss: bool, multimodal: dict) -> bool:
        """Whether the engine scores this call (``use_engine``); a router aux loss (MoE) or image inputs need the
        whole model's forward, so TRL's fused head runs instead (said once)."""
        if not self.use_engine:
            return False
        if aux_loss or multimodal:
            why = "the model's router aux loss" if aux_loss else "image inputs"
            log_once(f"log-prob engine off ({why}: the full model forward is needed): TRL's fused head scores every "
                     "row whole (same losses, no saving)")
            return False
        return True

    def _engine_logps(self, model, input_ids, attention_mask, logits_to_keep: int, *, entropy_grad: bool,
                      entropy_statistic: bool):
        """The engine's completion-only log-probs (and entropy) of rows ``[prompt; completion]``, ``[B, C]`` each,
        the rows with the same prompt packed around it (``prompt_groups``)."""
        completion = torch.zeros_like(attention_mask)
        completion[:, -logits_to_keep:] = attention_mask[:, -logits_to_keep:]
        groups = prompt_groups(input_ids[:, :-logits_to_keep], attention_mask[:, :-logits_to_keep])
        needs = Needs(entropy=entropy_grad, statistics=("entropy",) if entropy_statistic else ())
        with self.accelerator.autocast():
            out = self.engine.forward(model, input_ids, attention_mask, completion, groups=groups, needs=needs)
        entropy = out.entropy if entropy_grad else (out.statistics["entropy"] if entropy_statistic else None)
        return out.logps[:, -logits_to_keep:], None if entropy is None else entropy[:, -logits_to_keep:]


_MULTIMODAL_KEYS = (
    "pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
    "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids",
)


# --------------------------------------------------------------------------------------------------------------------
# building


def make_stratum_fn(key: str, columns: list[str], base_dirs=()) -> Callable[..., Hashable]:
    """``method.stratum_key`` -> ``fn(row, prompt, completion)``: ``tool_calls`` (default), ``module:function``
    (or ``file.py:function``) or a dataset column."""
    if key == "tool_calls":
        return lambda row, prompt, completion: count_tool_calls(completion)
    if ":" in key:
        from posttrain.rl.rewards import import_function

        fn = import_function(key, "method.stratum_key", base_dirs)

        def call(row, prompt, completion):
            extra = {k: v for k, v in row.items() if k not in ("prompt", "completion")}
            try:
                value = fn(prompt=prompt, completion=completion, **extra)
            except Exception as exc:
                raise UserError(f"method.stratum_key ({key}): raised {type(exc).__name__}: {exc}") from exc
            return _hashable(value, key)

        return call
    if key not in columns:
        from posttrain.errors import did_you_mean

        raise UserError(
            f"method.stratum_key: '{key}' is neither 'tool_calls', a 'module:function' nor a column of data.train"
            f"{did_you_mean(key, columns)} (columns: {columns})"
        )
    return lambda row, prompt, completion: _hashable(row[key], key)


def _hashable(value: Any, key: str) -> Hashable:
    if isinstance(value, list):
        value = tuple(value)
    try:
        hash(value)
    except TypeError:
        raise UserError(f"method.stratum_key ({key}): value {value!r} is not hashable") from None
    return value


# training.<key> that the method block owns, and where to set them instead
_METHOD_OWNED = {
    "loss_type": "method.aggregation / method.clipping",
    "beta": "method.beta",
    "epsilon": "method.epsilon",
    "epsilon_high": "method.epsilon_high",
    "scale_rewards": "method.scale_rewards",
    "reward_weights": "method.rewards[].weight",
    "entropy_coef": "method.entropy_coef",
    "delta": "method.dual_clip_c",
    "use_bias_correction_kl": "method.use_bias_correction_kl",
    "importance_sampling_level": "method.clipping: gspo (sequence-level ratio and clipping)",
}
# TRL features whose loss-side code this trainer does not reproduce
_UNSUPPORTED = {
    "off_policy_mask_threshold": None,
    "top_entropy_quantile": 1.0,
    "use_adaptive_entropy": False,
}


def recipe_dirs(recipe) -> list:
    """Where relative ``file.py:function`` paths of a recipe are looked up first: the recipe file's directory."""
    source = getattr(recipe, "_source_dir", None)
    return [source] if source is not None else []


def _user_callables(p, base_dirs) -> dict[str, Any]:
    """``method.tools`` / ``environment`` / ``rollout_func`` imported (errors name the key)."""
    from posttrain.rl.rewards import import_function

    out: dict[str, Any] = {}
    if p.tools:
        out["tools"] = [import_function(t, f"method.tools[{i}]", base_dirs) for i, t in enumerate(p.tools)]
    if p.environment is not None:
        out["environment_factory"] = import_function(p.environment, "method.environment", base_dirs)
    if p.rollout_func is not None:
        out["rollout_func"] = import_function(p.rollout_func, "method.rollout_func", base_dirs)
    return out


def _check_tool_schema(fn, key: str) -> None:
    """A tool must describe itself the way TRL renders it for the model (type hints and a Google-style docstring)."""
    from transformers.utils import get_json_schema

    try:
        get_json_schema(fn)
    except Exception as exc:  # noqa: BLE001 - transformers' docstring / type-hint parsing errors
        raise UserError(f"{key}: {getattr(fn, '__name__', fn)} cannot be offered as a tool ({type(exc).__name__}: "
                        f"{' '.join(str(exc).split())[:200]}); give it type hints and a Google-style docstring") from None


def _check_environment(factory, key: str) -> None:
    """What TRL does with ``environment_factory`` when the trainer is built, done here: one instance made with no
    arguments, which has a ``reset`` method; its public methods are tools."""
    import inspect

    try:
        inspect.signature(factory).bind()
    except TypeError as exc:
        raise UserError(f"{key}: TRL makes one environment per rollout by calling it with no arguments, and "
                        f"{getattr(factory, '__name__', factory)} cannot be called so ({exc}); give a class (or a "
                        "factory function) with no required arguments") from None
    except ValueError:  # no signature (a builtin): let the call below tell
        pass
    try:
        instance = factory()
    except Exception as exc:  # noqa: BLE001 - the user's code
        raise UserError(f"{key}: creating the environment raised {type(exc).__name__}: {exc}") from None
    methods = dict(inspect.getmembers(type(instance), predicate=inspect.isfunction))
    if "reset" not in methods:
        raise UserError(f"{key}: the environment ({type(instance).__name__}) has no reset() method, which TRL calls "
                        "before each rollout")
    for name in methods:
        if not name.startswith("_") and name not in ("reset", "get_reward"):
            _check_tool_schema(getattr(instance, name), f"{key} ({type(instance).__name__}.{name})")


def check_rl_recipe(recipe) -> None:
    """The recipe's code, imported and checked (this runs the user's code; :func:`posttrain.train.check_user_code`
    runs it after every other check): reward functions, files and reward-model configs, tools, environment, rollout
    function and a ``module:function`` stratum key."""
    from posttrain.rl.rewards import import_function, load_rewards

    p, dirs = recipe.params, recipe_dirs(recipe)
    load_rewards(p.rewards, base_dirs=dirs, load_models=False)
    user = _user_callables(p, dirs)
    for i, tool in enumerate(user.get("tools", [])):
        _check_tool_schema(tool, f"method.tools[{i}]")
    if "environment_factory" in user:
        _check_environment(user["environment_factory"], "method.environment")
    if ADVANTAGES[p.advantage].needs_strata and ":" in p.stratum_key:
        import_function(p.stratum_key, "method.stratum_key", dirs)


def check_rl_data(recipe, datasets: dict[str, Any]) -> None:
    """Checks of the loaded RL data that need no model (preflight): columns the rewards and a column stratum key
    read, conversational prompts for tool calling, and rows whose answer cannot be scored (skipped, counted)."""
    from posttrain.rl.rewards import NEEDS_ANSWER

    p = recipe.params
    for key in ("data.train", "data.eval"):
        ds = datasets.get(key)
        if ds is None:
            continue
        needs = [f"method.rewards[{i}] ({spec.name})" for i, spec in enumerate(p.rewards) if spec.name in NEEDS_ANSWER]
        if needs and "answer" not in ds.column_names:
            raise UserError(f"{needs[0]}: needs an 'answer' column in {key} (has {ds.column_names}; rename with "
                            f"{key}.columns)")
        if needs:
            from posttrain.data.sources import drop_unanswerable

            datasets[key] = ds = drop_unanswerable(ds, key)
        if p.tools or p.environment is not None:
            _check_conversational(ds, "method.tools" if p.tools else "method.environment", key)
    train = datasets.get("data.train")
    strat = ADVANTAGES[p.advantage].needs_strata and p.stratum_key != "tool_calls" and ":" not in p.stratum_key
    if train is not None and strat and p.stratum_key not in train.column_names:
        make_stratum_fn(p.stratum_key, train.column_names)  # the error naming the key and the columns


def _check_conversational(ds, key: str, data_key: str = "data.train") -> None:
    from trl.data_utils import is_conversational

    from posttrain.data.sources import column_values

    for i, prompt in enumerate(column_values(ds, "prompt")):
        if not is_conversational({"prompt": prompt}):
            raise UserError(
                f"{key}: tool calling needs conversational prompts (a list of messages, e.g. [{{role: user, content: "
                f"...}}]) in {data_key}; row {i} is plain text"
            )


def rl_config(recipe, info):
    """The :class:`~posttrain.families.rl.config.RLConfig` (``GRPOConfig`` + the log-prob engine's keys) of an RL
    recipe, with the method-owned fields set from ``method:`` (before models load); a ``training.logprob_head`` that
    cannot run on this machine is refused here."""
    from posttrain.families.rl.config import RLConfig
    from posttrain.trainers.common import training_config

    p = recipe.params
    if recipe.data.train is None:
        raise UserError("data.train: required key is missing")
    check_vllm_recipe(recipe.training)  # use_vllm: vLLM installed, a mode posttrain can sync
    for key, where in _METHOD_OWNED.items():
        if key in recipe.training:
            raise UserError(f"training.{key}: set it as {where} for method '{info.name}'")
    for key, default in _UNSUPPORTED.items():
        if key in recipe.training and recipe.training[key] != default:
            raise UserError(f"training.{key}: not supported by method '{info.name}' (leave it at {default!r})")
    if not POLICY_LOSSES[p.loss].uses_parts:  # a row objective (PACS' psi) couples the rows of a group: whole groups
        t = recipe.training
        for key in ("gradient_accumulation_steps", "steps_per_generation"):
            if t.get(key, 1) not in (1, None):
                raise UserError(f"training.{key}: method.loss: pacs needs 1 (each micro-batch must hold whole groups; "
                                "TRL shuffles the rows of a generation batch across micro-batches)")
        mode = t.get("vllm_importance_sampling_mode", "sequence_mask")  # TRL's default
        corrected = t.get("use_vllm") and t.get("vllm_importance_sampling_correction", True)
        if corrected and mode in ("token_mask", "token_truncate"):
            raise UserError(f"training.vllm_importance_sampling_mode: method.loss: pacs weights each row by its "
                            f"sequence-level ratio (sequence_mask or sequence_truncate); a per-token ratio has no "
                            f"per-row meaning, got {mode} (docs/methods/pacs.md#vllm-importance-sampling)")
        n, size = t.get("num_generations", 8), t.get("per_device_train_batch_size", 8)
        if size % n:
            raise UserError(f"training.per_device_train_batch_size: method.loss: pacs needs a multiple of "
                            f"num_generations ({n}), got {size}")
    single_stream = ADVANTAGES[p.advantage].single_stream
    n = recipe.training.get("num_generations")
    if single_stream and n not in (None, 1):
        raise UserError(f"training.num_generations: method.advantage: {p.advantage} generates one completion per prompt "
                        f"(its baseline is the prompt's tracked success rate); set 1 or leave it out, got {n}")
    if not single_stream and n is not None and n < 2:
        raise UserError(f"training.num_generations: must be >= 2 for method.advantage: {p.advantage} (group statistics "
                        "need two completions per prompt; 1 is only for advantage: spo)")
    moa = recipe.training.get("multi_objective_aggregation", "sum_then_normalize")
    if moa != "sum_then_normalize" and not ADVANTAGES[p.advantage].normalize_then_sum:
        able = " or ".join(e.name for e in ADVANTAGES if e.normalize_then_sum)
        raise UserError(
            f"training.multi_objective_aggregation: {moa} only works with method.advantage: {able} "
            f"(advantage is {p.advantage})"
        )
    overrides: dict[str, Any] = {
        "loss_type": AGGREGATIONS[p.aggregation].trl_loss_type,
        "beta": p.beta,
        "epsilon": p.epsilon,
        "epsilon_high": p.epsilon_high,
        "scale_rewards": p.scale_rewards,
        "reward_weights": [spec.weight for spec in p.rewards],
        "use_bias_correction_kl": p.use_bias_correction_kl,
    }
    if recipe.data.eval is not None:
        overrides.update(eval_strategy="steps", eval_steps=recipe.training.get("logging_steps", 10))
    if single_stream:  # TRL's GRPOConfig refuses one generation: build it with two, then set one
        overrides["num_generations"] = 2
        overrides.setdefault("num_generations_eval", 2)
        if "num_generations_eval" in recipe.training:
            raise UserError(f"training.num_generations_eval: not used by method.advantage: {p.advantage}")
        config = training_config(RLConfig, _without(recipe, "num_generations"), overrides)
        config.num_generations = config.num_generations_eval = 1
    else:
        config = training_config(RLConfig, recipe, overrides)
    from posttrain.logprobs.heads import check_head_here

    check_head_here(config)
    return config



def _without(recipe, key: str):
    """A copy of ``recipe`` whose ``training:`` block lacks ``key``."""
    copy = recipe.model_copy()
    copy.training = {k: v for k, v in recipe.training.items() if k != key}
    return copy


def build_rl_trainer(ctx):
    """The ``rl`` family (method ``grpo``) on :class:`PosttrainGRPOTrainer`."""
    from posttrain.adapters.trainer import make_trainer
    from posttrain.rl.rewards import load_rewards
    from posttrain.rl.tools import prepare_tool_tokenizer
    from posttrain.trainers.common import trainer_kwargs

    recipe, p = ctx.recipe, ctx.recipe.params
    dirs = recipe_dirs(recipe)
    config = ctx.config if ctx.config is not None else rl_config(recipe, ctx.info)
    train = ctx.dataset("data.train", "rl")
    evals = ctx.dataset("data.eval", "rl") if recipe.data.eval is not None else None
    checked = {"data.train": train, **({"data.eval": evals} if evals is not None else {})}
    check_rl_data(recipe, checked)  # done by preflight already in `posttrain train`; cheap when repeated
    train, evals = checked["data.train"], checked.get("data.eval")
    user = _user_callables(p, dirs)
    cls = PosttrainGRPOTrainer
    if ADVANTAGES[p.advantage].trainer is not None:  # an estimator with its own trainer subclass (SPO's tracker, sampler)
        import importlib

        module, name = ADVANTAGES[p.advantage].trainer.split(":")
        cls = getattr(importlib.import_module(module), name)
    if "tools" in user or "environment_factory" in user:
        prepare_tool_tokenizer(ctx.tokenizer, ctx.model, key="method.tools" if "tools" in user else "method.environment")
    rewards = load_rewards(p.rewards, base_dirs=dirs, dtype=recipe.model.dtype)
    stratum_fn = make_stratum_fn(p.stratum_key, train.column_names, dirs) if ADVANTAGES[p.advantage].needs_strata else None
    extra: dict[str, Any] = dict(user)
    if cls is not PosttrainGRPOTrainer:  # the estimator's own subclass records its start model (SPO's offline pass)
        extra["start_model"] = model_identity(recipe.model)
    if any(pc is not None for pc in rewards.processing_classes):
        extra["reward_processing_classes"] = rewards.processing_classes
    return make_trainer(
        cls,
        recipe,
        **trainer_kwargs(ctx, config, train, evals),
        reward_funcs=rewards.funcs,
        stratum_fn=stratum_fn,
        **extra,
    )
