"""Multi-process training helpers shared by every family: the active backend, the frozen-reference preparation, direct
weight access under sharding, and the reduction of logged metrics over processes (docs/distributed.md).

* :func:`backend_name`: ``single`` | ``ddp`` | ``zero2`` | ``zero2_offload`` | ``zero3`` | ``zero3_offload`` |
  ``fsdp2`` (what the trainer's accelerator runs, not what was asked for).
* :func:`check_backend` / :func:`check_offload_optimizer`: the methods, adapters and optimizer settings a backend
  cannot run (or, under optimizer offload, would silently replace), refused before any model loads.
* :func:`fsdp_on_cpu`: accelerate (1.16) turns FSDP on only for GPU-type distributed states, so on a machine without
  GPUs ``--distributed fsdp2`` would silently train with DDP. Around the creation of the trainer's ``Accelerator``
  this marks the CPU (gloo) state as a multi-device one, so accelerate takes its own FSDP2 path (``fully_shard`` on a
  CPU device mesh, gloo collectives); nothing else changes, and GPU runs are untouched.
* :func:`skip_deepspeed_until_imported`: accelerate's ``extract_model_from_parallel`` (which TRL and transformers
  call on every model they unwrap) imports DeepSpeed whenever it is installed, only to ask whether the model is a
  ``DeepSpeedEngine``: about half a second and DeepSpeed's accelerator probe ("Setting accelerator to CPU") in a run
  that uses no DeepSpeed. No model is a ``DeepSpeedEngine`` before DeepSpeed is imported, so there the question is
  asked only once it is (a DeepSpeed run imports it when its accelerator is built).
* :func:`prepare_frozen`: a frozen reference (or anchor) model prepared for the backend the way TRL prepares its own
  reference: a DeepSpeed inference engine (ZeRO-3: sharded like the policy), ``fully_shard`` under FSDP2, else
  ``accelerator.prepare_model(evaluation_mode=True)``.
* :func:`full_weight` / :func:`gathered`: the whole of a sharded weight where posttrain reads a weight directly (the
  output head in the token-level KL terms): an FSDP2 DTensor is all-gathered with autograd (its gradient flows back
  to the shard); ZeRO-3 parameters are gathered for reading only.
* :class:`TokenMean` / :func:`reduce_metrics`: a metric that is a mean over tokens is logged as
  ``sum over processes / count over processes`` (what one process logs on the same global batch), not as the mean of
  each process's own mean; plain values are averaged over processes.
* :func:`process_share`: the denominator that makes a per-process token mean the global one once DDP (or ZeRO / FSDP)
  averages the gradients: the token count of all processes divided by their number.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Iterator

import torch


# the backends of ``posttrain train --distributed`` (posttrain.launch.BACKENDS), plus "single" (one process)
SHARDED = ("zero3", "zero3_offload", "fsdp2")  # the weights themselves are sharded over the processes
DEEPSPEED = ("zero2", "zero2_offload", "zero3", "zero3_offload")
OFFLOAD = ("zero2_offload", "zero3_offload")  # the optimizer step runs in CPU memory (DeepSpeed's CPU optimizers)
# HF ``optim`` values that accelerate maps to the same update on DeepSpeed's CPU Adam, and the Adam settings CPU Adam
# keeps at these (HF's) defaults whatever the recipe says (:func:`check_offload_optimizer`)
OFFLOAD_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused")
CPU_ADAM_DEFAULTS = {"adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8}


def skip_deepspeed_until_imported() -> None:
    """Make accelerate's ``extract_model_from_parallel`` test for a ``DeepSpeedEngine`` only once DeepSpeed is
    imported (see the module docstring); its answer is unchanged, since no engine exists before that. Idempotent."""
    import sys

    import accelerate.utils.other as other

    if getattr(other.is_deepspeed_available, "posttrain_imported_only", False):
        return

    def deepspeed_imported() -> bool:
        return "deepspeed" in sys.modules

    deepspeed_imported.posttrain_imported_only = True
    other.is_deepspeed_available = deepspeed_imported


def requested_backend() -> str:
    """The backend this process was launched for, from accelerate's launch environment: ``single``, ``ddp``,
    ``zero2`` (DeepSpeed stage 0-2), ``zero2_offload`` (its optimizer in CPU memory), ``zero3``, ``zero3_offload``
    or ``fsdp2`` (what ``--distributed`` asked for, known before the trainer exists)."""
    env = os.environ

    def offloaded(what: str) -> bool:
        return env.get(f"ACCELERATE_DEEPSPEED_OFFLOAD_{what}_DEVICE", "none").lower() not in ("none", "")

    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        if env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "") != "3":
            return "zero2_offload" if offloaded("OPTIMIZER") else "zero2"
        return "zero3_offload" if offloaded("PARAM") else "zero3"
    if wants_fsdp():
        return "fsdp2"
    return "ddp" if int(env.get("WORLD_SIZE", "1")) > 1 else "single"


def check_backend(recipe, info, backend: str, variant) -> None:
    """Refuse, before any model loads, a method or adapter that cannot run on ``backend``: one line naming the recipe
    key, the backend and why (docs/distributed.md "What runs where"). ``variant``: the
    :class:`~posttrain.adapters.spec.AdapterVariant` of ``recipe.peft``, None without one (passed in: the adapters
    sit above this module)."""
    from posttrain.errors import UserError

    flag = f"--distributed {backend}"
    params = recipe.params
    if backend in (*DEEPSPEED, "fsdp2") and params.learned_mask:
        raise UserError(
            f"method.mask: learned trains a mask network beside the model, which {flag} neither shards nor reduces; "
            "use mask: reference, or --distributed ddp")
    if backend not in ("single", "ddp") and getattr(params, "mask", None) == "wagle":
        raise UserError(f"method.mask: wagle needs whole parameters (a global top-k over every weight); not supported "
                        f"with {flag}; use --distributed ddp")
    from posttrain.optim import OPTIMIZERS, refuse_sharded

    if recipe.training.get("optim") in OPTIMIZERS:
        if backend in (*DEEPSPEED, "fsdp2"):
            raise refuse_sharded("training.optim")
        for key in ("deepspeed", "fsdp"):  # asked in the recipe rather than by the launcher
            if recipe.training.get(key):
                raise refuse_sharded(f"training.{key}")
    if backend in OFFLOAD:
        check_offload_optimizer(recipe.training, backend)
    peft = recipe.peft
    if peft is not None:
        if backend not in variant.backends:
            raise UserError(f"peft.type: {peft.type} does not run with {flag}: {variant.not_sharded}; use --distributed "
                            "ddp (or peft.type lora / goat)")
        goat = getattr(peft, "goat", None)
        if backend in ("zero3", "zero3_offload") and goat is not None and goat.fold_residual:
            raise UserError(f"peft.goat.fold_residual: edits the base weights in place while the adapter is created, "
                            f"which {flag} has already partitioned (zero.Init); set fold_residual: false")
    if recipe.training.get("deepspeed"):
        import importlib.util

        # Last: what the recipe cannot do on any install is said first.
        if importlib.util.find_spec("deepspeed") is None:
            raise UserError("training.deepspeed: needs deepspeed (pip install -e '.[deepspeed]')")


def check_offload_optimizer(training: dict[str, Any], backend: str) -> None:
    """Under optimizer offload accelerate (1.16, ``map_pytorch_optim_to_deepspeed``) swaps the HF optimizer for
    DeepSpeed's CPU Adam, taking only its ``lr`` and ``weight_decay``: torch AdamW becomes CPU Adam in AdamW mode,
    and every other optimizer but Adagrad (SGD included) CPU Adam with L2 weight decay. Refuse what would silently
    train differently: an optimizer other than AdamW, or Adam betas / epsilon that CPU Adam would not use."""
    from posttrain.errors import UserError

    flag, instead = f"--distributed {backend}", f"--distributed {backend.removesuffix('_offload')}"
    optim = training.get("optim", "adamw_torch")
    if optim not in OFFLOAD_OPTIMIZERS:
        raise UserError(f"training.optim: {optim} with {flag}: accelerate replaces it by DeepSpeed's CPU Adam (the "
                        f"optimizer step in CPU memory), a different update; use {' or '.join(OFFLOAD_OPTIMIZERS)}, "
                        f"or {instead}")
    for key, default in CPU_ADAM_DEFAULTS.items():
        if key in training and not _equals(training[key], default):
            raise UserError(f"training.{key}: {training[key]} with {flag}: DeepSpeed's CPU Adam takes only the "
                            f"learning rate and weight decay from the recipe ({key} stays {default}); leave it at "
                            f"{default}, or use {instead}")


def _equals(value: Any, number: float) -> bool:
    try:
        return float(value) == number
    except (TypeError, ValueError):
        return False


def wants_fsdp() -> bool:
    """Whether the launch asked for FSDP (``accelerate launch --use_fsdp``)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


