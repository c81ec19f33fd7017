"""The method registry: every ``method.name`` a recipe can pick, with its hyperparameters and trainer.

Each method declares a pydantic model of its hyperparameters (the sibling keys of ``method.name`` in a recipe),
the family it belongs to (which decides the data format and the trainer), its paper, and its runnable recipe.
The math lives in ``posttrain.losses`` / ``posttrain.rl``; the families' methods, one file each, in
``posttrain/families/<family>/methods/`` (registered by importing them below, in the order ``posttrain methods``
lists them); the wiring in ``posttrain/families/<family>/trainer.py`` and ``posttrain.trainers``.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

# The method registry's types live in posttrain.registry (the family method files import them from there)
from posttrain.registry import FAMILIES, METHODS, Family, MethodInfo, MethodParams, register  # noqa: F401
from posttrain.families.rl.parts import POLICY_LOSSES, SURROGATE_PARTS


# --------------------------------------------------------------------------------------------------------------------
# SFT family: one file per method (params, objective, registration), each registered on import (listed first)
# --------------------------------------------------------------------------------------------------------------------

import posttrain.families.sft.methods  # noqa: E402, F401
from posttrain.families.sft.methods.asft_anchored import ASFTAnchoredParams  # noqa: E402, F401
from posttrain.families.sft.methods.dft import DFTParams  # noqa: E402, F401
from posttrain.families.sft.methods.poft import PoFTParams  # noqa: E402, F401
from posttrain.families.sft.methods.sft import SFTParams  # noqa: E402, F401


# --------------------------------------------------------------------------------------------------------------------
# RL family (docs/methods/grpo.md, docs/methods/grpo_advantages.md, docs/methods/grpo_aggregation.md, docs/methods/grpo_clipping.md)
# --------------------------------------------------------------------------------------------------------------------


class RewardSpec(BaseModel):
    """One reward: a built-in ``name`` (exact_match, math_verify, format), a user ``function``
    (``module:function`` or ``path/to/file.py:function`` with TRL's reward signature), or a reward ``model`` (hub id or
    local directory of a sequence-classification model, scored by TRL on prompt + completion); its ``weight`` and, for
    names and functions, keyword ``options``."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    name: str | None = None
    function: str | None = None
    model: str | None = None
    weight: float = 1.0
    options: dict = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self):
        from posttrain.rl.rewards import BUILTIN_REWARDS, split_function_path

        if sum(v is not None for v in (self.name, self.function, self.model)) != 1:
            raise ValueError(
                "give exactly one of name (built-in reward), function (module:function or file.py:function) or "
                "model (reward model path)"
            )
        if self.name is not None and self.name not in BUILTIN_REWARDS:
            from posttrain.errors import did_you_mean

            raise ValueError(
                f"unknown built-in reward '{self.name}'{did_you_mean(self.name, BUILTIN_REWARDS)}; "
                f"built-ins: {sorted(BUILTIN_REWARDS)}"
            )
        if self.name is not None:
            _check_reward_options(self.name, BUILTIN_REWARDS[self.name][0], self.options)
        if self.function is not None:
            split_function_path(self.function)  # ValueError: not module:function or file.py:function
        if self.model is not None and self.options:
            raise ValueError("options: not used with a reward model (model:)")
        _check_finite(self.options, "options")
        return self


def _check_reward_options(name: str, factory, options: dict) -> None:
    """A built-in reward's ``options`` are keyword arguments of its factory, each of the annotated type (strict:
    ``'yes'`` is not a boolean)."""
    import inspect
    import typing

    from pydantic import TypeAdapter, ValidationError

    from posttrain.errors import did_you_mean

    params = inspect.signature(factory).parameters
    hints = typing.get_type_hints(factory)
    for key, value in options.items():
        if key not in params:
            known = ", ".join(params) or "none"
            raise ValueError(f"options.{key}: not an option of reward '{name}'{did_you_mean(str(key), params)} "
                             f"(options: {known})")
        annotation = hints.get(key, typing.Any)
        try:
            TypeAdapter(annotation).validate_python(value, strict=True)
        except ValidationError:
            raise ValueError(f"options.{key}: reward '{name}' expects {getattr(annotation, '__name__', annotation)}, "
                             f"got {value!r}") from None


