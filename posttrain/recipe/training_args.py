"""Validation of a recipe's ``training:`` block against the method family's TRL / HF config class, at load time.

Every key must be a field of the family's config class (``trl.SFTConfig``, ``trl.DPOConfig``, ``trl.GRPOConfig`` or
:class:`posttrain.families.unlearning.trainer.UnlearningConfig`); its value must have the field's type (from the dataclass
annotations: ``true`` is not a number, ``"yes"`` is not a boolean, ``1e3`` is accepted for an integer only when it is
one), every number must be finite, integers fit in 32 bits, and the fields in :data:`BOUNDS` must lie in their
domain (batch sizes >= 1, ``max_steps`` -1 or >= 1, ``learning_rate`` >= 0, ...). The first violation is one
:class:`~posttrain.errors.UserError` naming ``training.<key>``. Cross-field checks that depend on the recipe or the
machine (evaluation without eval data, fp16/bf16 without a GPU) are in :func:`check_training_context`.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.errors import UserError, did_you_mean
from posttrain.families.base import FAMILIES
from posttrain.registry import load

INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class Bound:
    """A number's domain: ``lo``/``hi`` (inclusive unless ``*_open``), ``integral_from``: values at or above it must
    be whole numbers (HF step counts that also take a ratio below 1), ``also``: extra allowed values (``-1``)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    integral_from: float | None = None
    also: tuple[float, ...] = ()

    def describe(self) -> str:
        parts = []
        if self.lo is not None:
            parts.append(f"{'>' if self.lo_open else '>='} {_fmt(self.lo)}")
        if self.hi is not None:
            parts.append(f"{'<' if self.hi_open else '<='} {_fmt(self.hi)}")
        text = " and ".join(parts) or "finite"
        if self.integral_from is not None:
            text += f" (a whole number when >= {_fmt(self.integral_from)}; below 1 it is a fraction of the run)"
        if self.also:
            text = " or ".join([*map(_fmt, self.also), text])
        return text

    def contains(self, value: float) -> bool:
        if value in self.also:
            return True
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        if self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi):
            return False
        return self.integral_from is None or value < self.integral_from or float(value).is_integer()


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


POSITIVE = Bound(lo=1)
NON_NEGATIVE = Bound(lo=0)
STEPS = Bound(lo=0, hi=INT32_MAX, lo_open=True, integral_from=1)  # HF logging/save/eval steps: int or ratio < 1
UNIT_OPEN = Bound(lo=0, hi=1, hi_open=True)

# Domains of known fields (posttrain's own table; everything else only gets the type, finiteness and 32-bit checks).
BOUNDS: dict[str, Bound] = {
    # schedule and batch
    "max_steps": Bound(lo=1, also=(-1,)),  # -1: use num_train_epochs (HF); 0 would still train one step
    "num_train_epochs": Bound(lo=0, hi=INT32_MAX, lo_open=True),
    "per_device_train_batch_size": POSITIVE,
    "per_device_eval_batch_size": POSITIVE,
    "gradient_accumulation_steps": POSITIVE,
    "eval_accumulation_steps": POSITIVE,
    "learning_rate": NON_NEGATIVE,
    "weight_decay": NON_NEGATIVE,
    "max_grad_norm": NON_NEGATIVE,  # 0: no clipping
    "adam_beta1": UNIT_OPEN,
    "adam_beta2": UNIT_OPEN,
    "adam_epsilon": Bound(lo=0, lo_open=True),
    "warmup_steps": Bound(lo=0, hi=INT32_MAX, integral_from=1),
    "warmup_ratio": Bound(lo=0, hi=1),
    "label_smoothing_factor": UNIT_OPEN,
    "neftune_noise_alpha": NON_NEGATIVE,
    # logging, saving, evaluation
    "logging_steps": STEPS,
    "save_steps": STEPS,
    "eval_steps": STEPS,
    "eval_delay": NON_NEGATIVE,
    "save_total_limit": POSITIVE,
    "data_seed": Bound(lo=0, hi=2**32 - 1),
    "dataloader_num_workers": NON_NEGATIVE,
    "dataloader_prefetch_factor": POSITIVE,
    "dataset_num_proc": POSITIVE,
    "torch_empty_cache_steps": POSITIVE,
    "ddp_timeout": POSITIVE,
    "local_rank": Bound(lo=-1),
    "router_aux_loss_coef": NON_NEGATIVE,
    # sequence lengths
    "max_length": POSITIVE,
    "max_prompt_length": POSITIVE,
    "max_completion_length": POSITIVE,
    "precompute_ref_batch_size": POSITIVE,
    "ref_model_sync_steps": POSITIVE,
    "ref_model_mixup_alpha": Bound(lo=0, hi=1),
    # generation (GRPO)
    "num_generations": Bound(lo=1),  # >= 2 for group statistics; 1 only with advantage: spo (checked in rl_config)
    "num_generations_eval": Bound(lo=2),
    "generation_batch_size": POSITIVE,
    "steps_per_generation": POSITIVE,
    "num_iterations": POSITIVE,
    "temperature": Bound(lo=0, lo_open=True),
    "top_p": Bound(lo=0, hi=1, lo_open=True),
    "top_k": NON_NEGATIVE,
    "min_p": Bound(lo=0, hi=1),
    "repetition_penalty": Bound(lo=0, lo_open=True),
    "max_tool_calling_iterations": POSITIVE,
    "num_completions_to_print": POSITIVE,
    "vllm_gpu_memory_utilization": Bound(lo=0, hi=1, lo_open=True),
    "vllm_tensor_parallel_size": POSITIVE,
    "vllm_max_model_length": POSITIVE,
}


