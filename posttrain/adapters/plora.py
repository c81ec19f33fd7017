"""PeriodicLoRA (PLoRA): periodically unload the LoRA update into the backbone.

Paper: Meng et al., "PeriodicLoRA: Breaking the Low-Rank Bottleneck in LoRA Optimization", arXiv 2402.16141.
Method page: docs/methods/plora.md (sections #unload-modes, #checkpoints-and-export).

Per targeted linear layer with frozen base weight ``W`` (out x in), ``A`` (r x in), ``B`` (out x r) and scaling
``s`` (alpha/r or alpha/sqrt(r)), an *unload* runs at the end of every ``stage_steps``-th optimizer step
(``TrainerCallback.on_step_end``, after optimizer.step / scheduler.step / zero_grad), under ``no_grad`` in fp32:

* ``reset`` (the paper's basic PLoRA, docs/methods/plora.md#reset-mode):
  ``W <- W + s·B·A``; ``A`` redrawn (kaiming-uniform a=sqrt5, or normal std 1/r for ``gaussian``) from a dedicated
  generator seeded by (run seed, stage index, module name); ``B <- 0``; the optimizer state of every LoRA parameter
  is dropped (the next update is an exact fresh-AdamW first step); the LR schedule restarts each stage:
  ``lr(k) = base_lr · f_T(k mod T)``.
* ``momentum`` (framework default, docs/methods/plora.md#momentum-mode): ``W <- W + lam·s·B·A``; ``B <- (1-lam)·B``. The layer
  function ``W + s·B·A`` is preserved exactly; A, optimizer and LR are untouched. With T = 1 the backbone
  accumulates an EMA of LoRA's per-step updates.
* ``momentum_scale_both`` (third-party MyTransformers formula): ``W <- W + lam·s·B·A``; ``A <- (1-lam)·A``;
  ``B <- (1-lam)·B``. Not function preserving (output changes by ``-lam(1-lam)·s·B·A`` per unload).

The final model is the merged backbone plus the last adapter (``merged_state_dict`` / ``export_merged``). Never
use PEFT's ``merge()`` for the unload: it appends to ``merged_adapters`` and the forward then skips the LoRA branch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

try:  # transformers is a hard dependency of the package, but keep the pure helpers importable without it.
    from transformers import TrainerCallback
except Exception:  # pragma: no cover
    TrainerCallback = object  # type: ignore[assignment,misc]

from peft.tuners.lora import LoraLayer

from posttrain.errors import UserError

PLORA_MODES = ("momentum", "reset", "momentum_scale_both")

__all__ = [
    "PLORA_MODES",
    "PLoRACallback",
    "PLoRAMixin",
    "PLoRAState",
    "export_merged",
    "iter_lora_layers",
    "lora_parameters",
    "make_periodic_scheduler",
    "merge_and_reinit",
    "merged_state_dict",
    "plora_unload_",
    "reset_optimizer_state",
    "stage_generator",
    "check_plora_reference_model",
    "validate_plora_config",
]


# --------------------------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------------------------
def stage_generator(seed: int, stage_index: int, module_name: str, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from (run seed, stage index, module qualified name), identical on every rank."""
    digest = hashlib.sha256(f"{int(seed)}|{int(stage_index)}|{module_name}".encode()).digest()
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return g


