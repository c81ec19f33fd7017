"""Method families: what a family of methods needs from the run, in one registered entry per family.

A method's ``MethodInfo.family`` names its :class:`Family`; the recipe loader, preflight, the run and the previews ask
that entry (its data keys, TRL config class, builders, checks, evaluation defaults) instead of keeping tables keyed by
family names. Code is referred to by ``"module:attribute"`` strings, imported on first use, so that this module (and
the recipe schema that reads it) imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Family:
    """One family of methods.

    ``data``: the ``data:`` keys the family reads, each with the row format it is checked against
    (:func:`posttrain.data.sources.load_source`); the first is the data an optimizer step draws its batch from, and
    the others are refused. ``config_class``: the TRL / HF config class ``training:`` is checked against.
    ``build_config(recipe, info)`` / ``build_trainer(ctx)``: the family's builders (bottom of its trainer module).
    ``check_data(recipe, datasets)``: checks of the loaded data that need no model; ``check_code(recipe)``: imports
    the recipe's own code (run after every other check). ``test_scorer(model, tokenizer, recipe, rows)`` scores
    ``data.test`` before and after training under the name ``test_metric`` (default: greedy answer accuracy).
    ``model_head``: the head :func:`posttrain.models.load_model` puts on the checkpoint. ``pass_k``: the default
    ``eval.pass_k`` (when there is a ``data.test``). ``completions_per_row``: the config key giving completions per
    data row (sampling families). ``masks_conversations``: ``messages`` rows get the loss on assistant turns only.
    ``evaluates_forgetting``: the unlearning evaluation (``eval.unlearning``, ``eval.retain_model``) applies.
    ``preview`` / ``preview_keys``: how ``posttrain check --show`` renders the rows of those data keys.
    """

    name: str
    data: dict[str, str]
    config_class: str
    build_config: str | Callable[..., Any]
    build_trainer: str | Callable[..., Any]
    preview: str
    preview_keys: tuple[str, ...] = ("data.train",)
    check_data: str | None = None
    check_code: str | None = None
    test_metric: str = "accuracy"
    test_scorer: str | None = None
    model_head: str = "causal"
    pass_k: tuple[int, ...] = ()
    completions_per_row: str | None = None
    masks_conversations: bool = False
    evaluates_forgetting: bool = False

    @property
    def data_keys(self) -> tuple[str, ...]:
        return tuple(self.data)


# in the order `posttrain methods` lists them
FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("sft", {"train": "sft", "eval": "sft", "test": "test"},
               "posttrain.families.sft.config:SFTFamilyConfig",
               "posttrain.families.sft.trainer:sft_config", "posttrain.families.sft.trainer:build_sft_trainer",
               "posttrain.preview:sft_rows", check_data="posttrain.families.sft.trainer:check_sft_data",
               masks_conversations=True),
        Family("preference", {"train": "preference", "eval": "preference", "test": "test"},
               "posttrain.families.preference.config:PreferenceConfig",
               "posttrain.families.preference.trainer:preference_config",
               "posttrain.families.preference.trainer:build_preference_trainer",
               "posttrain.preview:preference_rows"),
        Family("unpaired", {"train": "unpaired", "eval": "unpaired", "test": "test"},
               "posttrain.families.unpaired.config:UnpairedConfig",
               "posttrain.families.unpaired.trainer:kto_config",
               "posttrain.families.unpaired.trainer:build_kto_trainer", "posttrain.preview:unpaired_rows"),
        Family("online", {"train": "rl", "test": "test"}, "posttrain.families.rl.config:RLConfig",
               "posttrain.families.online.trainer:online_config",
               "posttrain.families.online.trainer:build_online_trainer", "posttrain.preview:rl_rows",
               check_data="posttrain.families.online.trainer:check_online_data",
               check_code="posttrain.families.online.trainer:check_online_recipe", pass_k=(1, 4)),
        Family("reward", {"train": "preference", "eval": "preference", "test": "preference"}, "trl:RewardConfig",
               "posttrain.families.reward.trainer:reward_config",
               "posttrain.families.reward.trainer:build_reward_trainer", "posttrain.preview:reward_rows",
               check_data="posttrain.families.reward.trainer:check_reward_data", test_metric="pairwise accuracy",
               test_scorer="posttrain.families.reward.trainer:pairwise_test_accuracy",
               model_head="score"),
        Family("unlearning", {"forget": "unlearning", "retain": "unlearning", "holdout": "unlearning"},
               "posttrain.families.unlearning.trainer:UnlearningConfig",
               "posttrain.families.unlearning.trainer:unlearning_config",
               "posttrain.families.unlearning.trainer:build_unlearning_trainer", "posttrain.preview:unlearning_rows",
               preview_keys=("data.forget", "data.retain"), evaluates_forgetting=True),
        Family("rl", {"train": "rl", "eval": "rl", "test": "test"}, "posttrain.families.rl.config:RLConfig",
               "posttrain.families.rl.trainer:rl_config", "posttrain.families.rl.trainer:build_rl_trainer",
               "posttrain.preview:rl_rows", check_data="posttrain.families.rl.trainer:check_rl_data",
               check_code="posttrain.families.rl.trainer:check_rl_recipe",
               pass_k=(1, 4), completions_per_row="num_generations"),
    )
}
