"""The reward-model family (``reward``): a thin subclass of TRL's ``RewardTrainer``.

A sequence-classification head (one score, read at the last token) is trained on preference pairs with the
Bradley-Terry loss of :mod:`posttrain.losses.reward`. TRL does the collation (``[chosen rows; rejected rows]``), the
pad-token setup and the PEFT wrapping (task ``SEQ_CLS``: the score head is trained and saved with the adapter).
posttrain replaces:

* ``_prepare_dataset``: each side is rendered exactly as the RL trainers score a completion with a reward model
  (:func:`scored_text`: plain ``prompt + completion``; conversational rows through the chat template), so a model
  trained here scores GRPO / online-DPO rollouts in the format it was trained on; pairs longer than ``max_length``
  are dropped with a logged count (TRL drops them silently); a ``margin`` column is kept only with ``method.margin``;
* ``compute_loss``: :func:`posttrain.losses.reward.bradley_terry_loss` and TRL's metrics
  (:func:`~posttrain.losses.reward.reward_metrics`).

:func:`pairwise_scores` scores pairs the same way for ``data.test`` (pairwise accuracy before and after training).
Method page: docs/methods/reward.md.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from trl import RewardTrainer

from posttrain.errors import UserError
from posttrain.losses.reward import bradley_terry_loss, pairwise_accuracy, reward_metrics
from posttrain.trainers.common import AtomicCheckpointMixin, log_length_effects

logger = logging.getLogger("posttrain")


def scored_text(prompt: Any, completion: Any, tokenizer) -> str:
    """The text a reward model scores for ``prompt`` + ``completion``: the plain concatenation, or, when either side is
    conversational, the whole conversation through the chat template (a plain side becomes the user / assistant
    turn). The same rendering as TRL's GRPO and online-DPO trainers give their reward models."""
    from trl.data_utils import apply_chat_template

    from posttrain.data.formatting import is_conversation

    if not is_conversation(prompt) and not is_conversation(completion):
        return ("" if prompt is None else str(prompt)) + str(completion)
    if not is_conversation(prompt):
        prompt = [{"role": "user", "content": "" if prompt is None else str(prompt)}]
    if not is_conversation(completion):
        completion = [{"role": "assistant", "content": str(completion)}]
    return apply_chat_template({"messages": list(prompt) + list(completion)}, tokenizer)["text"]


def tokenize_pairs(rows, tokenizer) -> dict[str, list[list[int]]]:
    """``chosen_ids`` / ``rejected_ids`` of preference rows, as :func:`scored_text` renders them (no special tokens
    added: the scorer's ``add_special_tokens=False``)."""
    out: dict[str, list[list[int]]] = {"chosen_ids": [], "rejected_ids": []}
    for row in rows:
        for side in ("chosen", "rejected"):
            text = scored_text(row.get("prompt"), row[side], tokenizer)
            out[f"{side}_ids"].append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


