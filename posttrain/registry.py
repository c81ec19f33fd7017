"""A small name -> entry registry: every selectable part of a method (advantage estimator, loss aggregation, clipping
rule, preference loss, unlearning objective, adapter variant) registers one entry next to its function.

Each registry holds one kind of entry, a frozen dataclass below: the fields every kind shares (``name``, the recipe
value; ``fn``, the function or class; ``doc``, its docs/methods page) plus that kind's typed fields, which the
trainers read instead of comparing names. ``REGISTRY.register(name, doc=..., field=value)`` builds the registry's
entry type, so a misspelt or unknown field is a ``TypeError`` at import, never silently kept.

The recipe schema's allowed values come from :meth:`Registry.names`. This module imports nothing heavy: an entry's
fields (everything but ``fn``'s body) can be read without torch. Adding a part is one function, one
``@REGISTRY.register(...)`` and its unit test, in one file (docs/contributing.md).
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterator, Literal, Mapping, TypeVar

from pydantic import BaseModel, ConfigDict


def load(spec: str | Callable[..., Any]) -> Any:
    """The object a ``"module:attribute"`` string names (imported now); a callable is returned as it is."""
    if not isinstance(spec, str):
        return spec
    module, _, attribute = spec.partition(":")
    return getattr(importlib.import_module(module), attribute)


class Lazy:
    """A function named ``"module:qualname"``, imported on its first call or attribute read: an entry whose function
    imports torch holds it this way, so that its registry (and the recipe schema built from it) imports without
    torch. Its ``__doc__`` and ``__qualname__`` are the function's."""

    def __init__(self, path: str):
        self.path = path

    @functools.cached_property
    def target(self) -> Callable[..., Any]:
        return load(self.path)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.target(*args, **kwargs)

    def __getattr__(self, key: str) -> Any:  # __qualname__, __name__, ...
        if key == "target":
            raise AttributeError(key)
        return getattr(self.target, key)

    @property  # type: ignore[override]
    def __doc__(self) -> str | None:  # noqa: D105
        return self.target.__doc__

    def __repr__(self) -> str:
        return f"Lazy({self.path!r})"


@dataclass(frozen=True)
class Entry:
    """One registered part: ``name`` (the recipe value), ``fn`` (the function or class) and ``doc`` (docs/methods
    page, e.g. ``docs/methods/grpo_advantages.md#group-advantage``). A registry whose parts need nothing else uses
    this type."""

    name: str
    fn: Any
    doc: str


# ----------------------------------------------------------------------------------------------------------------------
# GRPO parts (method.advantage / method.aggregation / method.clipping): what GRPOParams' checks read from the selected
# part. ``keys``: method keys only this part reads (refused when another part of the kind is selected); ``defaults``:
# method defaults it changes; ``refuses``: key -> why this part refuses it at a non-default value; ``check``: its
# cross-key check, ``check(params) -> message | None``; ``recipe``: (shipped recipe, --set overrides) that runs it,
# where no shipped recipe selects it.
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GRPOPartEntry(Entry):
    """``options_model``: the pydantic model of the method keys this part owns (GRPOParams is assembled from them);
    ``keys`` are its fields."""

    options_model: Any = None
    defaults: Mapping[str, Any] = field(default_factory=dict)
    refuses: Mapping[str, str] = field(default_factory=dict)
    check: Callable[[Any], str | None] | None = None
    recipe: tuple[str, list[str]] | None = None

    @property
    def keys(self) -> tuple[str, ...]:
        return () if self.options_model is None else tuple(self.options_model.model_fields)


@dataclass(frozen=True)
class AdvantageEntry(GRPOPartEntry):
    """``method.advantage``: ``fn(rewards, groups, opts) -> AdvantageOutput`` (``groups``: the rows' grouping and what
    the trainer measured per row, ``posttrain.families.rl.common.Groups``; ``opts``: the method params).
    ``needs_strata``: stratum keys are computed per rollout (``groups.strata``); ``needs_lengths``: the completion
    token counts are given (``groups.lengths``); ``normalize_then_sum``: TRL's
    ``multi_objective_aggregation="normalize_then_sum"`` may replace it; ``single_stream``: one completion per prompt;
    ``trainer``: ``"module:Class"``, the GRPO trainer subclass it needs (SPO's tracker and sampler)."""

    needs_strata: bool = False
    needs_lengths: bool = False
    normalize_then_sum: bool = False
    single_stream: bool = False
    trainer: str | None = None


@dataclass(frozen=True)
class AggregationEntry(GRPOPartEntry):
    """``method.aggregation``: ``fn(per_token_loss, mask, normalizer)``, where ``normalizer`` is the micro-batch's
    ``posttrain.families.rl.common.Normalizer`` (the accumulated batch's tokens, its kept rows, ``T_max``, the row
    weights; each aggregation reads what it divides by); ``per_micro_batch``: a mean over the micro-batch alone,
    divided by the accumulation steps afterwards (bnpo); ``row_weights``: per-row weights computed on the generation
    batch (the KL term is then aggregated unweighted with dr_grpo); ``trl_loss_type``: the GRPOConfig loss_type."""

    per_micro_batch: bool = False
    row_weights: bool = False
    trl_loss_type: str = "grpo"