@functools.cache
def config_class(family: str) -> type:
    """The family's config class (``Family.config_class``; imported now: TRL is heavy)."""
    return load(FAMILIES[family].config_class)


# Every family's config field names, read from the installed TRL / transformers by `python -m posttrain.training_args`:
# an unknown `training:` key is refused without importing TRL (seconds of start-up;
# tests/recipe/test_recipe_errors.py checks the file is current).
FIELDS_FILE = Path(__file__).with_name("training_fields.json")
_FIELDS_FROM = ("trl", "transformers")  # the packages whose versions the file was written for


def _installed_versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in _FIELDS_FROM}


def field_table() -> dict[str, Any]:
    """The content of :data:`FIELDS_FILE`: the installed versions and, per family, the init fields of its config
    class in declaration order (imports TRL)."""
    return {"versions": _installed_versions(),
            "fields": {family: list(_field_types(config_class(family))) for family in FAMILIES}}


@functools.cache
def _known_field_names(family: str) -> tuple[str, ...] | None:
    """The init fields of ``family``'s config class without importing it, when :data:`FIELDS_FILE` was written for
    the installed versions; else None."""
    try:
        table = json.loads(FIELDS_FILE.read_text())
    except (OSError, ValueError):
        return None
    if table.get("versions") != _installed_versions():
        return None
    names = table.get("fields", {}).get(family)
    return tuple(names) if isinstance(names, list) else None


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """Init fields of a config dataclass -> resolved annotation (``None`` where it cannot be resolved)."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - an unresolvable forward reference: fall back to no type checks
        hints = {}
    return {f.name: hints.get(f.name) for f in dataclasses.fields(cls) if f.init}


def _describe(annotation: Any) -> str:
    if annotation is type(None):
        return "null"
    if annotation is bool:
        return "true or false"
    if annotation in (int, float):
        return "an integer" if annotation is int else "a number"
    if annotation is str:
        return "a string"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in annotation)
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (list, tuple):
        return "a list"
    if origin is dict or annotation is dict:
        return "a mapping"
    if origin in (typing.Union, types.UnionType):
        names = []
        for arg in typing.get_args(annotation):
            text = _describe(arg)
            if text not in names:
                names.append(text)
        return " or ".join(names)
    return getattr(annotation, "__name__", str(annotation))


_NO_MATCH = object()


def _coerce(value: Any, annotation: Any) -> Any:
    """``value`` converted to ``annotation`` (only lossless conversions), or ``_NO_MATCH``."""
    if annotation is None or annotation is Any:
        return value
    if annotation is type(None):
        return value if value is None else _NO_MATCH
    if annotation is bool:
        return value if isinstance(value, bool) else _NO_MATCH
    if annotation is int:
        if isinstance(value, bool):
            return _NO_MATCH
        if isinstance(value, int):
            return value
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)  # YAML 1e3
        return _NO_MATCH
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return _NO_MATCH
        return value
    if annotation is str:
        return value if isinstance(value, str) else _NO_MATCH
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        values = {m.value for m in annotation}
        return value if isinstance(value, str) and value in values else _NO_MATCH
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return value if any(value == a and type(value) is type(a) for a in typing.get_args(annotation)) else _NO_MATCH
    if origin in (list, tuple):
        if not isinstance(value, list):
            return _NO_MATCH
        (item,) = typing.get_args(annotation)[:1] or (Any,)
        items = [_coerce(v, item) for v in value]
        return _NO_MATCH if any(v is _NO_MATCH for v in items) else items
    if origin is dict or annotation is dict:
        return value if isinstance(value, dict) else _NO_MATCH
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        enum_type = _enum_of(annotation)
        if enum_type is not None and isinstance(value, str):  # `SchedulerType | str`: HF takes only the enum's values
            return value if value in {m.value for m in enum_type} else _NO_MATCH
        # bool before int/float so that `true` never becomes 1; str last so that an enum gives its own message
        for arg in sorted(args, key=lambda a: (a is str,)):
            out = _coerce(value, arg)
            if out is not _NO_MATCH:
                return out
        return _NO_MATCH
    if isinstance(annotation, type):
        return value if isinstance(value, annotation) else _NO_MATCH
    return value  # an annotation we do not interpret


def _enum_of(annotation: Any) -> type[enum.Enum] | None:
    """The Enum of an ``Enum | str`` annotation (HF's strategy and scheduler fields), else None."""
    args = typing.get_args(annotation)
    if str not in args:
        return None
    return next((a for a in args if isinstance(a, type) and issubclass(a, enum.Enum)), None)


def _check_numbers(key: str, value: Any) -> None:
    """Every number inside ``value`` finite and (integers) within 32 bits."""
    if isinstance(value, bool):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"training.{key}: must be a finite number, got {value!r}")
    if isinstance(value, int) and abs(value) > INT32_MAX:
        raise UserError(f"training.{key}: {value} is out of range (at most {INT32_MAX} in magnitude)")
    if isinstance(value, list):
        for v in value:
            _check_numbers(key, v)
    elif isinstance(value, dict):
        for v in value.values():
            _check_numbers(key, v)


