"""The method registry: every ``method.name`` a recipe can pick, with its hyperparameters and trainer.

Each method declares a pydantic model of its hyperparameters (the sibling keys of ``method.name`` in a recipe),
the family it belongs to (which decides the data format and the trainer), its paper, and its runnable recipe.
The math lives in ``posttrain.losses`` / ``posttrain.rl``; the wiring in ``posttrain.trainers``.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

# The method registry's types live in posttrain.registry (the family method files import them from there)
from posttrain.registry import FAMILIES, METHODS, Family, MethodInfo, MethodParams, register  # noqa: F401
from posttrain.families.rl.parts import POLICY_LOSSES, SURROGATE_PARTS


# --------------------------------------------------------------------------------------------------------------------
# SFT family
# --------------------------------------------------------------------------------------------------------------------


class SFTParams(MethodParams):
    """Plain supervised fine-tuning: token-mean NLL over completion tokens."""

    completion_only_loss: bool = Field(True, description="Score only completion tokens (prompt tokens masked).")

    @property
    def completion_only(self) -> bool:
        """SFTConfig ``completion_only_loss``: only completion tokens are scored."""
        return self.completion_only_loss


class DFTParams(SFTParams):
    """Dynamic Fine-Tuning: NLL weighted per token by the detached token probability."""


class ASFTAnchoredParams(SFTParams):
    """Anchored SFT: DFT plus a token-level KL to a frozen anchor (the initial policy)."""

    asft_kl_coef: float = Field(0.05, ge=0.0, description="Weight lambda of the KL anchor.")
    kl_direction: Literal["base_to_policy", "policy_to_base"] = Field(
        "base_to_policy", description="KL(pi_base||pi_theta) as the reference code computes, or the paper's reverse."
    )

    @property
    def needs_hidden_states(self) -> bool:  # the anchor KL needs full-vocab logits from the hidden states
        return True

    @property
    def head_outside_forward(self) -> bool:  # the anchor KL projects the policy's hidden states, with gradients
        return True


class PoFTParams(SFTParams):
    """Preference-oriented SFT: Bradley-Terry of the target's mean log-likelihood against aligned LLMs'."""

    poft_beta: float = Field(1.0, gt=0.0, description="beta of -logsigmoid(beta (r_target - r_aligned) + gamma).")
    poft_gamma: float = Field(0.0, description="gamma, the margin of the Bradley-Terry logit.")
    poft_target_tokens: Literal["response", "all"] = Field(
        "response", description="Tokens of the target's score and loss: the response only, or prompt and response.")
    aligned_models: list[str] = Field(
        default_factory=list,
        description="Aligned models that score the data before training; empty means the data carries "
        "`poft_ref_scores` (list) or `poft_ref_score` (float).",
    )
    scoring_batch_size: int = Field(8, ge=1, le=2**31 - 1, description="Batch size of the aligned models' scoring "
                                    "pass (method.aligned_models).")

    @property
    def completion_only(self) -> bool:
        return self.completion_only_loss and self.poft_target_tokens != "all"


# --------------------------------------------------------------------------------------------------------------------
# Unpaired preference family (docs/methods/kto.md): rows labelled desirable / undesirable, no pairs needed
# --------------------------------------------------------------------------------------------------------------------


class KTOParams(MethodParams):
    """KTO: a prospect-theoretic value of each completion's implicit reward against a KL reference point."""

    beta: float = Field(0.1, gt=0.0, description="Scale of the implicit reward log pi/pi_ref (TRL's beta).")
    desirable_weight: float = Field(
        1.0, gt=0.0, description="lambda_D: weight of the desirable rows' losses (the paper advises lambda_D n_D / "
        "(lambda_U n_U) in [1, 4/3]).")
    undesirable_weight: float = Field(1.0, gt=0.0, description="lambda_U: weight of the undesirable rows' losses.")
    precompute_ref_log_probs: bool = Field(
        False, description="Compute reference log-probs (rows and KL sequences) once before training; no reference "
        "kept in memory.")


# --------------------------------------------------------------------------------------------------------------------
# Reward-model family (docs/methods/reward.md): a sequence-classification head trained on preference pairs
# --------------------------------------------------------------------------------------------------------------------


