"""One reference-model abstraction for every family (preference, unlearning, SFT anchor, GRPO's KL term).

Whether a method uses a reference is its :class:`~posttrain.methods.MethodInfo` ``reference`` (``"required"``,
``"optional"`` -- GRPO with ``beta > 0`` -- or ``"none"``). :func:`plan_reference` turns that and the recipe's
``ref_model`` / ``peft`` / ``precompute_ref_log_probs`` into one :class:`ReferencePlan`, decided once when the recipe
is parsed (``recipe.reference``); :func:`posttrain.run.models.load_models` loads what the plan says and the
family builders read it. :class:`Reference` hides the choice from the loss code, and :func:`trl_reference_factory` is
the one place where a TRL trainer's own reference construction is redirected.
"""

from __future__ import annotations

import contextlib
import enum
from dataclasses import dataclass
from typing import Any, Iterator

from posttrain.errors import UserError


class ReferenceSource(enum.Enum):
    """Where a method's frozen reference comes from."""

    NONE = "none"  # the method uses no reference (or its reference term is off)
    FROZEN_COPY = "a frozen copy of the policy"  # loaded again from model.path
    DISABLED_ADAPTER = "the policy with its adapter disabled"  # peft and no ref_model
    OUTSIDE_MODEL = "ref_model"  # a model the recipe names
    EARLIER_STAGE = "the final model of an earlier stage"  # ref_model: stage:NAME of a multi-stage recipe


@dataclass(frozen=True)
class ReferencePlan:
    """The reference of a run: its ``source`` and whether its log-probs are ``precomputed`` once before training
    (``method.precompute_ref_log_probs``: the source then serves only that pass)."""

    source: ReferenceSource
    precomputed: bool = False

    @property
    def used(self) -> bool:
        return self.source is not ReferenceSource.NONE

    @property
    def loads_model(self) -> bool:
        """A separate frozen network is loaded (``ref_model``, an earlier stage's model, or a copy of the policy)."""
        return self.source in (ReferenceSource.FROZEN_COPY, ReferenceSource.OUTSIDE_MODEL,
                               ReferenceSource.EARLIER_STAGE)

    @property
    def uses_disabled_adapter(self) -> bool:
        """The trainer's live reference is the adapter-disabled policy (the adapter variants check they allow it)."""
        return self.source is ReferenceSource.DISABLED_ADAPTER and not self.precomputed


def plan_reference(recipe, info, earlier_stages: tuple[str, ...] = ()) -> ReferencePlan:
    """The :class:`ReferencePlan` of a parsed recipe and its method entry, after checking the ``ref_model`` key
    against the method (one :class:`UserError` naming it). ``earlier_stages``: the output folders of the stages
    before this one (a ``ref_model`` among them is an earlier stage's model)."""
    needed = info.reference == "required"
    if info.reference == "optional":  # used only when the params say so (GRPO: method.beta > 0)
        needed = bool(recipe.params.uses_reference)
        if recipe.ref_model not in (None, "none") and not needed:
            raise UserError(
                f"ref_model: method '{info.name}' uses a reference model only for its KL term, which is off "
                "(method.beta: 0); set method.beta > 0 or remove ref_model"
            )
        if recipe.ref_model == "none" and needed:
            raise UserError(
                f"ref_model: none, but method '{info.name}' needs a reference for its KL term (method.beta > 0); "
                "remove it to use a frozen copy of model, give a path, or set method.beta: 0"
            )
    if recipe.ref_model == "none" and needed:
        raise UserError(
            f"ref_model: method '{info.name}' needs a reference model, but the recipe says ref_model: none "
            "(remove it to use a frozen copy of model, or give a path)"
        )
    if recipe.ref_model not in (None, "none") and info.reference == "none":
        raise UserError(f"ref_model: method '{info.name}' uses no reference model; remove ref_model")
    if not needed:
        return ReferencePlan(ReferenceSource.NONE)
    if recipe.ref_model is not None:
        source = (ReferenceSource.EARLIER_STAGE if recipe.ref_model.path in earlier_stages
                  else ReferenceSource.OUTSIDE_MODEL)
    else:
        source = ReferenceSource.FROZEN_COPY if recipe.peft is None else ReferenceSource.DISABLED_ADAPTER
    return ReferencePlan(source, precomputed=bool(getattr(recipe.params, "precompute_ref_log_probs", False)))


def peft_model_of(model) -> Any:
    """The ``PeftModel`` inside ``model`` (through DDP/accelerate ``.module`` wrappers), else None."""
    from peft import PeftModel

    while hasattr(model, "module") and not isinstance(model, PeftModel):
        model = model.module
    return model if isinstance(model, PeftModel) else None


class Reference:
    """The frozen reference a loss compares with: ``model`` (a separate frozen network) when given, else the
    adapter-disabled policy (TRL's ``"ref"`` adapter when the policy has one).

    ``kind``: ``"model"`` or ``"base"`` (adapter-disabled policy). Use :meth:`network` around the reference forward.
    ``missing``: the error raised when the reference is the base but the policy has no adapter.
    """

    def __init__(self, model=None, *, missing: Exception | None = None):
        self.model = model
        self.missing = missing

    @property
    def kind(self) -> str:
        return "model" if self.model is not None else "base"

    def resolve(self, policy) -> tuple[Any, contextlib.AbstractContextManager]:
        """``(network, context)``: calling ``network`` inside ``context`` is the reference forward (the frozen model
        and a null context, or ``policy`` and the context that disables its adapter)."""
        if self.model is not None:
            return self.model, contextlib.nullcontext()
        peft_model = peft_model_of(policy)
        if peft_model is None:
            raise self.missing or RuntimeError("no reference model: pass ref_model or use PEFT")
        from trl.trainer.utils import use_adapter

        return policy, use_adapter(peft_model, adapter_name="ref" if "ref" in peft_model.peft_config else None)

    @contextlib.contextmanager
    def network(self, policy) -> Iterator[Any]:
        """Yields the network to call as the reference: the frozen model, or ``policy`` with its adapter disabled."""
        net, context = self.resolve(policy)
        with context:
            yield net


@contextlib.contextmanager
def trl_reference_factory(trl_module, reference) -> Iterator[list[bool]]:
    """While a TRL trainer's ``__init__`` runs, make ``trl_module.create_model_from_path`` (which TRL uses only to
    load a reference model from the policy's path) return ``reference`` instead: posttrain's own frozen model, or None
    for a reference-free method (so no second copy of the policy is loaded). Yields the list of calls made."""
    original = trl_module.create_model_from_path
    calls: list[bool] = []

    def give_reference(*_args, **_kwargs):
        calls.append(True)
        return reference

    trl_module.create_model_from_path = give_reference
    try:
        yield calls
    finally:
        trl_module.create_model_from_path = original