def _check_finite(node, where: str) -> None:
    """Every float inside ``node`` (free-form options) is finite."""
    import math

    if isinstance(node, float) and not math.isfinite(node):
        raise ValueError(f"{where}: must be a finite number, got {node!r}")
    if isinstance(node, dict):
        for key, value in node.items():
            _check_finite(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _check_finite(value, f"{where}[{i}]")


class _GRPOBase(MethodParams):
    """RLVR on TRL's ``GRPOTrainer`` with three independent parts: advantage estimator, loss aggregation, clipping.

    Everything not here (num_generations, max_completion_length, temperature, num_iterations, generation and vLLM
    settings) is a ``training:`` key of ``trl.GRPOConfig``. The parts' keys come from their options models
    (:mod:`posttrain.families.rl.parts`): :data:`GRPOParams` is this model plus those.
    """

    rewards: list[RewardSpec] = Field(
        default_factory=lambda: [RewardSpec(name="exact_match")],
        description="Rewards (built-in name, function or reward model), summed with their weights (TRL "
        "sum_then_normalize).",
    )
    # tool calling (TRL's multi-turn rollouts; docs/rlvr.md "Tool calling")
    tools: list[str] = Field(
        default_factory=list,
        description="Tool functions ('module:function' or 'file.py:function', typed, with a Google-style docstring) "
        "the model may call during rollouts (TRL GRPOTrainer tools); needs conversational prompts.",
    )
    environment: str | None = Field(
        None, description="'module:Class' or 'file.py:Class': TRL environment_factory (one instance per rollout; its "
        "public methods are tools, an optional get_reward() adds a reward).",
    )
    rollout_func: str | None = Field(
        None, description="'module:function' or 'file.py:function': TRL rollout_func(prompts, trainer) -> dict that "
        "replaces generation (experimental in TRL).",
    )
    correct_reward: float = Field(
        1.0, description="A row is correct iff its combined reward equals this (psr/nsr/w_reinforce, SFT term)."
    )
    warn_no_signal_after: int = Field(
        2, ge=0, description="Warn after this many logging steps in a row without learning signal (every advantage 0 "
        "or grad norm 0), naming the likely cause; 0: no warning (the end-of-run line stays)."
    )

    @property
    def uses_reference(self) -> bool:
        """Whether a reference model is needed (the KL term is on)."""
        return self.beta > 0

    @model_validator(mode="after")
    def _check(self):
        from posttrain.errors import UserError

        given = set(self.model_fields_set)  # the keys the recipe gave (resolving defaults below adds to the set)

        def refuse(keys, why):
            for key in keys:
                if key in given:
                    raise UserError(f"method.{key}: {why}")

        def owners(registry) -> dict[str, list[str]]:
            found: dict[str, list[str]] = {}
            for entry in registry:
                for key in entry.keys:
                    found.setdefault(key, []).append(entry.name)
            return found

        loss = POLICY_LOSSES[self.loss]
        defaults: dict = {}
        for key, names in owners(POLICY_LOSSES).items():  # a key of another objective
            if key not in loss.keys:
                refuse((key,), f"only used with method.loss: {' or '.join(names)}" if loss.uses_parts
                       else f"not used by method.loss: {loss.name} ({loss.replaces})")
        if not loss.uses_parts:
            for part, registry in SURROGATE_PARTS:
                refuse((part, *owners(registry)), f"not used by method.loss: {loss.name} ({loss.replaces})")
        else:
            for part, registry in SURROGATE_PARTS:  # a key one part reads is an error when another is selected
                chosen = registry[getattr(self, part)]
                defaults.update(chosen.defaults)
                why = chosen.refuses
                for key, names in owners(registry).items():
                    if key in why:
                        if getattr(self, key) != type(self).model_fields[key].default:  # the default is harmless
                            refuse((key,), f"{part} {chosen.name} {why[key]}")
                    elif key not in chosen.keys:
                        refuse((key,), f"only used with {part}: {' or '.join(names)} ({part} is {chosen.name})")
        if self.beta == 0:
            refuse(("use_bias_correction_kl",), "only used with the KL term (method.beta > 0)")
        if not self.rewards:
            raise UserError("method.rewards: give at least one reward function")
        # the selected parts' defaults (GPPO: Klear-Reasoner's eps_h 0.28 and SFT term 0.1; PSR/NSR/W-REINFORCE: the
        # paper's entropy bonus 1e-4; docs/methods/grpo_clipping.md#hyperparameters, grpo_advantages.md)
        if self.epsilon is None:
            self.epsilon = defaults.get("epsilon", 0.2)
        if self.epsilon_high is None:
            self.epsilon_high = defaults.get("epsilon_high")
        if self.sft_coef is None:
            self.sft_coef = defaults.get("sft_coef", 0.0)
        if self.entropy_coef is None:
            self.entropy_coef = defaults.get("entropy_coef", 0.0)
        self.__pydantic_fields_set__ = given  # resolved defaults are not the user's settings (the checks tell apart)
        if loss.uses_parts:  # each selected part checks the settings it reads (cross-key checks)
            for part, registry in SURROGATE_PARTS:
                chosen = registry[getattr(self, part)]
                problem = chosen.check(self) if chosen.check is not None else None
                if problem:
                    raise UserError(problem)
        if not any(spec.weight != 0 for spec in self.rewards):
            raise UserError("method.rewards: every weight is 0, so the combined reward is always 0 and there is "
                            "nothing to learn; give at least one reward a non-zero weight")
        return self


# the part selectors: their values, defaults and descriptions come from the registries
_SELECTOR_DEFAULTS = {"advantage": "group", "aggregation": "dapo", "clipping": "ppo", "loss": "grpo"}


def _selector_field(key: str, registry) -> tuple:
    """``method.<key>``: one of the registry's names; the description names the values with their pages."""
    by_page: dict[str, list[str]] = {}
    for entry in registry:
        by_page.setdefault(entry.doc.split("#", 1)[0].removeprefix("docs/methods/"), []).append(entry.name)
    pages = "; ".join(f"{', '.join(names)} ({page})" for page, names in by_page.items())
    return (Literal[registry.names()], Field(_SELECTOR_DEFAULTS[key], description=f"The {registry.kind}: {pages}."))


def _grpo_fields() -> dict[str, tuple]:
    """Each selector followed by the keys its entries own (first owner wins for a shared key)."""
    fields: dict[str, tuple] = {}
    for key, registry in (*SURROGATE_PARTS, ("loss", POLICY_LOSSES)):
        fields[key] = _selector_field(key, registry)
        for entry in registry:
            if entry.options_model is not None:
                for name, info in entry.options_model.model_fields.items():
                    fields.setdefault(name, (info.annotation, info))
    return fields


GRPOParams = create_model("GRPOParams", __base__=_GRPOBase, __module__=__name__, **_grpo_fields())


def _grpo_summary() -> str:
    """Method ``grpo``'s summary, naming the registered parts of each kind."""
    kinds = ", ".join(f"{key} ({', '.join(registry.names())})"
                      for key, registry in (*SURROGATE_PARTS, ("loss", POLICY_LOSSES)))
    return f"RLVR on TRL's GRPOTrainer with composable parts: {kinds}."


def _reassemble_grpo_params() -> None:
    """Rebuild :data:`GRPOParams` after a part registry changed and give it to method ``grpo``: a part registered
    after this module was imported (from its own file) is selectable with its options, no list kept by hand."""
    global GRPOParams
    GRPOParams = create_model("GRPOParams", __base__=_GRPOBase, __module__=__name__, **_grpo_fields())
    METHODS["grpo"] = dataclasses.replace(METHODS["grpo"], params=GRPOParams, summary=_grpo_summary())


# --------------------------------------------------------------------------------------------------------------------
# Online preference family (docs/methods/online_dpo.md): pairs sampled from the policy, ranked by rewards
# --------------------------------------------------------------------------------------------------------------------


class OnlineDPOParams(MethodParams):
    """Online DPO: two completions per prompt from the current policy, ranked by the rewards, trained with DPO's loss
    against a frozen reference."""

    rewards: list[RewardSpec] = Field(
        default_factory=lambda: [RewardSpec(name="exact_match")],
        description="Rewards that rank each prompt's two completions (built-in name, function or reward model), "
        "summed with their weights, as in GRPO.",
    )
    loss: Literal["sigmoid", "ipo"] = Field(
        "sigmoid", description="sigmoid (DPO) or ipo, on summed log-probs (TRL's online DPO forms).")
    beta: float = Field(0.1, gt=0.0, description="KL strength beta (tau for IPO).")
    ties: Literal["skip", "first"] = Field(
        "skip", description="A pair whose two rewards are equal: skip it (no preference), or train on it with the "
        "first completion as chosen (TRL's OnlineDPOTrainer).")
    missing_eos_penalty: float | None = Field(
        None, ge=0.0, description="Subtracted from the reward of a completion cut at max_completion_length (no end "
        "token) before ranking (TRL's missing_eos_penalty); null: none.")
    rollout_func: str | None = Field(
        None, description="'module:function' or 'file.py:function': TRL rollout_func(prompts, trainer) -> dict that "
        "replaces the sampling of each prompt's two completions (as GRPO's method.rollout_func).",
    )
    warn_no_signal_after: int = Field(
        2, ge=0, description="Warn after this many logging steps in a row in which every pair tied (no learning "
        "signal), naming the likely cause; 0: no warning.")

    @model_validator(mode="after")
    def _check(self):
        from posttrain.errors import UserError

        if not self.rewards:
            raise UserError("method.rewards: give at least one reward function")
        return self


# the preference family: one file per method (params, objective, registration), each registered on import
import posttrain.families.preference.methods  # noqa: E402, F401
from posttrain.families.preference.methods.asft_aligned import ASFTAlignedParams  # noqa: E402, F401
from posttrain.families.preference.methods.dpo import DPOParams  # noqa: E402, F401
from posttrain.families.preference.methods.orpo import ORPOParams  # noqa: E402, F401
from posttrain.families.preference.methods.simpo import SimPOParams  # noqa: E402, F401
from posttrain.families.preference.methods.sparsepo import SparsePOParams  # noqa: E402, F401
from posttrain.families.preference.methods.wpo import WPOParams  # noqa: E402, F401


# the unpaired-preference and reward-model families: one file per method (params, registration)
import posttrain.families.unpaired.methods  # noqa: E402, F401
import posttrain.families.reward.methods  # noqa: E402, F401
from posttrain.families.reward.methods.reward import RewardParams  # noqa: E402, F401
from posttrain.families.unpaired.methods.kto import KTOParams  # noqa: E402, F401


# the unlearning family: one file per method page (params, method and objective registration), each registered on
# import
import posttrain.families.unlearning.methods  # noqa: E402, F401
from posttrain.families.unlearning.methods.ga import UnlearningParams  # noqa: E402, F401
from posttrain.families.unlearning.methods.grad_diff import GradDiffParams  # noqa: E402, F401
from posttrain.families.unlearning.methods.npo import NPOKLParams, NPOParams, NPORTParams  # noqa: E402, F401
from posttrain.families.unlearning.methods.rmu import RMUParams  # noqa: E402, F401
from posttrain.families.unlearning.methods.simnpo import SimNPOParams  # noqa: E402, F401


register(
    MethodInfo(
        name="grpo",
        doc="docs/methods/grpo.md",
        family="rl",
        summary=_grpo_summary(),
        paper="Shao et al., DeepSeekMath (GRPO, arXiv 2402.03300); Stratified GRPO (arXiv 2510.06214); ΔL "
        "Normalization (arXiv 2509.07558); Zhu et al., negative reinforcement (arXiv 2506.01347); Klear-Reasoner "
        "GPPO (arXiv 2508.07629); DAPO (arXiv 2503.14476); Dr. GRPO (arXiv 2503.20783); RLOO (arXiv 2402.14740); "
        "REINFORCE++ (arXiv 2501.03262); GSPO (arXiv 2507.18071); CISPO (MiniMax-M1, arXiv 2506.13585); PACS "
        "(loss: pacs, arXiv 2509.02522)",
        recipe="recipes/grpo.yaml",
        params=GRPOParams,
        reference="optional",
    )
)
for _part_registry in (*dict(SURROGATE_PARTS).values(), POLICY_LOSSES):
    _part_registry.on_change(_reassemble_grpo_params)


register(
    MethodInfo(
        name="online_dpo",
        doc="docs/methods/online_dpo.md",
        family="online",
        summary="Online DPO: two completions per prompt sampled from the policy, ranked by rewards (functions or a "
        "reward model), trained with the DPO loss against a frozen reference.",
        paper="Guo et al., Direct Language Model Alignment from Online AI Feedback (arXiv 2402.04792); Tajwar et al., "
        "Preference Fine-Tuning of LLMs Should Leverage Suboptimal, On-Policy Data (arXiv 2404.14367)",
        recipe="recipes/online_dpo.yaml",
        params=OnlineDPOParams,
        reference="required",
    )
)


def methods_with_key(key: str) -> list[str]:
    """The methods whose hyperparameters include ``key`` (a key given to another method is refused naming them)."""
    return [name for name, info in METHODS.items() if key in info.params.model_fields]


def get_method(name: str) -> MethodInfo:
    from posttrain.errors import UserError, did_you_mean

    if name not in METHODS:
        raise UserError(f"method.name: unknown method '{name}'{did_you_mean(name, METHODS)}; see `posttrain methods`")
    return METHODS[name]