class RewardParams(MethodParams):
    """Bradley-Terry reward model: a scalar score per sequence, trained so that the chosen response scores higher."""

    margin: bool = Field(
        False, description="Ask each pair's score gap to exceed its `margin` column (a number per pair; Llama 2's "
        "preference-strength margin, TRL's margin column).")
    center_rewards_coef: float = Field(
        0.0, ge=0.0, description="Weight of mean (s_c + s_r)^2, pulling the scores towards zero mean (TRL's "
        "center_rewards_coefficient; Eisenstein et al., arXiv 2312.09244); 0: off.")


# --------------------------------------------------------------------------------------------------------------------
# Unlearning family (docs/methods/ga.md, grad_diff.md, npo.md, simnpo.md, rmu.md): L = gamma * L_forget + alpha * L_retain
# --------------------------------------------------------------------------------------------------------------------


_MASK_KEYS = ("mask_sparsity", "mask_gamma", "mask_num_batches", "mask_before_clip", "mask_decay_masked")


class UnlearningParams(MethodParams):
    """Gradient ascent (GA): minus the token-mean NLL of the forget set.

    Every unlearning method also takes a weight mask (docs/methods/wagle.md): ``mask: wagle`` lets only the weights
    selected by WAGLE's attribution score move."""

    gamma: float = Field(1.0, ge=0.0, description="Weight of the forget loss (NPO reference code: npo_coeff).")
    mask: Literal["none", "wagle"] = Field(
        "none", description="wagle: update only the weights chosen by the WAGLE score (arXiv 2410.17509), computed "
        "once before training from forget and retain gradients; needs data.retain.")
    mask_sparsity: float | None = Field(
        None, ge=0.0, lt=1.0, description="wagle: fraction of the weights frozen (the rest, floor((1 - s) N), move).")
    mask_gamma: float = Field(1e-6, gt=0.0, description="wagle: Hessian estimate gamma in |(theta - g_r/gamma) g_f|.")
    mask_num_batches: int | None = Field(
        None, ge=1, le=2**31 - 1, description="wagle: forget (and as many retain) batches scored; null: the whole "
        "forget set.")
    mask_before_clip: bool = Field(
        False, description="wagle: mask the gradients before the global norm clip (false: after it, as the authors' "
        "loop does).")
    mask_decay_masked: bool = Field(
        False, description="wagle: let weight decay still shrink frozen weights (the authors' code); false: frozen "
        "weights stay bit-identical.")

    @property
    def retain_kl_every_position(self) -> bool:
        """The retain KL term scores every position, prompt and padding included (NPO+KL's ``retain_kl_mask: none``)."""
        return False

    @model_validator(mode="after")
    def _check_mask(self):
        from posttrain.errors import UserError

        if self.mask == "none":
            for key in _MASK_KEYS:
                if key in self.model_fields_set:
                    raise UserError(f"method.{key}: only used with method.mask: wagle")
        elif self.mask_sparsity is None:
            raise UserError("method.mask_sparsity: required with mask: wagle (fraction of weights frozen, in [0, 1))")
        return self


class GradDiffParams(UnlearningParams):
    """GradDiff: GA on the forget set plus the token-mean NLL of the retain set."""

    alpha: float = Field(1.0, ge=0.0, description="Weight of the retain loss (NPO reference: grad_diff_coeff).")


class NPOParams(UnlearningParams):
    """NPO: (2/beta) softplus(beta * (s_theta - s_ref)) per forget sequence, against a frozen reference."""

    beta: float = Field(0.1, gt=0.0, description="NPO inverse temperature; beta -> 0 recovers GA.")


class NPORTParams(NPOParams):
    """NPO + retain NLL (open-unlearning's NPO trainer)."""

    alpha: float = Field(1.0, ge=0.0, description="Weight of the retain NLL.")


class NPOKLParams(NPOParams):
    """NPO + KL(pi_ref || pi_theta) on the retain set."""

    alpha: float = Field(1.0, ge=0.0, description="Weight of the retain KL (NPO reference: KL_coeff).")
    retain_kl_mask: Literal["completion", "none"] = Field(
        "completion",
        description="completion: KL on answer tokens only; none: every position incl. prompt and padding "
        "(the reference code and open-unlearning).",
    )

    @property
    def retain_kl_every_position(self) -> bool:
        return self.retain_kl_mask == "none"


class SimNPOParams(UnlearningParams):
    """SimNPO: reference-free, length-normalised NPO, plus the retain NLL (open-unlearning's SimNPO defaults)."""

    gamma: float = Field(0.125, ge=0.0, description="Weight of the forget loss.")
    alpha: float = Field(1.0, ge=0.0, description="Weight of the retain NLL.")
    beta: float = Field(4.5, gt=0.0, description="Inverse temperature beta of the length-normalised forget loss.")
    delta: float = Field(0.0, description="Length-normalised margin (the SimNPO paper's gamma = beta * delta).")