def check_training(training: dict[str, Any], family: str) -> dict[str, Any]:
    """Check every ``training:`` key of a recipe of ``family``; return the block with lossless conversions applied
    (``1e3`` for an integer field becomes ``1000``)."""
    if not isinstance(training, dict):
        raise UserError("training: expected a mapping of training arguments")
    known = _known_field_names(family)
    if known is not None:  # unknown keys first, before TRL loads
        for key in training:
            _check_key(key, known)
    types_ = _field_types(config_class(family))
    out: dict[str, Any] = {}
    from posttrain.optim import OPTIMIZERS, check_optim_args

    if isinstance(training.get("optim"), str) and training["optim"] in OPTIMIZERS:  # posttrain's own optimizers
        out["optim"] = training["optim"]
        out["optim_args"] = check_optim_args(training["optim"], training.get("optim_args"))
        training = {k: v for k, v in training.items() if k not in ("optim", "optim_args")}
    for key, value in training.items():
        _check_key(key, types_)
        annotation = types_[key]
        converted = _coerce(value, annotation)
        enum_type = _enum_of(annotation)
        if converted is _NO_MATCH and enum_type is not None and isinstance(value, str):
            values = [m.value for m in enum_type]
            raise UserError(f"training.{key}: {value!r} is not one of {', '.join(values)}{did_you_mean(value, values)}")
        if converted is _NO_MATCH:
            raise UserError(f"training.{key}: expected {_describe(annotation)}, got {value!r}")
        _check_numbers(key, converted)
        bound = BOUNDS.get(key)
        if bound is not None and isinstance(converted, int | float) and not isinstance(converted, bool):
            if not bound.contains(converted):
                raise UserError(f"training.{key}: must be {bound.describe()}, got {converted!r}")
        out[key] = converted
    return out


def _check_key(key: Any, fields: typing.Collection[str]) -> None:
    if not isinstance(key, str):
        raise UserError(f"training.{key}: keys must be strings")
    if key in ("output_dir", "seed"):
        raise UserError(f"training.{key}: set it as the top-level recipe key '{key}'")
    if key not in fields:
        raise UserError(f"training.{key}: unknown training argument{did_you_mean(key, fields)}")