@contextlib.contextmanager
def fsdp_on_cpu() -> Iterator[None]:
    """Let accelerate build an FSDP accelerator on a CPU-only (gloo) multi-process launch; see the module docstring.

    accelerate's ``AcceleratorState`` copies the process state (``PartialState``) and enables FSDP only when that
    state's type is a multi-device one; a CPU launch is ``MULTI_CPU``, so the FSDP plugin is dropped. For the duration
    of the accelerator's creation the shared process state reads ``MULTI_GPU`` (its device stays the CPU); accelerate
    then sets both states to ``DistributedType.FSDP`` (kept: accelerate copies the process state into the accelerator
    state whenever one is created). Had it not, the state is put back to ``MULTI_CPU``.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    state = PartialState._shared_state
    if not wants_fsdp() or state.get("distributed_type") != DistributedType.MULTI_CPU:
        yield
        return
    state["distributed_type"] = DistributedType.MULTI_GPU
    try:
        yield
    finally:
        if state.get("distributed_type") == DistributedType.MULTI_GPU:
            state["distributed_type"] = DistributedType.MULTI_CPU


def backend_name(accelerator) -> str:
    """``single``, ``ddp``, ``zero2`` (ZeRO stage 0-2), ``zero3`` (either with ``_offload`` when the optimizer lives in
    CPU memory) or ``fsdp2`` (FSDP of either version)."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        plugin = accelerator.state.deepspeed_plugin
        name = "zero3" if plugin.zero_stage == 3 else "zero2"
        offload = plugin.deepspeed_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device")
        return f"{name}_offload" if offload not in (None, "none") else name
    if kind == DistributedType.FSDP:
        return "fsdp2"
    return "ddp" if accelerator.num_processes > 1 else "single"