def iter_lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """Yield (qualified name, layer) for every PEFT LoRA layer (linear ``lora_A``/``lora_B`` type)."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and len(module.lora_A) > 0:
            yield name, module


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """All ``lora_A``/``lora_B`` parameters (weights and biases) of the model."""
    params: list[nn.Parameter] = []
    for _, layer in iter_lora_layers(model):
        for adapter in layer.lora_A:
            params.extend(layer.lora_A[adapter].parameters())
            params.extend(layer.lora_B[adapter].parameters())
    return params


def _check_layer(layer: LoraLayer, adapter: str) -> None:
    if layer.use_dora.get(adapter, False) or adapter in getattr(layer, "lora_magnitude_vector", {}):
        raise UserError("peft.use_dora: DoRA cannot be combined with peft.plora (the magnitude depends on W)")
    weight = layer.get_base_layer().weight
    if not weight.dtype.is_floating_point:
        raise UserError("peft.plora: quantized (4/8-bit) base weights cannot absorb the unloaded LoRA update")
    if layer.merged_adapters:
        raise RuntimeError("plora_unload_: the adapter is merged (PEFT merge()); unmerge it first")


@torch.no_grad()
def plora_unload_(
    layer: LoraLayer,
    adapter: str = "default",
    mode: str = "reset",
    lam: float = 0.1,
    generator: torch.Generator | None = None,
    init_lora_weights: bool | str = True,
) -> float:
    """Unload one LoRA layer into its base weight in place; return ``||dW||_F`` (docs/methods/plora.md#unload-modes).

    ``reset``: ``W += s·B·A``; A redrawn from ``generator`` (kaiming-uniform a=sqrt5, or normal std 1/r when
    ``init_lora_weights == "gaussian"``); B = 0 (bias of B, if any, is folded into the base bias and zeroed).
    ``momentum``: ``W += lam·s·B·A``; ``B *= 1-lam``. ``momentum_scale_both``: as momentum plus ``A *= 1-lam``.
    All math in fp32, cast back to each tensor's dtype. Optimizer state is NOT touched here
    (see :func:`reset_optimizer_state`).
    """
    if mode not in PLORA_MODES:
        raise UserError(f"peft.plora.mode: unknown mode {mode!r}; expected one of {', '.join(PLORA_MODES)}")
    _check_layer(layer, adapter)
    base = layer.get_base_layer()
    W = base.weight
    A_lin, B_lin = layer.lora_A[adapter], layer.lora_B[adapter]
    A = A_lin.weight.data.float()
    B = B_lin.weight.data.float()
    s = float(layer.scaling[adapter])
    frac = 1.0 if mode == "reset" else float(lam)
    dW = (frac * s) * (B @ A)
    if getattr(layer, "fan_in_fan_out", False):
        dW = dW.T
    W.data.copy_((W.data.float() + dW).to(W.dtype))
    has_b_bias = getattr(B_lin, "bias", None) is not None
    if has_b_bias and base.bias is not None:
        base.bias.data.copy_((base.bias.data.float() + frac * s * B_lin.bias.data.float()).to(base.bias.dtype))

    if mode == "reset":
        r = A_lin.weight.shape[0]
        newA = torch.empty(A_lin.weight.shape, dtype=torch.float32, device=A_lin.weight.device)
        if isinstance(init_lora_weights, str) and init_lora_weights.lower() == "gaussian":
            newA.normal_(0.0, 1.0 / r, generator=generator)
        else:
            nn.init.kaiming_uniform_(newA, a=math.sqrt(5), generator=generator)
        A_lin.weight.data.copy_(newA.to(A_lin.weight.dtype))
        B_lin.weight.data.zero_()
        if has_b_bias:
            B_lin.bias.data.zero_()
    else:
        B_lin.weight.data.copy_((B * (1.0 - lam)).to(B_lin.weight.dtype))
        if has_b_bias:
            B_lin.bias.data.mul_(1.0 - lam)
        if mode == "momentum_scale_both":
            A_lin.weight.data.copy_((A * (1.0 - lam)).to(A_lin.weight.dtype))
    return float(dW.norm())


def reset_optimizer_state(optimizer: Any, params: list[nn.Parameter]) -> int:
    """Drop the optimizer state of ``params`` (docs/methods/plora.md#reset-mode); return the number of entries removed.

    Dropping (rather than zeroing) restores the AdamW bias-correction ``step`` too, so the next update is exactly a
    fresh AdamW first step. Unwraps accelerate's ``AcceleratedOptimizer`` (``.optimizer``).
    """
    removed = 0
    seen: set[int] = set()
    opt = optimizer
    while opt is not None and id(opt) not in seen:
        seen.add(id(opt))
        state = getattr(opt, "state", None)
        if isinstance(state, dict):
            for p in params:
                if state.pop(p, None) is not None:
                    removed += 1
        opt = getattr(opt, "optimizer", None)
    return removed


def _adapter_init(model: nn.Module, adapter: str) -> bool | str:
    cfg = getattr(model, "peft_config", {}).get(adapter) if hasattr(model, "peft_config") else None
    init = getattr(cfg, "init_lora_weights", True) if cfg is not None else True
    return init if (init is True or (isinstance(init, str) and init.lower() == "gaussian")) else True


@torch.no_grad()
def merge_and_reinit(
    model: nn.Module,
    optimizer: Any | None = None,
    *,
    mode: str = "reset",
    lam: float = 0.1,
    seed: int = 0,
    stage_index: int = 0,
    adapter: str | None = None,
) -> dict[str, float]:
    """Unload every LoRA layer of ``model`` (a ``PeftModel`` or a model holding LoRA layers).

    In ``reset`` mode also drops the optimizer state of the LoRA parameters when ``optimizer`` is given. Returns
    metrics: ``plora/unload_norm`` (sum of ||dW||_F), ``plora/lora_norm`` (sum of ||s·B·A||_F before the unload),
    ``plora/underflow_frac`` (entries with dW != 0 whose stored W did not change) and ``plora/optimizer_entries_reset``.
    """
    unload_norm = lora_norm = 0.0
    changed_nonzero = total_nonzero = 0
    params: list[nn.Parameter] = []
    for name, layer in iter_lora_layers(model):
        adapters = [adapter] if adapter is not None else list(layer.active_adapters)
        for ad in adapters:
            if ad not in layer.lora_A:
                continue
            lora_norm += float(layer.get_delta_weight(ad).float().norm())
            W = layer.get_base_layer().weight
            before = W.data.clone()
            g = stage_generator(seed, stage_index, name, device=layer.lora_A[ad].weight.device)
            frac = 1.0 if mode == "reset" else lam
            expected_nonzero = (layer.get_delta_weight(ad).float() * frac) != 0
            unload_norm += plora_unload_(layer, ad, mode, lam, g, init_lora_weights=_adapter_init(model, ad))
            total_nonzero += int(expected_nonzero.sum())
            changed_nonzero += int(((W.data != before) & expected_nonzero).sum())
            params.extend(layer.lora_A[ad].parameters())
            params.extend(layer.lora_B[ad].parameters())
    n_reset = reset_optimizer_state(optimizer, params) if (optimizer is not None and mode == "reset") else 0
    underflow = 1.0 - changed_nonzero / total_nonzero if total_nonzero else 0.0
    return {
        "plora/unload_norm": unload_norm,
        "plora/lora_norm": lora_norm,
        "plora/underflow_frac": underflow,
        "plora/optimizer_entries_reset": float(n_reset),
    }


def validate_plora_config(mode: str, stage_steps: int | None, lam: float) -> int:
    """Validate ``peft.plora.*`` and return the effective ``stage_steps`` (docs/methods/plora.md#hyperparameters)."""
    if mode not in PLORA_MODES:
        raise UserError(f"peft.plora.mode: unknown mode {mode!r}; expected one of {', '.join(PLORA_MODES)}")
    if not (0.0 < float(lam) <= 1.0):
        raise UserError(f"peft.plora.momentum: must be in (0, 1], got {lam}")
    if mode == "reset":
        if stage_steps is None:
            raise UserError("peft.plora.stage_steps: required when peft.plora.mode is 'reset'")
        if int(stage_steps) < 2:
            raise UserError("peft.plora.stage_steps: must be >= 2 in 'reset' mode (A never learns while B = 0)")
        if int(stage_steps) < 10:
            warnings.warn(f"peft.plora.stage_steps={stage_steps} is small for 'reset' mode (< 10)", stacklevel=2)
        return int(stage_steps)
    if stage_steps is None:
        return 1
    if int(stage_steps) < 1:
        raise UserError("peft.plora.stage_steps: must be >= 1")
    return int(stage_steps)


def check_plora_reference_model(beta: float, ref_model: Any = None, precompute_ref_log_probs: bool = False) -> None:
    """After an unload ``disable_adapter()`` is no longer the original model: TRL DPO/KTO/GRPO with beta > 0 need an
    explicit ref model or precomputed reference log-probs (docs/methods/plora.md#reference-models)."""
    if beta and beta > 0 and ref_model is None and not precompute_ref_log_probs:
        raise UserError(
            "peft.plora: with beta > 0 the adapter-disabled reference is no longer the original model after an "
            "unload; set precompute_ref_log_probs: true or give an explicit ref_model"
        )


def make_periodic_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str,
    stage_steps: int,
    *,
    warmup_ratio: float = 0.0,
    warmup_steps: int = 0,
    step_offset: int = 0,
    scheduler_specific_kwargs: dict | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """LR schedule restarted every stage: ``lr(k) = base_lr · f_T((k - offset) mod T)`` (docs/methods/plora.md#reset-mode).

    ``f_T`` is transformers' ``get_scheduler(name)`` built with ``num_training_steps = T`` and
    ``num_warmup_steps = warmup_steps`` if ``0 < warmup_steps < T``, else ``round(warmup_ratio · T)``.
    """
    from transformers import get_scheduler

    T = int(stage_steps)
    nw = int(warmup_steps) if 0 < int(warmup_steps) < T else int(round(warmup_ratio * T))
    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    proto = get_scheduler(
        name, optimizer=dummy, num_warmup_steps=nw, num_training_steps=T,
        scheduler_specific_kwargs=scheduler_specific_kwargs or {},
    )
    lambdas = getattr(proto, "lr_lambdas", None)
    if not lambdas:
        raise UserError(f"peft.plora: lr_scheduler_type {name!r} is not a lambda schedule; cannot restart it per stage")
    f = lambdas[0]
    off = int(step_offset)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: f((k - off) % T))


# --------------------------------------------------------------------------------------------------------------
# Trainer integration
# --------------------------------------------------------------------------------------------------------------
class PLoRAState:
    """Resume state (docs/methods/plora.md#checkpoints-and-export): stage index, seed, mode parameters, step offset."""

    def __init__(self, mode: str, stage_steps: int, lam: float, seed: int, stage_index: int = 0, step_offset: int = 0):
        self.mode, self.stage_steps, self.lam, self.seed = mode, int(stage_steps), float(lam), int(seed)
        self.stage_index, self.step_offset = int(stage_index), int(step_offset)

    def to_dict(self) -> dict[str, Any]:
        return dict(mode=self.mode, stage_steps=self.stage_steps, lam=self.lam, seed=self.seed,
                    stage_index=self.stage_index, step_offset=self.step_offset, format_version=1)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PLoRAState:
        return cls(d["mode"], d["stage_steps"], d["lam"], d["seed"], d.get("stage_index", 0), d.get("step_offset", 0))


class PLoRACallback(TrainerCallback):
    """``on_step_end``: every ``stage_steps`` optimizer steps, unload all LoRA layers (docs/methods/plora.md#unload-modes).

    Needs ``model`` and ``optimizer`` from the callback kwargs (HF Trainer passes both). Metrics of the last unload
    are kept in ``self.last_metrics`` (and merged into the next ``on_log``). ``on_save`` writes
    ``plora_state.json`` and ``plora_backbone.safetensors`` (targeted base weights) into the checkpoint folder.
    """

    def __init__(self, mode: str = "momentum", stage_steps: int | None = None, lam: float = 0.1, seed: int = 0):
        T = validate_plora_config(mode, stage_steps, lam)
        self.state = PLoRAState(mode, T, lam, seed)
        self.last_metrics: dict[str, float] = {}

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None or state.global_step <= 0 or state.global_step % self.state.stage_steps != 0:
            return control
        m = merge_and_reinit(
            model, optimizer, mode=self.state.mode, lam=self.state.lam, seed=self.state.seed,
            stage_index=self.state.stage_index,
        )
        self.state.stage_index += 1
        m["plora/stage"] = float(self.state.stage_index)
        if m["plora/underflow_frac"] > 0.01:
            warnings.warn(
                f"plora/underflow_frac={m['plora/underflow_frac']:.3f}: the unloaded update rounds away in the base "
                "dtype; use fp32 targeted weights or a larger peft.plora.stage_steps", stacklevel=2,
            )
        self.last_metrics = m
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self.last_metrics:
            logs.update({k: v for k, v in self.last_metrics.items() if k != "plora/optimizer_entries_reset"})
        return control

    def on_save(self, args, state, control, model=None, **kwargs):
        if model is None or not getattr(args, "output_dir", None):
            return control
        ckpt = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(ckpt) and getattr(args, "process_index", 0) == 0:
            self.save_state(model, ckpt)
        return control

    def save_state(self, model: nn.Module, directory: str) -> None:
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        weights = {n: l.get_base_layer().weight.detach().cpu().contiguous() for n, l in iter_lora_layers(model)}
        save_file(weights, os.path.join(directory, "plora_backbone.safetensors"))
        with open(os.path.join(directory, "plora_state.json"), "w") as f:
            json.dump(self.state.to_dict(), f, indent=2)

    def load_state(self, model: nn.Module, directory: str) -> None:
        """Overwrite the targeted base weights from a checkpoint and restore the stage counters."""
        from safetensors.torch import load_file

        weights = load_file(os.path.join(directory, "plora_backbone.safetensors"))
        with torch.no_grad():
            for n, layer in iter_lora_layers(model):
                if n in weights:
                    W = layer.get_base_layer().weight
                    W.data.copy_(weights[n].to(W.device, W.dtype))
        with open(os.path.join(directory, "plora_state.json")) as f:
            self.state = PLoRAState.from_dict(json.load(f))


class PLoRAMixin:
    """Mixin for ``transformers.Trainer`` / TRL trainers (place it first in the bases).

    ``class MyTrainer(PLoRAMixin, SFTTrainer)`` with ``plora_mode``/``plora_stage_steps``/``plora_momentum``/
    ``plora_seed`` keyword arguments: registers a :class:`PLoRACallback` and, in ``reset`` mode, replaces the LR
    scheduler by a per-stage restarting one (:func:`make_periodic_scheduler`).
    """

    def __init__(self, *args, plora_mode: str = "momentum", plora_stage_steps: int | None = None,
                 plora_momentum: float = 0.1, plora_seed: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        seed = plora_seed if plora_seed is not None else getattr(self.args, "seed", 0)
        self.plora_callback = PLoRACallback(plora_mode, plora_stage_steps, plora_momentum, seed)
        self.add_callback(self.plora_callback)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        st = self.plora_callback.state
        if st.mode != "reset" or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        opt = optimizer if optimizer is not None else self.optimizer
        # transformers 5: `warmup_steps` < 1 is a ratio; transformers 4 also had `warmup_ratio`.
        ws = float(getattr(self.args, "warmup_steps", 0) or 0)
        ratio = float(getattr(self.args, "warmup_ratio", 0.0) or 0.0)
        if 0 < ws < 1:
            ratio, ws = ws, 0
        self.lr_scheduler = make_periodic_scheduler(
            opt, str(getattr(self.args.lr_scheduler_type, "value", self.args.lr_scheduler_type)), st.stage_steps,
            warmup_ratio=ratio, warmup_steps=int(ws), step_offset=st.step_offset,
            scheduler_specific_kwargs=getattr(self.args, "lr_scheduler_kwargs", None) or {},
        )
        self._created_lr_scheduler = True
        return self.lr_scheduler


# --------------------------------------------------------------------------------------------------------------
# Final export: merged backbone + last adapter
# --------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def merged_state_dict(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    """``W_final = W_T + s·B·A`` for every targeted layer, as a fresh state dict with plain (un-PEFTed) key names.

    The live model is not mutated. PEFT prefixes (``base_model.model.``, ``.base_layer``) and LoRA keys are stripped.
    """
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    deltas: dict[str, torch.Tensor] = {}
    for name, layer in iter_lora_layers(base):
        d = None
        for ad in layer.active_adapters:
            if ad in layer.lora_A:
                dd = layer.get_delta_weight(ad).float()
                d = dd if d is None else d + dd
        if d is not None:
            deltas[name] = d
    out: dict[str, torch.Tensor] = {}
    trained_copy = {ad: f".modules_to_save.{ad}." for ad in getattr(peft_model, "peft_config", {}) or {"default": 0}}
    for key, value in base.state_dict().items():
        if ".lora_" in key or key.split(".")[-1].startswith("lora_") or ".original_module." in key:
            continue  # LoRA factors; the frozen original of a modules_to_save module (its trained copy is kept)
        clean = key.replace(".base_layer.", ".")
        for marker in trained_copy.values():
            clean = clean.replace(marker, ".")
        if key.endswith(".base_layer.weight"):
            mod = key[: -len(".base_layer.weight")]
            if mod in deltas:
                value = (value.float() + deltas[mod].to(value.device)).to(value.dtype)
        out[clean] = value.detach().clone()
    return out


def export_merged(peft_model: nn.Module, out_dir: str, tokenizer: Any | None = None) -> str:
    """Write the merged full model with ``save_pretrained`` (+ tokenizer); loadable by ``AutoModelForCausalLM``."""
    import copy

    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    sd = merged_state_dict(peft_model)
    config = base.config
    if getattr(config, "tie_word_embeddings", False):
        # a trained copy of the input embeddings (modules_to_save) unties them from the output head
        emb = [k for k in sd if k.endswith("embed_tokens.weight")]
        head = [k for k in sd if k.endswith("lm_head.weight")]
        if emb and head and not torch.equal(sd[emb[0]], sd[head[0]]):
            config = copy.deepcopy(config)
            config.tie_word_embeddings = False
        elif emb and head:  # still tied: write the shared matrix once (from_pretrained ties the head to it again)
            for key in head:
                del sd[key]
    old = base.config
    base.config = config
    try:
        base.save_pretrained(out_dir, state_dict=sd)
    finally:
        base.config = old
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir
