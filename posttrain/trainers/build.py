"""Building each family's trainer from a run context (recipe, loaded models, callbacks)."""

from __future__ import annotations

from posttrain.errors import UserError


def _sft_dataset(ctx, key: str, src):
    from posttrain.trainers.sft import POFT_SCORE_COLUMN, SFT_LOSSES

    ds = ctx.dataset(key, "sft")
    if POFT_SCORE_COLUMN in SFT_LOSSES[ctx.info.name].extra_columns:  # aligned-model scores, computed or read
        from posttrain.data.poft import attach_scores

        ds = attach_scores(ds, ctx.recipe.params, key)
    return ds


def check_sft_data(recipe, datasets) -> None:
    """Checks of the loaded SFT data that need no model (preflight): the extra columns the method's loss reads
    (PoFT's aligned scores, or the aligned models that will compute them)."""
    from posttrain.trainers.sft import POFT_SCORE_COLUMN, SFT_LOSSES

    if POFT_SCORE_COLUMN not in SFT_LOSSES[recipe.method.name].extra_columns:
        return
    from posttrain.data.poft import check_scores

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
    """``sft``, ``dft``, ``asft_anchored`` and ``poft`` on :class:`PosttrainSFTTrainer`."""
    from posttrain.adapters.trainer import make_trainer
    from posttrain.trainers.common import peft_config
    from posttrain.trainers.sft import PosttrainSFTTrainer

    recipe, params = ctx.recipe, ctx.recipe.params
    config = ctx.config if ctx.config is not None else sft_config(recipe, ctx.info)
    train = _sft_dataset(ctx, "data.train", recipe.data.train)
    evals = _sft_dataset(ctx, "data.eval", recipe.data.eval) if recipe.data.eval is not None else None
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