class RMUParams(UnlearningParams):
    """RMU: steer one layer's hidden states on forget answers to a fixed random vector, keep them on retain answers."""

    gamma: float = Field(1.0, ge=0.0, description="Weight of the forget (steering) loss.")
    alpha: float = Field(1.0, ge=0.0, description="Weight of the retain loss (activations kept equal to the frozen "
                         "model's; open-unlearning's 1, WMDP's code 1200 on Zephyr-7B).")
    rmu_layer: int = Field(7, ge=0, le=2**31 - 1, description="0-based decoder layer whose output is steered and "
                           "kept (WMDP and open-unlearning: 7).")
    steering_coeff: float = Field(2.0, gt=0.0, description="Norm c of the control vector c*u (open-unlearning: 2; "
                                  "WMDP: 6.5 on Zephyr-7B); set it above the layer's activation norm.")
    trainable_params: list[str] | None = Field(
        None, description="Regexes (full match on parameter names) of the weights that move; null: the paper's, the "
        "MLP down-projections of layers rmu_layer-2 .. rmu_layer; ['.*']: every weight (open-unlearning's config).")

    @model_validator(mode="after")
    def _check_rmu(self):
        import re

        from posttrain.errors import UserError

        if self.mask != "none":
            raise UserError("method.mask: RMU picks the weights that move with method.trainable_params; remove mask")
        for i, pattern in enumerate(self.trainable_params or []):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise UserError(f"method.trainable_params[{i}]: not a regular expression ({exc})") from None
        if self.trainable_params == []:
            raise UserError("method.trainable_params: empty, nothing would train; null selects the paper's weights")
        return self

    def trainable_patterns(self) -> list[str]:
        """The regexes of the weights that move (the paper's default: down_proj of the three layers up to rmu_layer)."""
        if self.trainable_params is not None:
            return list(self.trainable_params)
        layers = "|".join(str(i) for i in range(max(self.rmu_layer - 2, 0), self.rmu_layer + 1))
        return [rf"(.*\.)?layers\.({layers})\.mlp\.down_proj\.weight"]


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


register(
    MethodInfo(
        name="sft",
        doc="docs/methods/sft.md",
        family="sft",
        summary="Supervised fine-tuning: token-mean negative log-likelihood on completions.",
        paper="Ouyang et al., Training language models to follow instructions with human feedback (arXiv 2203.02155)",
        recipe="recipes/sft.yaml",
        params=SFTParams,
    )
)
register(
    MethodInfo(
        name="dft",
        doc="docs/methods/dft.md",
        family="sft",
        summary="Dynamic Fine-Tuning: each token's NLL weighted by its detached probability.",
        paper="Wu et al., On the Generalization of SFT: A Reinforcement Learning Perspective with Reward "
        "Rectification (arXiv 2508.05629)",
        recipe="recipes/dft.yaml",
        params=DFTParams,
    )
)
register(
    MethodInfo(
        name="asft_anchored",
        doc="docs/methods/asft_anchored.md",
        family="sft",
        summary="Anchored SFT: DFT plus a token-level KL anchor to the frozen initial model.",
        paper="Zhu et al., Anchored Supervised Fine-Tuning (arXiv 2509.23753)",
        recipe="recipes/asft_anchored.yaml",
        params=ASFTAnchoredParams,
        reference="required",
    )
)
register(
    MethodInfo(
        name="poft",
        doc="docs/methods/poft.md",
        family="sft",
        summary="Preference-oriented SFT: the target should out-score aligned LLMs on the SFT data (Bradley-Terry).",
        paper="Fan et al., Preference-Oriented Supervised Fine-Tuning: Favoring Target Model Over Aligned Large "
        "Language Models (arXiv 2412.12865)",
        recipe="recipes/poft.yaml",
        params=PoFTParams,
    )
)