def zero3_enabled() -> bool:
    """DeepSpeed ZeRO-3 is configured for this process (models loaded now are partitioned by ``zero.Init``)."""
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:  # pragma: no cover - transformers always has it
        return False
    return bool(is_deepspeed_zero3_enabled())


def prepare_frozen(model, accelerator, *, disable_dropout: bool = True):
    """``model`` frozen (eval, no grad, dropout off) and prepared for the active backend, as TRL prepares its own
    reference model (``trl.models.prepare_deepspeed`` / ``prepare_fsdp``): under ZeRO-3 the reference is partitioned
    like the policy, under FSDP2 sharded with ``fully_shard``; otherwise one copy per process."""
    from trl.models import prepare_deepspeed, prepare_fsdp
    from trl.trainer.utils import disable_dropout_in_model

    if disable_dropout:
        disable_dropout_in_model(model)
    model.eval().requires_grad_(False)
    name = backend_name(accelerator)
    if name in DEEPSPEED:
        return prepare_deepspeed(model, accelerator)
    if name == "fsdp2":
        return prepare_fsdp(model, accelerator)
    return accelerator.prepare_model(model, evaluation_mode=True)


def local_shard(param: torch.Tensor) -> torch.Tensor:
    """The part of ``param`` this process holds: its ZeRO-3 partition, its FSDP2 shard, else the whole tensor."""
    from torch.distributed.tensor import DTensor

    if isinstance(param, DTensor):
        return param.to_local()
    partition = getattr(param, "ds_tensor", None)
    return partition if partition is not None else param


