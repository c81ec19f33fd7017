"""The online-preference family (``online_dpo``): DPO on pairs the policy samples, ranked by rewards.

Built on posttrain's GRPO trainer (:class:`posttrain.families.rl.trainer.PosttrainGRPOTrainer`, itself a thin subclass of TRL's
``GRPOTrainer``) with two generations per prompt: TRL does the sampling (transformers or vLLM), the reward functions
and reward models of ``method.rewards`` (the same specs as GRPO), the reference model (``ref_model:``, a frozen copy of
the start model, or the adapter-disabled base with PEFT) and the reference log-probs of each rollout. Three methods are
replaced:

* ``_calculate_rewards``: TRL's, with the gathered per-function rewards kept for the ranking;
* ``_generate_and_score_completions``: TRL's (without its old-policy forward: :meth:`_without_old_policy_logps`), then
  each prompt's two completions are ranked
  (:func:`posttrain.losses.preference.rank_pairs`; ``missing_eos_penalty`` first) and the batch is regrouped by pair
  (``[P, 2, ...]`` tensors), so that TRL's shuffling and splitting into micro-batches keep the two rows of a pair
  together;
* ``_compute_loss``: summed completion log-probs of policy and reference, :func:`posttrain.losses.preference.dpo_loss`
  (``sigmoid`` or ``ipo``, TRL's online-DPO forms) per pair, and :func:`~posttrain.losses.preference.online_dpo_loss`
  over the kept pairs of the step's global batch.

Every log-prob comes from the log-prob engine (:mod:`posttrain.logprobs`, docs/logprob_engine.md), as for GRPO:
completion rows only, the head of ``training.logprob_head``, and the two completions of a prompt packed around it (the
prompt computed once per pair; ``training.share_prompts: false`` turns it off), for the policy's training forward and
for the reference's log-probs TRL computes once per generation batch under ``no_grad``. The DPO log-probs are the
model's own (the engine at temperature 1), as in TRL's ``OnlineDPOTrainer``; ``training.temperature`` only shapes the
sampling. Method page: docs/methods/online_dpo.md.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from trl import GRPOTrainer

from posttrain.errors import UserError
from posttrain.families.rl.common import combine_rewards
from posttrain.families.rl.diagnostics import batch_signal
from posttrain.families.rl.trainer import PosttrainGRPOTrainer, recipe_dirs
from posttrain.logprobs.engine import LogProbEngine
from posttrain.losses.preference import dpo_loss, online_dpo_loss, preference_metrics, rank_pairs, sequence_logps

logger = logging.getLogger("posttrain")

# keys of the pair-grouped generation batch ([P, 2, ...] tensors, [P] pair fields, 0-dim totals)
LOSS_MASK, FIRST_CHOSEN, PAIR_KEEP, NUM_PAIRS = "loss_mask", "first_chosen", "pair_keep", "num_kept_pairs"


def _by_pair(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.size(0) // 2, 2, *t.shape[1:])


def _by_row(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *t.shape[2:])


class PosttrainOnlineDPOTrainer(PosttrainGRPOTrainer):
    """Online DPO (docs/methods/online_dpo.md) on posttrain's GRPO trainer with ``num_generations = 2``.

    Args:
        params: :class:`posttrain.methods.OnlineDPOParams`. The ``GRPOConfig``'s ``beta`` must be the DPO beta (it
            makes TRL keep the reference model and score every rollout with it; ``build_online_trainer`` sets it).
        ref_model: as for :class:`PosttrainGRPOTrainer`.
    """

    # False: TRL's no-grad forward of the policy over every rollout (its "old" log-probs, which the DPO loss never
    # reads) runs as in stock TRL when generation and optimizer steps are out of step (tests compare both)
    skip_old_policy_logps = True

    def __init__(self, *args, params, ref_model=None, **kwargs):
        super().__init__(*args, params=params, ref_model=ref_model, **kwargs)
        if self.num_generations != 2:
            raise ValueError(f"online DPO samples 2 completions per prompt, got num_generations={self.num_generations}")
        # DPO's log-probs are the model's own, not the sampling distribution's: the engine at temperature 1 (the RL
        # trainer's engine, same head and sharing, scores at training.temperature)
        self.engine = LogProbEngine(self.engine.head, share_prompts=self.engine.share_prompts, temperature=1.0,
                                    chunk_rows=self.engine.chunk_rows)

    # ---------------------------------------------------------------------------------------------------------------
    # pairs

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = GRPOTrainer._calculate_rewards(self, inputs, prompts, completions, completion_ids_list)
        self._rl_stash = {"rewards_per_func": rewards_per_func}
        return rewards_per_func

    @contextlib.contextmanager
    def _without_old_policy_logps(self):
        """TRL 1.16's ``_generate_and_score_completions`` scores every rollout with the policy once more under
        ``no_grad`` (the "old" log-probs of GRPO's ratio) when ``gradient_accumulation_steps % (steps_per_generation *
        num_iterations) != 0`` (``num_iterations: 2``, or a generation batch spanning several optimizer steps) or for
        vLLM's correction (off for online DPO: :func:`online_config`). The DPO loss never reads them
        (docs/methods/online_dpo.md#generation-and-the-old-policy), so while TRL generates, both factors read 1 and TRL
        takes generation as aligned with the optimizer step: no forward, no ``old_per_token_logps``. They are restored
        right after; TRL reads them nowhere else during generation (``tests/families/online/test_online_old_policy.py``
        fails if that changes). The reference's log-probs (also a forward of the policy, adapter disabled, with
        PEFT) are untouched."""
        if not self.skip_old_policy_logps:
            yield
            return
        saved = self.num_iterations, self.args.steps_per_generation
        self.num_iterations = self.args.steps_per_generation = 1
        try:
            yield
        finally:
            self.num_iterations, self.args.steps_per_generation = saved

    def _generate_and_score_completions(self, inputs):
        with self._without_old_policy_logps():
            output = GRPOTrainer._generate_and_score_completions(self, inputs)
        stash, self._rl_stash = self._rl_stash, None
        if stash is None:  # pragma: no cover - TRL stopped calling _calculate_rewards
            raise RuntimeError("GRPOTrainer no longer calls _calculate_rewards; posttrain's online DPO needs updating")
        p = self.params
        mode = "train" if self.model.training else "eval"
        device = self.accelerator.device
        rpf = stash["rewards_per_func"]
        rewards = combine_rewards(rpf, self.reward_weights.to(rpf.device))
        clipped = self._clipped(output).to(rewards.device)
        if p.missing_eos_penalty:
            rewards = rewards - p.missing_eos_penalty * clipped.to(rewards.dtype)
        first_chosen, keep = rank_pairs(rewards, p.ties)

        local_pairs = output["completion_ids"].size(0) // 2
        pairs = slice(self.accelerator.process_index * local_pairs, (self.accelerator.process_index + 1) * local_pairs)
        batch: dict[str, Any] = {key: output[key] for key in ("prompt_ids", "prompt_mask", "completion_ids",
                                                                "completion_mask", "ref_per_token_logps")}
        batch[LOSS_MASK] = output["completion_mask"] * output.get("tool_mask", 1)
        batch = {key: _by_pair(value) for key, value in batch.items()}
        batch[FIRST_CHOSEN] = first_chosen[pairs].to(device)
        batch[PAIR_KEEP] = keep[pairs].to(device=device, dtype=torch.float32)
        batch[NUM_PAIRS] = keep.sum().to(device=device, dtype=torch.float32)

        # the sign of each row's preference (0: tied or unscorable pair), for the no-signal monitor and the metrics
        sign = torch.where(first_chosen, 1.0, -1.0)[:, None] * torch.tensor([1.0, -1.0], device=rewards.device)
        sign = (sign * keep[:, None]).reshape(-1)
        r = rewards.view(-1, 2)
        margin = torch.where(first_chosen, r[:, 0] - r[:, 1], r[:, 1] - r[:, 0])[keep]
        m = self._metrics[mode]
        m["online_dpo/kept_pairs_frac"].append(keep.float().mean().item())
        m["online_dpo/tied_pairs_frac"].append((r[:, 0] == r[:, 1]).float().mean().item())
        if margin.numel():
            m["objective/scores_margin"].append(margin.mean().item())
        if mode == "train":
            self.signal_monitor.add(batch_signal(rewards, sign, keep.repeat_interleave(2), 2, clipped=clipped,
                                                 rewards_per_func=rpf, names=self.reward_func_names))
        return batch

    # ---------------------------------------------------------------------------------------------------------------
    # loss

    def _compute_loss(self, model, inputs):
        p = self.params
        mode = "train" if self.model.training else "eval"
        completion_ids = _by_row(inputs["completion_ids"])
        input_ids = torch.cat([_by_row(inputs["prompt_ids"]), completion_ids], dim=1)
        attention_mask = torch.cat([_by_row(inputs["prompt_mask"]), _by_row(inputs["completion_mask"])], dim=1)
        mask = _by_row(inputs[LOSS_MASK])
        # the engine, each pair's prompt computed once for its two completions; the entropy is a logged statistic
        logps, entropies = self._engine_logps(model, input_ids, attention_mask, completion_ids.size(1),
                                              entropy_grad=False, entropy_statistic=True)
        policy = sequence_logps(logps, mask).view(-1, 2)
        ref = sequence_logps(_by_row(inputs["ref_per_token_logps"]), mask).view(-1, 2)
        first = inputs[FIRST_CHOSEN]

        def chosen_rejected(x):
            return torch.where(first, x[:, 0], x[:, 1]), torch.where(first, x[:, 1], x[:, 0])

        (chosen, rejected), (ref_chosen, ref_rejected) = chosen_rejected(policy), chosen_rejected(ref)
        out = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=p.beta, loss_type=p.loss,
                       ipo_length_normalize=False)
        ga = self.current_gradient_accumulation_steps if mode == "train" else 1
        window = ga / self.args.steps_per_generation if mode == "train" else 1.0
        keep = inputs[PAIR_KEEP]
        loss = online_dpo_loss(out.losses, keep, inputs[NUM_PAIRS] * window, self.accelerator.num_processes)

        gather = self.accelerator.gather
        kept = gather(keep).bool()
        metrics = self._metrics[mode]
        if bool(kept.any()):
            for name, value in preference_metrics(gather(out.chosen_rewards)[kept], gather(out.rejected_rewards)[kept],
                                                  gather(chosen.detach())[kept],
                                                  gather(rejected.detach())[kept]).items():
                metrics[name].append(value)
            metrics["policy_loss"].append((gather(out.losses.detach())[kept]).mean().item())
        totals = self.accelerator.reduce(torch.stack([(entropies.detach() * mask).sum(), mask.sum().float()]),
                                         reduction="sum")
        metrics["entropy"].append((totals[0] / totals[1].clamp(min=1.0)).item())
        return loss


# ----------------------------------------------------------------------------------------------------------------------
# Building from a recipe
# ----------------------------------------------------------------------------------------------------------------------

# GRPOConfig fields the method sets, and GRPO loss options the DPO loss replaces
_METHOD_OWNED = {
    "beta": "method.beta",
    "reward_weights": "method.rewards[].weight",
    "num_generations": "nothing: online DPO samples 2 completions per prompt",
    "num_generations_eval": "nothing: online DPO samples 2 completions per prompt",
}
_NOT_USED = ("loss_type", "epsilon", "epsilon_high", "delta", "scale_rewards", "importance_sampling_level",
             "use_bias_correction_kl", "top_entropy_quantile", "off_policy_mask_threshold", "use_adaptive_entropy",
             "multi_objective_aggregation", "mask_truncated_completions", "vllm_importance_sampling_mode",
             "vllm_importance_sampling_clip_max", "vllm_importance_sampling_clip_min", "vllm_importance_sampling_cap")
# GRPO's correction of vLLM's sampling probabilities (on by default in GRPOConfig): its ratios weight GRPO's policy
# gradient, and TRL computes them from an extra forward of the policy over every rollout (the "old" log-probs); the
# DPO loss reads neither, so online DPO turns it off
IS_CORRECTION = "vllm_importance_sampling_correction"


def check_online_recipe(recipe) -> None:
    """Checks that need no model: vLLM settings, every reward function / reward-model config and the rollout function
    (imports user code)."""
    from posttrain.rl.rewards import load_rewards
    from posttrain.rl.vllm_sync import check_vllm_recipe

    check_vllm_recipe(recipe.training)
    load_rewards(recipe.params.rewards, base_dirs=recipe_dirs(recipe), load_models=False)
    _rollout_func(recipe)


def _rollout_func(recipe) -> dict[str, Any]:
    """``{"rollout_func": fn}`` for TRL when ``method.rollout_func`` is set (an error naming the key if it does not
    import), else ``{}``."""
    from posttrain.rl.rewards import import_function

    name = recipe.params.rollout_func
    return {} if name is None else {"rollout_func": import_function(name, "method.rollout_func", recipe_dirs(recipe))}


def check_online_data(recipe, datasets: dict[str, Any]) -> None:
    """Checks of the loaded prompts that need no model (preflight): a reward that compares with the answer needs an
    ``answer`` column, and rows whose answer is null, blank or NaN are skipped with a logged count."""
    from posttrain.data.sources import drop_unanswerable
    from posttrain.rl.rewards import NEEDS_ANSWER

    train = datasets.get("data.train")
    if train is None:
        return
    needs = [f"method.rewards[{i}] ({spec.name})" for i, spec in enumerate(recipe.params.rewards)
             if spec.name in NEEDS_ANSWER]
    if needs and "answer" not in train.column_names:
        raise UserError(f"{needs[0]}: needs an 'answer' column in data.train (has {train.column_names}; rename with "
                        "data.train.columns)")
    if needs:
        datasets["data.train"] = drop_unanswerable(train, "data.train")


def online_config(recipe, info):
    """The :class:`~posttrain.families.rl.config.RLConfig` (``GRPOConfig`` + the log-prob engine's keys) of an
    ``online_dpo`` recipe (two generations per prompt, beta = the DPO beta); a ``training.logprob_head`` that cannot
    run on this machine is refused here, before the model loads."""
    from posttrain.families.rl.config import RLConfig
    from posttrain.logprobs.heads import check_head_here
    from posttrain.trainers.common import training_config

    p, t = recipe.params, recipe.training
    if recipe.data.train is None:
        raise UserError("data.train: required key is missing")
    for key, where in _METHOD_OWNED.items():
        if key in t:
            raise UserError(f"training.{key}: set by method '{info.name}'; use {where}")
    for key in _NOT_USED:
        if key in t:
            raise UserError(f"training.{key}: a GRPO loss option; method '{info.name}' trains with the DPO loss "
                            "(method.loss, method.beta)")
    if t.get(IS_CORRECTION):
        raise UserError(f"training.{IS_CORRECTION}: a GRPO loss option (it weights GRPO's policy gradient by the "
                        f"policy / vLLM probability ratio); method '{info.name}' trains with the DPO loss (method.loss, "
                        "method.beta), which takes no such weight; posttrain turns it off (no extra forward per step)")
    size = t.get("per_device_train_batch_size", 8)
    if size % 2:
        raise UserError(f"training.per_device_train_batch_size: online DPO trains on pairs (2 completions of a prompt "
                        f"in the same micro-batch); use an even number, got {size}")
    overrides: dict[str, Any] = {"num_generations": 2, "beta": p.beta, "scale_rewards": "none",
                                 "reward_weights": [spec.weight for spec in p.rewards], IS_CORRECTION: False}
    config = training_config(RLConfig, recipe, overrides)
    check_head_here(config)
    return config


def build_online_trainer(ctx):
    """``online_dpo`` on :class:`PosttrainOnlineDPOTrainer`."""
    from posttrain.adapters.trainer import make_trainer
    from posttrain.rl.rewards import load_rewards
    from posttrain.trainers.common import trainer_kwargs

    recipe, p = ctx.recipe, ctx.recipe.params
    config = ctx.config if ctx.config is not None else online_config(recipe, ctx.info)
    checked = {"data.train": ctx.dataset("data.train", "rl")}
    check_online_data(recipe, checked)  # done by preflight already in `posttrain train`; cheap when repeated
    train = checked["data.train"]
    rewards = load_rewards(p.rewards, base_dirs=recipe_dirs(recipe), dtype=recipe.model.dtype)
    extra: dict[str, Any] = _rollout_func(recipe)
    if any(pc is not None for pc in rewards.processing_classes):
        extra["reward_processing_classes"] = rewards.processing_classes
    return make_trainer(
        PosttrainOnlineDPOTrainer,
        recipe,
        **trainer_kwargs(ctx, config, train),
        reward_funcs=rewards.funcs,
        **extra,
    )