@dataclass(frozen=True)
class ClippingEntry(GRPOPartEntry):
    """``method.clipping``: ``fn(logps, old_logps, advantages, mask, opts) -> ClipOutput`` (``opts``: the method
    params, of which the rule reads its own keys); ``gradient_preserved``: clipped tokens keep a (scaled) gradient."""

    gradient_preserved: bool = False


@dataclass(frozen=True)
class PolicyLossEntry(GRPOPartEntry):
    """``method.loss``: the GRPO-family objective, a pure ``fn(fwd, opts) -> (loss, metrics)`` over the training
    forward (``posttrain.families.rl.forward.RLForward``). ``needs(opts)``: what the trainer fills in ``fwd`` besides
    the log-probs (``posttrain.families.rl.forward.RL_NEEDS``). ``uses_parts``: it is built from the selected
    advantage, aggregation and clipping parts (the clipped surrogate); otherwise ``replaces`` says why the parts' keys
    are refused. ``check_labels(rewards)``: raises on rewards the loss cannot take as row labels (``rows`` need)."""

    uses_parts: bool = True
    replaces: str = ""
    needs: Callable[[Any], frozenset[str]] = lambda opts: frozenset()
    check_labels: Callable[[Any], None] | None = None


# ----------------------------------------------------------------------------------------------------------------------
# Family objectives (method.name)
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SFTLossEntry(Entry):
    """An SFT-family ``method.name``: a pure ``fn(params, fwd) -> (loss, metrics)``; ``needs(params)``: what the
    trainer computes into ``fwd`` besides the policy's log-probs (``posttrain.families.sft.forward.SFT_NEEDS``);
    ``token_sum_loss``: the loss is a token sum over ``num_items_in_batch`` (else a mean over the micro-batch's rows)."""

    needs: Callable[[Any], frozenset[str]] = lambda params: frozenset()
    token_sum_loss: bool = True


@dataclass(frozen=True)
class PreferenceLossEntry(Entry):
    """A preference-family ``method.name``: a pure ``fn(params, fwd) -> (loss, metrics)``; ``needs(params)``: what the
    trainer computes into ``fwd`` besides the policy's log-probs (``posttrain.families.preference.forward.PREFERENCE_NEEDS``)."""

    needs: Callable[[Any], frozenset[str]] = lambda params: frozenset()


@dataclass(frozen=True)
class UnlearningTermEntry(Entry):
    """One term of an unlearning objective ``gamma * L_forget + alpha * L_retain``. A forget term's ``fn(logps, mask,
    ref_logps, num_items, *, beta, delta) -> (loss, metrics)``; a retain term's ``fn(num_items, *, logps, mask, logits,
    ref_logits, kl_mask, token_kl) -> (loss, metrics)``. ``needs``: what it reads from the forward pass (the names of
    ``posttrain.families.unlearning.objective.UNLEARNING_NEEDS``; a reference model is used when one of them is a
    reference need)."""

    needs: frozenset[str] = frozenset()


@dataclass(frozen=True)
class UnlearningObjectiveEntry(Entry):
    """An unlearning objective: ``forget`` / ``retain`` name its two terms (``FORGET_TERMS`` / ``RETAIN_TERMS`` of
    posttrain.families.unlearning.objective; ``retain`` None: no retain term); the weights ``gamma`` / ``alpha`` and
    ``beta`` / ``delta`` are its defaults; ``fn(params, fwd) -> UnlearningOutput`` is pure (``fwd``: an
    ``UnlearningForward`` of the same module); ``needs(params)``: what the trainer computes into ``fwd`` (the names of
    ``UNLEARNING_NEEDS``), from which its use of the retain set and of a reference model follow; ``recipe_method``:
    selectable as ``method.name``; ``steers_activations``: its forget term works on one layer's hidden states (RMU)
    instead of log-probs."""

    forget: str = "ga"
    retain: str | None = None
    gamma: float = 1.0
    alpha: float = 0.0
    beta: float | None = None
    delta: float = 0.0
    needs: Callable[[Any], frozenset[str]] = lambda params: frozenset()
    recipe_method: bool = True
    steers_activations: bool = False


# ----------------------------------------------------------------------------------------------------------------------
# Other registries
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterVariantEntry(Entry):
    """``peft.type``: ``fn`` is the variant's options model (the ``peft.<type>`` sub-block; plain LoRA has none) and
    ``variant`` its ``posttrain.adapters.spec.AdapterVariant`` (everything a run asks of the adapter type)."""

    variant: Any = None


# The values of ``training.logprob_head`` (every family's config field): ``auto`` and the names registered in
# ``posttrain.logprobs.heads.LOGPROB_HEADS`` (tests/logprobs checks the two agree). Here, not beside the heads, so
# that a family's config and recipe checking read it without importing torch.
LogprobHead = Literal["auto", "chunked", "fused", "liger"]