# the preference family: one file per method (params, objective, registration), each registered on import
import posttrain.families.preference.methods  # noqa: E402, F401
from posttrain.families.preference.methods.asft_aligned import ASFTAlignedParams  # noqa: E402, F401
from posttrain.families.preference.methods.dpo import DPOParams  # noqa: E402, F401
from posttrain.families.preference.methods.orpo import ORPOParams  # noqa: E402, F401
from posttrain.families.preference.methods.simpo import SimPOParams  # noqa: E402, F401
from posttrain.families.preference.methods.sparsepo import SparsePOParams  # noqa: E402, F401
from posttrain.families.preference.methods.wpo import WPOParams  # noqa: E402, F401


register(
    MethodInfo(
        name="kto",
        doc="docs/methods/kto.md",
        family="unpaired",
        summary="KTO: completions labelled desirable or undesirable (no pairs needed), a prospect-theoretic value "
        "against a KL reference point.",
        paper="Ethayarajh et al., KTO: Model Alignment as Prospect Theoretic Optimization (arXiv 2402.01306)",
        recipe="recipes/kto.yaml",
        params=KTOParams,
        reference="required",
    )
)


register(
    MethodInfo(
        name="reward",
        doc="docs/methods/reward.md",
        family="reward",
        summary="Reward model: a sequence-classification head trained on preference pairs (Bradley-Terry), scored "
        "by pairwise accuracy; usable as method.rewards[].model of GRPO and online DPO.",
        paper="Ouyang et al., Training language models to follow instructions with human feedback (arXiv 2203.02155); "
        "Stiennon et al., Learning to summarize from human feedback (arXiv 2009.01325)",
        recipe="recipes/reward.yaml",
        params=RewardParams,
    )
)


_NPO_PAPER = (
    "Zhang et al., Negative Preference Optimization: From Catastrophic Collapse to Effective Unlearning "
    "(arXiv 2404.05868)"
)
register(
    MethodInfo(
        name="ga",
        doc="docs/methods/ga.md",
        family="unlearning",
        summary="Gradient ascent on the forget set (the unlearning baseline; collapses the model).",
        paper=_NPO_PAPER + "; TOFU: Maini et al. (arXiv 2401.06121)",
        recipe="recipes/unlearn_ga.yaml",
        params=UnlearningParams,
    )
)
register(
    MethodInfo(
        name="grad_diff",
        doc="docs/methods/grad_diff.md",
        family="unlearning",
        summary="GradDiff: gradient ascent on the forget set plus NLL on the retain set.",
        paper="Liu et al., Continual Learning and Private Unlearning (arXiv 2203.12817); " + _NPO_PAPER,
        recipe="recipes/unlearn_grad_diff.yaml",
        params=GradDiffParams,
    )
)
register(
    MethodInfo(
        name="npo",
        doc="docs/methods/npo.md",
        family="unlearning",
        summary="Negative Preference Optimisation: bounded, adaptively weighted forgetting against a reference.",
        paper=_NPO_PAPER,
        recipe="recipes/unlearn_npo.yaml",
        params=NPOParams,
        reference="required",
    )
)
register(
    MethodInfo(
        name="npo_rt",
        doc="docs/methods/npo.md",
        family="unlearning",
        summary="NPO plus the retain-set NLL (NPO+RT).",
        paper=_NPO_PAPER,
        recipe="recipes/unlearn_npo_rt.yaml",
        params=NPORTParams,
        reference="required",
    )
)
register(
    MethodInfo(
        name="npo_kl",
        doc="docs/methods/npo.md",
        family="unlearning",
        summary="NPO plus KL(reference || policy) on the retain set (NPO+KL).",
        paper=_NPO_PAPER,
        recipe="recipes/unlearn_npo_kl.yaml",
        params=NPOKLParams,
        reference="required",
    )
)
register(
    MethodInfo(
        name="simnpo",
        doc="docs/methods/simnpo.md",
        family="unlearning",
        summary="SimNPO: reference-free, length-normalised NPO plus the retain NLL.",
        paper="Fan et al., Simplicity Prevails: Rethinking Negative Preference Optimization for LLM Unlearning "
        "(arXiv 2410.07163)",
        recipe="recipes/unlearn_simnpo.yaml",
        params=SimNPOParams,
    )
)


register(
    MethodInfo(
        name="rmu",
        doc="docs/methods/rmu.md",
        family="unlearning",
        summary="RMU: forget activations steered to a random vector at one layer, retain activations kept; few "
        "weights move.",
        paper="Li et al., The WMDP Benchmark: Measuring and Reducing Malicious Use With Unlearning (arXiv 2403.03218)",
        recipe="recipes/unlearn_rmu.yaml",
        params=RMUParams,
        reference="required",
    )
)


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