@torch.no_grad()
def pairwise_scores(model, tokenizer, rows, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's scores of each row's chosen and rejected response (``[N]`` each), right-padded batches."""
    device = next(model.parameters()).device
    ids = tokenize_pairs(rows, tokenizer)
    was_training = model.training
    model.eval()
    scores = {}
    for side in ("chosen", "rejected"):
        values = []
        for start in range(0, len(rows), batch_size):
            chunk = ids[f"{side}_ids"][start:start + batch_size]
            width = max(len(x) for x in chunk)
            input_ids = torch.tensor([x + [tokenizer.pad_token_id] * (width - len(x)) for x in chunk], device=device)
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in chunk], device=device)
            values.append(model(input_ids=input_ids, attention_mask=mask).logits[:, 0].float().cpu())
        scores[side] = torch.cat(values)
    model.train(was_training)
    return scores["chosen"], scores["rejected"]


def pairwise_test_accuracy(model, tokenizer, recipe, rows) -> float:
    """``data.test`` pairwise accuracy of a reward model (share of pairs whose chosen response scores higher)."""
    return pairwise_accuracy(*pairwise_scores(model, tokenizer, rows, recipe.eval.batch_size))


class PosttrainRewardTrainer(AtomicCheckpointMixin, RewardTrainer):
    """The reward-model family on top of ``trl.RewardTrainer``.

    Args:
        params: :class:`posttrain.methods.RewardParams` (``margin``, ``center_rewards_coef``).
    """

    def __init__(self, *args, params, **kwargs):
        self.params = params
        super().__init__(*args, **kwargs)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        from datasets import Dataset

        if not isinstance(dataset, Dataset) or "chosen_ids" in dataset.column_names:
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        key = f"data.{dataset_name}"
        if "margin" in dataset.column_names and not self.params.margin:
            logger.warning("%s: the 'margin' column is not used (method.margin: false)", key)
            dataset = dataset.remove_columns("margin")
        for column, values in tokenize_pairs(dataset, processing_class).items():
            dataset = dataset.add_column(column, values)
        if args.max_length is not None:  # TRL drops pairs with a side longer than max_length: count them
            from posttrain.data.sources import column_values

            lengths = zip(column_values(dataset, "chosen_ids"), column_values(dataset, "rejected_ids"), strict=True)
            keep = [i for i, (c, r) in enumerate(lengths) if len(c) <= args.max_length and len(r) <= args.max_length]
            total = len(dataset)
            if len(keep) < total:
                dataset = dataset.select(keep)
            log_length_effects(key, total, 0, total - len(keep), args.max_length,
                               "the chosen or rejected sequence is longer than max_length")
        return dataset

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        margins = inputs.pop("margin", None)
        inputs["use_cache"] = False
        outputs = model(**inputs)
        scores = outputs.logits.squeeze(-1)
        chosen, rejected = torch.chunk(scores, chunks=2)
        out = bradley_terry_loss(chosen, rejected, margins, self.params.center_rewards_coef)
        g = self.accelerator.gather_for_metrics
        if mode == "train":
            self._total_train_tokens += g(inputs["attention_mask"].sum()).sum().item() // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        with torch.no_grad():
            metrics = reward_metrics(g(scores.detach()), g(chosen.detach()), g(rejected.detach()))
        for name, value in metrics.items():
            self._metrics[mode][name].append(value)
        return (out.loss, outputs) if return_outputs else out.loss


# ----------------------------------------------------------------------------------------------------------------------
# Building from a recipe
# ----------------------------------------------------------------------------------------------------------------------

_METHOD_OWNED = {"center_rewards_coefficient": "method.center_rewards_coef"}
_UNSUPPORTED = ("chat_template_path", "eos_token", "pad_token", "use_liger_kernel")


def reward_config(recipe, info):
    """The ``RewardConfig`` of a ``reward`` recipe (built before any model loads)."""
    from trl import RewardConfig

    from posttrain.trainers.common import training_config

    for key, where in _METHOD_OWNED.items():
        if key in recipe.training:
            raise UserError(f"training.{key}: set by the method; use {where}")
    for key in _UNSUPPORTED:
        if key in recipe.training:
            raise UserError(f"training.{key}: not supported by posttrain's reward trainer (use data.chat_template for "
                            "templates)" if key == "chat_template_path" else
                            f"training.{key}: not supported by posttrain's reward trainer")
    if recipe.data.train is None:
        raise UserError("data.train: required key is missing")
    if recipe.eval.steps is not None:
        raise UserError("eval.steps: a reward model is scored on pairs, not by generating answers; data.eval gives "
                        "its pairwise accuracy during training (eval_accuracy) and data.test before and after")
    overrides: dict[str, Any] = {"max_length": 512}
    if recipe.data.eval is not None:
        overrides.update(eval_strategy="steps", eval_steps=recipe.training.get("logging_steps", 10))
    return training_config(RewardConfig, recipe, overrides)


def check_reward_data(recipe, datasets: dict[str, Any]) -> None:
    """With ``method.margin: true`` the training (and eval) pairs carry a numeric ``margin`` column (checked when the
    data loads, before any model)."""
    if not recipe.params.margin:
        return
    from posttrain.data.sources import column_values

    for key in ("data.train", "data.eval"):
        ds = datasets.get(key)
        if ds is None:
            continue
        if "margin" not in ds.column_names:
            raise UserError(f"{key}: method.margin: true reads a 'margin' column (a number per pair); {key} has "
                            f"{ds.column_names}")
        for i, value in enumerate(column_values(ds, "margin")):
            if isinstance(value, bool) or not isinstance(value, int | float) or value != value or abs(value) == float("inf"):
                raise UserError(f"{key}: row {i}: column 'margin' must be a finite number, got {value!r}")


def build_reward_trainer(ctx):
    """``reward`` on :class:`PosttrainRewardTrainer` (LoRA: peft task ``SEQ_CLS``, the score head trained in full)."""
    from posttrain.trainers.common import peft_config

    recipe = ctx.recipe
    config = ctx.config if ctx.config is not None else reward_config(recipe, ctx.info)
    train = ctx.dataset("data.train", "preference")
    evals = ctx.dataset("data.eval", "preference") if recipe.data.eval is not None else None
    check_reward_data(recipe, ctx.datasets)
    return PosttrainRewardTrainer(
        model=ctx.model,
        args=config,
        train_dataset=train,
        eval_dataset=evals,
        processing_class=ctx.tokenizer,
        peft_config=peft_config(recipe, task_type="SEQ_CLS"),
        callbacks=ctx.callbacks,
        params=recipe.params,
    )