def logprob_head_field() -> Any:
    """The ``logprob_head`` field of a family's training config (a dataclass ``field``, default ``auto``)."""
    return field(default="auto", metadata={
        "help": "The LM head that turns completion rows into log-probs: auto (chunked on CPU, TRL's fused Triton kernel "
                "on CUDA), chunked, fused or liger (CUDA, pip install liger-kernel)."})


@dataclass(frozen=True)
class LogprobHeadEntry(Entry):
    """``training.logprob_head``: ``unavailable(device, transform, with_entropy)`` gives the reason the head cannot
    run there (None when it can)."""

    unavailable: Callable[..., str | None] = lambda *args: None


@dataclass(frozen=True)
class MIAAttackEntry(Entry):
    """A membership-inference attack; ``needs_reference``: it reads a reference model's statistics of the same row."""

    needs_reference: bool = False


# ----------------------------------------------------------------------------------------------------------------------
# Methods (method.name): the params model every method's hyperparameters subclass, and the method entries
# ----------------------------------------------------------------------------------------------------------------------


class MethodParams(BaseModel):
    """Base class of a method's hyperparameters. Unknown keys are errors; no type coercion (``"yes"`` is not a
    boolean, ``true`` not a number); NaN and infinities are refused for every number."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    # What a trainer asks a method's params (instead of comparing method names); subclasses override.
    @property
    def needs_hidden_states(self) -> bool:
        """The policy's last hidden states are needed besides the log-probs (preference family)."""
        return False

    @property
    def fused_weighting(self) -> bool:
        """TRL's fused LM head also returns ``log(sum_v p_v^2)`` (DPOConfig ``use_weighting``; WPO's alignment)."""
        return False

    @property
    def learned_mask(self) -> bool:
        """A trainable SparsePO mask network is trained and saved next to the policy."""
        return False

    @property
    def scores_prompt_tokens(self) -> bool:
        """The policy forward also scores the prompt tokens (ORPO's SFT term on prompt + response; preference family)."""
        return False


Family = Literal["sft", "preference", "unpaired", "online", "reward", "unlearning", "rl"]
# the order `posttrain methods` lists the families in
FAMILIES: tuple[str, ...] = ("sft", "preference", "unpaired", "online", "reward", "unlearning", "rl")


@dataclass(frozen=True)
class MethodInfo:
    """A ``method.name``: its family (data format and trainer), params model, paper, recipe and reference use."""

    name: str
    family: Family
    summary: str
    paper: str
    recipe: str
    params: type[MethodParams]
    # Whether a frozen reference/anchor model is used: "none", "required" (defaults to a frozen copy of `model`), or
    # "optional": used only when the params' ``uses_reference`` is true (GRPO: beta > 0), then as for "required".
    # The trainer builds its posttrain.reference.Reference from this (and ref_model / peft); it never checks names.
    reference: Literal["none", "required", "optional"] = "none"
    # The method's page in the repository (`posttrain methods NAME` prints its summary).
    doc: str = ""

    @property
    def reference_free(self) -> bool:
        """The method never uses a reference model, whatever its params (SimPO, ORPO, ...)."""
        return self.reference == "none"


METHODS: dict[str, MethodInfo] = {}


def register(info: MethodInfo) -> MethodInfo:
    """Add a method to :data:`METHODS` (posttrain.methods and the family method files call it)."""
    if info.name in METHODS:
        raise ValueError(f"method {info.name!r} registered twice")
    METHODS[info.name] = info
    return info


E = TypeVar("E", bound=Entry)


class Registry(Generic[E]):
    """Ordered ``name -> entry`` of one entry type; ``kind`` names the recipe key it serves (for error messages)."""

    def __init__(self, kind: str, entry_type: type[E] = Entry):
        self.kind = kind
        self.entry_type = entry_type
        self._entries: dict[str, E] = {}
        self._on_change: list[Callable[[], None]] = []

    def on_change(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` after every later ``add`` / ``remove`` (a model assembled from the entries, such as
        GRPOParams, rebuilds itself; a part added from outside posttrain/ is then selectable)."""
        self._on_change.append(callback)

    def register(self, name: str, *, doc: str, **fields: Any) -> Callable[[Any], Any]:
        """Decorator: register ``fn`` under ``name`` with the entry type's ``fields`` (returns ``fn`` unchanged)."""

        def decorate(fn: Any) -> Any:
            self.add(name, fn, doc=doc, **fields)
            return fn

        return decorate

    def add(self, name: str, fn: Any, *, doc: str, **fields: Any) -> E:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} registered twice")
        entry = self.entry_type(name=name, fn=fn, doc=doc, **fields)
        self._entries[name] = entry
        for callback in self._on_change:
            callback()
        return entry

    def remove(self, name: str) -> None:
        """Drop an entry (tests that register a toy part clean up with this)."""
        if self._entries.pop(name, None) is not None:
            for callback in self._on_change:
                callback()

    def __getitem__(self, name: str) -> E:
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {self.names()}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[E]:
        return iter(list(self._entries.values()))

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)