def check_training_context(training: dict[str, Any], has_eval: bool, on_gpu: bool | None = None) -> None:
    """Checks that need the rest of the recipe or the machine: evaluation without ``data.eval``, options that need
    another option (``load_best_model_at_end`` needs evaluation and saving), fp16/bf16 on CPU."""
    strategy = training.get("eval_strategy", "no")
    if strategy not in ("no", None) and not has_eval:
        raise UserError(f"training.eval_strategy: '{strategy}' needs an eval set; set data.eval or remove the key")
    if training.get("do_eval") and not has_eval:
        raise UserError("training.do_eval: needs an eval set; set data.eval or remove the key")
    if training.get("load_best_model_at_end"):
        if not has_eval:
            raise UserError("training.load_best_model_at_end: picks the checkpoint with the best eval loss, so it needs "
                            "an eval set (data.eval); set it or remove the key")
        if training.get("save_strategy", "steps") in ("no", None):
            raise UserError("training.load_best_model_at_end: needs checkpoints to choose from, but "
                            "training.save_strategy is 'no'")
    if on_gpu is None:
        import torch

        on_gpu = torch.cuda.is_available()
    if not on_gpu:
        for key in ("fp16", "bf16", "fp16_full_eval", "bf16_full_eval", "tf32"):
            if training.get(key):
                raise UserError(f"training.{key}: needs a CUDA GPU; this machine has none (training on the CPU "
                                "runs in float32: remove the key)")
    elif training.get("fp16") and training.get("bf16"):
        raise UserError("training.fp16: set at most one of fp16 and bf16")


def _setting(training: dict[str, Any], family: str, key: str) -> Any:
    """``training[key]``, else the family config class's default."""
    if key in training:
        return training[key]
    field = {f.name: f for f in dataclasses.fields(config_class(family))}.get(key)
    if field is None:
        return None
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default


def check_batch_fits_data(training: dict[str, Any], family: str, key: str, rows: int, num_processes: int = 1) -> None:
    """``gradient_accumulation_steps`` at most the micro-batches of one epoch of ``key`` (``rows`` rows; an RL row
    yields ``num_generations`` completions): more would make every optimizer step the whole epoch, silently."""
    accumulation = _setting(training, family, "gradient_accumulation_steps") or 1
    if accumulation <= 1:
        return
    batch = _setting(training, family, "per_device_train_batch_size") or 1
    per_row_key = FAMILIES[family].completions_per_row
    per_row = (_setting(training, family, per_row_key) or 1) if per_row_key is not None else 1
    micro_batches = math.ceil(rows * per_row / (batch * max(1, num_processes)))
    if accumulation > micro_batches:
        unit = f" x {per_row} completions" if per_row > 1 else ""
        procs = f" x {num_processes} processes" if num_processes > 1 else ""
        raise UserError(
            f"training.gradient_accumulation_steps: {accumulation} micro-batches per optimizer step, but one epoch of "
            f"{key} ({rows} rows{unit}) is {micro_batches} micro-batch{'es' if micro_batches != 1 else ''} of "
            f"per_device_train_batch_size {batch}{procs}: every optimizer step would be the whole epoch; use at most "
            f"{micro_batches} (or more data)")


SHORT_RUN_STEPS = 10  # below this many optimizer steps a run is a smoke test (docs/observability.md "Short runs")


def schedule_warnings(training: dict[str, Any], config: Any = None) -> list[str]:
    """Warnings for a learning-rate schedule that the run length makes meaningless: warm-up as long as the run (the
    learning rate never reaches ``learning_rate``), or a run so short that it only shows the first steps' transient
    (the model usually gets worse before it gets better: measured in docs/observability.md "Short runs")."""
    def get(key: str, default: Any) -> Any:
        return getattr(config, key, default) if config is not None else training.get(key, default)

    max_steps = get("max_steps", -1)
    warmup = get("warmup_steps", 0) or 0
    out = []
    if max_steps > 0 and warmup >= 1 and warmup >= max_steps:
        out.append(f"training.warmup_steps: {_fmt(warmup)} >= max_steps {max_steps}: the learning rate never reaches "
                   "training.learning_rate; lower warmup_steps (or give it as a fraction of the run, < 1)")
    if 0 < max_steps < SHORT_RUN_STEPS:
        out.append(f"training.max_steps: {max_steps} optimizer steps is a smoke test: the first steps at the recipe's "
                   "learning rate usually move the model away before it improves, so its accuracy after them says "
                   "nothing about the method (docs/observability.md \"Short runs\")")
    return out


if __name__ == "__main__":
    print(json.dumps(field_table(), indent=1))
