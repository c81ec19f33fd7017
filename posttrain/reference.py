"""One reference-model abstraction for every family (preference, unlearning, SFT anchor, GRPO's KL term).

Whether a method uses a reference is its :class:`~posttrain.methods.MethodInfo` ``reference`` (``"required"``,
``"optional"`` -- GRPO with ``beta > 0`` -- or ``"none"``); :func:`posttrain.train.load_models` then gives the trainer
a separate frozen model (``ref_model:`` or a frozen copy of the policy) or, with ``peft`` and no ``ref_model``, nothing:
the reference is then the adapter-disabled policy. :class:`Reference` hides that choice from the loss code, and
:func:`trl_reference_factory` is the one place where a TRL trainer's own reference construction is redirected.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator


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
