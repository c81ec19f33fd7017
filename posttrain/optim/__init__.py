"""Optimizers a recipe selects with ``training.optim`` beyond Hugging Face's own.

``training.optim: stable_spam`` with its hyperparameters in ``training.optim_args`` (a mapping, checked here before
any model loads); the trainers build it through HF's ``optimizer_cls_and_kwargs`` (posttrain.trainers.common).
docs/methods/stable_spam.md.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from posttrain.errors import UserError


class StableSPAMArgs(BaseModel):
    """``training.optim_args`` of ``optim: stable_spam``. lr, betas, eps and weight decay are the HF keys
    (``learning_rate``, ``adam_beta1``/``adam_beta2``, ``adam_epsilon``, ``weight_decay``) so that the LR schedule
    and the no-decay groups (biases, norms) work as for AdamW."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    gamma1: float = Field(0.7, description="AdaGN norm-EMA decay (-1: use adam_beta1).")
    gamma2: float = Field(0.9, ge=0.0, lt=1.0, description="AdaGN squared-norm EMA decay.")
    theta: float = Field(0.999, ge=0.0, lt=1.0, description="AdaClip max-EMA decay (the reference's gamma3).")
    update_proj_gap: int = Field(1000, ge=0, le=2**31 - 1, description="MoRet period in steps; 0: no reset.")
    total_T: int | Literal["auto"] | None = Field(
        None, description="Cosine decay of beta1 and gamma1 to eta_min over total_T steps; auto: the run's steps.")
    eta_min: float = Field(0.5, ge=0.0, le=1.0)
    reference_quirks: bool = Field(False, description="Reproduce the official code's behaviour exactly.")


# training.optim value -> the model that checks its optim_args
OPTIMIZERS: dict[str, type[BaseModel]] = {"stable_spam": StableSPAMArgs}
_HF_KEYS = {"lr": "learning_rate", "betas": "adam_beta1 / adam_beta2", "eps": "adam_epsilon",
            "weight_decay": "weight_decay"}


def check_optim_args(name: str, args: Any) -> dict[str, Any]:
    """``training.optim_args`` of a posttrain optimizer, checked; returns the mapping with defaults filled in."""
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise UserError(f"training.optim_args: optim: {name} takes a mapping of its hyperparameters, got {args!r}")
    for key in args:
        if key in _HF_KEYS:
            raise UserError(f"training.optim_args.{key}: set it as training.{_HF_KEYS[key]} (the LR schedule and "
                            "the no-decay parameter groups use it)")
    model = OPTIMIZERS[name]
    try:
        parsed = model.model_validate(args)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err["loc"] if not str(x).startswith(("int", "literal", "none")))
        raise UserError(f"training.optim_args.{where}: {err['msg']}") from None
    if name == "stable_spam" and not (parsed.gamma1 == -1 or 0.0 <= parsed.gamma1 < 1.0):
        raise UserError(f"training.optim_args.gamma1: must lie in [0, 1) or be -1, got {parsed.gamma1}")
    if name == "stable_spam" and isinstance(parsed.total_T, int) and not 1 <= parsed.total_T <= 2**31 - 1:
        raise UserError(f"training.optim_args.total_T: must be in [1, 2^31), auto or null, got {parsed.total_T}")
    return parsed.model_dump()


def refuse_sharded(where: str) -> UserError:
    return UserError(f"{where}: optim: stable_spam needs each parameter's full gradient (per-tensor max and norm); "
                     "DeepSpeed ZeRO and FSDP hand the optimizer flattened shards: use DDP or a single process, or "
                     "another optimizer")


def stable_spam_kwargs(args, spec: dict[str, Any], num_training_steps: int | None) -> dict[str, Any]:
    """Keyword arguments of :class:`~posttrain.optim.stable_spam.StableSPAM` from a run's HF ``args`` and checked
    ``spec`` (``total_T: auto`` becomes the run's number of optimizer steps)."""
    import logging

    total_T = spec["total_T"]
    if total_T == "auto":
        total_T = num_training_steps if num_training_steps and num_training_steps > 0 else None
    gap = spec["update_proj_gap"]
    if gap > 0 and num_training_steps and gap > num_training_steps:
        logging.getLogger("posttrain").warning(
            "training.optim_args.update_proj_gap=%d is more than the run's %d optimizer steps: the momentum reset "
            "(MoRet) never fires", gap, num_training_steps)
    return dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                weight_decay=args.weight_decay, gamma1=spec["gamma1"], gamma2=spec["gamma2"], theta=spec["theta"],
                update_proj_gap=gap, total_T=total_T, eta_min=spec["eta_min"],
                reference_quirks=spec["reference_quirks"])