def full_weight(weight: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a parameter that FSDP2 shards (a DTensor, gathered with autograd); others unchanged."""
    from torch.distributed.tensor import DTensor

    return weight.full_tensor() if isinstance(weight, DTensor) else weight


@contextlib.contextmanager
def gathered(*params) -> Iterator[None]:
    """Read access to ZeRO-3 partitioned parameters for the duration of the block (no-op elsewhere). Not for
    parameters whose gradient is needed: ZeRO-3 reduces gradients only for parameters used inside a module's forward
    (methods that need that are refused under ZeRO-3 and FSDP2, see :func:`check_backend`)."""
    if not zero3_enabled():
        yield
        return
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    todo = {id(p): p for p in params if p is not None and getattr(p, "ds_status", None) == ZeroParamStatus.NOT_AVAILABLE}
    if not todo:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(todo.values())):
        yield


# ----------------------------------------------------------------------------------------------------------------------
# metrics and loss denominators over processes
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TokenMean:
    """A metric that is a mean over tokens (or rows): this process's ``total`` and ``count``. :func:`reduce_metrics`
    logs ``sum(total) / sum(count)`` over processes; ``float()`` is this process's own mean."""

    total: torch.Tensor
    count: torch.Tensor

    @classmethod
    def of(cls, values: torch.Tensor, mask: torch.Tensor | None = None) -> "TokenMean":
        """The mean of ``values`` over the positions where ``mask`` is non-zero (every position without a mask)."""
        values = values.detach().float()
        if mask is None:
            return cls(values.sum(), torch.tensor(float(values.numel()), device=values.device))
        m = mask.detach().to(values.dtype)
        return cls((values * m).sum(), m.sum())

    def __float__(self) -> float:
        return float(self.total / self.count.clamp(min=1.0))


def reduce_metrics(accelerator, metrics: dict[str, Any]) -> dict[str, float]:
    """Every metric reduced over processes in one all-reduce: a :class:`TokenMean` as the global token mean, any other
    number (a Python float or a 0-dim tensor, each process's value for its equal share of the batch) as the mean over
    processes. One process: the values themselves."""
    if not metrics:
        return {}
    names = list(metrics)
    device = accelerator.device
    rows = []
    for name in names:
        value = metrics[name]
        if isinstance(value, TokenMean):
            rows.append(torch.stack([value.total.float().to(device), value.count.float().to(device)]))
        else:
            number = value.detach().float().reshape(()) if isinstance(value, torch.Tensor) else torch.tensor(
                float(value))
            rows.append(torch.stack([number.to(device), torch.ones((), device=device)]))
    table = torch.stack(rows)
    if accelerator.num_processes > 1:
        table = accelerator.reduce(table, reduction="sum")
    means = torch.where(table[:, 1] > 0, table[:, 0] / table[:, 1].clamp(min=1e-30), torch.zeros_like(table[:, 0]))
    return dict(zip(names, means.tolist(), strict=True))


def process_share(accelerator, count: torch.Tensor | float) -> torch.Tensor:
    """``count`` summed over processes, divided by their number: as the denominator of a per-process token sum, the
    gradient averaging of DDP / ZeRO / FSDP turns it into the token mean of the global batch."""
    count = torch.as_tensor(count, dtype=torch.float32, device=accelerator.device).reshape(())
    if accelerator.num_processes == 1:
        return count
    return accelerator.reduce(count.clone(), reduction="sum") / accelerator.num_processes
