"""Recipe schema of the LoRA variants: ``peft.type: lora | plora | goat | ggpo`` and each variant's options.

Kept free of torch/peft imports so that parsing a recipe stays cheap. A variant's options live in a sub-block named
after it (``peft.plora``, ``peft.goat``, ``peft.ggpo``); a sub-block for another variant than ``peft.type`` is an
error naming the key, and so is a LoRA option the variant cannot honour (e.g. ``peft.use_rslora`` with GOAT, whose
scaling is ``peft.goat.scaling``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from posttrain.errors import UserError
from posttrain.registry import AdapterVariantEntry, Registry

# ``peft.type`` -> entry: ``fn`` is the variant's options model (the ``peft.<type>`` sub-block; plain LoRA has none)
# and ``variant`` its :class:`AdapterVariant`. The implementations (posttrain/adapters/<type>.py) import torch/peft and
# are wired by posttrain.adapters.trainer, which asks the variant instead of comparing ``peft.type``.
ADAPTER_VARIANTS: Registry[AdapterVariantEntry] = Registry("adapter variant", AdapterVariantEntry)

PEFT_USAGE = ("from peft import AutoPeftModelForCausalLM",
              'model = AutoPeftModelForCausalLM.from_pretrained("PATH")')


@dataclass(frozen=True)
class AdapterVariant:
    """What a run needs from one ``peft.type``. Code is named by ``"module:attribute"`` strings, imported on use
    (this module stays torch-free).

    ``options``: it has a ``peft.<name>`` sub-block. ``mergeable``: ``posttrain merge`` folds it into the base
    (``merge_refusal``, formatted with ``run``, says why not). ``backends``: the ``--distributed`` backends it runs on
    (docs/distributed.md), ``not_sharded`` why not the others. ``trainer_mixins``: the classes put before the trainer
    class (the save/resume hooks first; none: the trainer class itself), ``mixin_kwargs(recipe)`` their arguments.
    ``prepare_model(model, recipe)``: wraps the model before the trainer, which then gets no ``peft_config``.
    ``reference_problem(peft)``: why the adapter-disabled policy is not the original model (the trainer then
    refuses it as a reference), and ``precompute_helps``: whether precomputed reference log-probs avoid that.
    ``check(peft)``: cross-key checks of the ``peft`` block. ``saved_merged``: the final model is saved as a full
    model (``merged_description``); ``loader(base, run_dir, is_trainable=...)``: loads a saved adapter plain PEFT
    cannot. ``quantizable``: trains on quantised base weights (QLoRA). ``usage``: the model card's loading lines."""

    name: str
    options: bool = False
    mergeable: bool = True
    merge_refusal: str = ""
    backends: tuple[str, ...] = ()
    not_sharded: str = ""
    trainer_mixins: tuple[str, ...] = ()
    mixin_kwargs: str | None = None
    prepare_model: str | None = None
    reference_problem: Callable[[Any], str | None] | None = None
    precompute_helps: bool = True
    check: Callable[[Any], None] | None = None
    saved_merged: bool = False
    merged_description: str = ""
    loader: str | None = None
    quantizable: bool = False
    usage: tuple[str, ...] = PEFT_USAGE


_ADAPTER_DISABLED = "this method uses the adapter-disabled policy as its reference (beta > 0 / anchor)"
_FROZEN_COPY = "ref_model: the same path as model: for a frozen copy of the initial model"
_TRAINER = "posttrain.adapters.trainer"


def _unlike_the_original(why: str) -> Callable[[Any], str]:
    def problem(peft) -> str:
        return (f"peft.{peft.type}: {_ADAPTER_DISABLED}, which {why}; set ref_model ({_FROZEN_COPY}), or precompute "
                "the reference log-probs (method.precompute_ref_log_probs: true, where the method has it)")

    return problem


def _goat_folded_reference(peft) -> str | None:
    if peft.goat is None or not peft.goat.fold_residual:
        return None
    return (f"peft.goat.fold_residual: {_ADAPTER_DISABLED}, which is W0 - R with the residual folded, not the original "
            f"model; set ref_model ({_FROZEN_COPY}), or peft.goat.fold_residual: false")


def _check_goat(peft) -> None:
    g = peft.goat
    if peft.r % g.num_experts != 0:
        raise UserError(f"peft.r: GOAT needs a total rank divisible by peft.goat.num_experts={g.num_experts}, "
                        f"got r={peft.r}")
    if peft.use_rslora:
        raise UserError("peft.use_rslora: not used by GOAT; set peft.goat.scaling: rslora instead")
    if peft.bias != "none":
        raise UserError("peft.bias: GOAT supports only 'none'")
    if peft.init_lora_weights is not True:
        raise UserError("peft.init_lora_weights: GOAT always uses its SVD initialisation; remove the key")


def register_variant(doc: str, variant: AdapterVariant) -> Callable[[type], type]:
    """Decorator of a variant's options model: register it under ``variant.name``."""
    return ADAPTER_VARIANTS.register(variant.name, doc=doc, variant=variant)


# every `--distributed` backend (posttrain.launch.BACKENDS) and one process
EVERY_BACKEND = ("single", "ddp", "zero2", "zero2_offload", "zero3", "zero3_offload", "fsdp2")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), strict=True, allow_inf_nan=False)


@register_variant("docs/methods/lora.md", AdapterVariant("lora", backends=EVERY_BACKEND, quantizable=True))
class LoRAOptions(_Strict):
    """Plain LoRA (Hu et al. 2021, arXiv 2106.09685) through PEFT: no options beyond the ``peft.*`` keys."""


@register_variant("docs/methods/plora.md", AdapterVariant(
    "plora", options=True, backends=("single", "ddp"),
    not_sharded="it unloads the adapter into the frozen base weights, which ZeRO-3 and FSDP2 shard, and its reset mode "
                "drops per-parameter optimizer state, which DeepSpeed keeps in flat partitions",
    trainer_mixins=(f"{_TRAINER}:_PLoRASaveMixin", "posttrain.adapters.plora:PLoRAMixin"),
    mixin_kwargs=f"{_TRAINER}:plora_kwargs",
    reference_problem=_unlike_the_original("is no longer the original model after an unload"),
    saved_merged=True, merged_description="PLoRA run (already saved merged: backbone + last adapter)",
    usage=("from transformers import AutoModelForCausalLM, AutoTokenizer",
           'model = AutoModelForCausalLM.from_pretrained("PATH")  # PLoRA runs are saved merged')))
class PLoRASpec(_Strict):
    """PeriodicLoRA (arXiv 2402.16141): unload the adapter into the backbone every ``stage_steps`` steps."""

    mode: Literal["momentum", "reset", "momentum_scale_both"] = Field(
        "momentum",
        description="momentum: W += lam*s*BA, B *= 1-lam (function preserving; default). reset: the paper's merge "
        "+ re-init of A/B, optimizer state dropped and LR schedule restarted per stage. momentum_scale_both: "
        "also A *= 1-lam (third-party formula, not function preserving).",
    )
    momentum: float = Field(0.1, gt=0.0, le=1.0, description="lam, the unloaded fraction (momentum modes).")
    stage_steps: int | None = Field(
        None, ge=1, le=2**31 - 1, description="Optimizer steps per stage. Default 1 for the momentum modes; required for reset."
    )

    @model_validator(mode="after")
    def _check(self):
        if self.mode == "reset":
            if self.stage_steps is None:
                raise UserError("peft.plora.stage_steps: required when peft.plora.mode is 'reset'")
            if self.stage_steps < 2:
                raise UserError("peft.plora.stage_steps: must be >= 2 in 'reset' mode (A never learns while B = 0)")
        return self


@register_variant("docs/methods/goat.md", AdapterVariant(
    "goat", options=True, mergeable=False, backends=EVERY_BACKEND,
    merge_refusal="GOAT adapters cannot be merged: the router mixes the experts per token, so no single weight matrix "
                  "equals the adapter; load it with posttrain.adapters.load_adapter_run('{run}') (or "
                  "posttrain.adapters.load_goat(base_model, '{run}'))",
    trainer_mixins=(f"{_TRAINER}:_GOATSaveMixin", "posttrain.adapters.goat:GOATTrainerMixin"),
    prepare_model=f"{_TRAINER}:goat_model", reference_problem=_goat_folded_reference, precompute_helps=False,
    check=_check_goat, loader="posttrain.adapters.goat:load_goat",
    usage=("from posttrain.adapters import load_adapter_run", 'model = load_adapter_run("PATH")  # GOAT adapter')))
class GOATSpec(_Strict):
    """GOAT (arXiv 2502.16894): SVD-initialised mixture of LoRA experts with a top-k router. ``peft.r`` is the
    total rank (split into ``num_experts`` experts of rank r/E)."""

    num_experts: int = Field(8, ge=1, le=1024)
    top_k: int = Field(2, ge=1, le=1024)
    rho: float = Field(10.0, gt=0.0, description="Init scale divisor: s*B_j*A_j = U_seg S_seg V_seg^T / rho.")
    eta: float = Field(1.0, gt=0.0, description="Learning-rate ratio in the theory scaling sqrt(3*n*eta/d).")
    scaling: Literal["theory", "alpha", "rslora"] = Field(
        "theory", description="theory: sqrt(3 n eta / d) (paper). alpha: lora_alpha/d (released code). rslora."
    )
    init_cof: float | None = Field(
        None, ge=0.0, description="Residual coefficient; default 1/E (paper; the code uses 1)."
    )
    fold_residual: bool = Field(False, description="Subtract the residual from W0 in place (released code).")
    aux_coef: float = Field(1e-3, ge=0.0, description="Load-balancing loss coefficient.")
    aux_match_reference: bool = Field(False, description="Use the released code's balance loss (k x the paper's).")
    aux_count_padding: bool = Field(False, description="Count padding tokens in the balance loss (released code).")

    @model_validator(mode="after")
    def _check(self):
        if self.top_k > self.num_experts:
            raise UserError(f"peft.goat.top_k: must be <= peft.goat.num_experts={self.num_experts}, got {self.top_k}")
        return self


@register_variant("docs/methods/ggpo.md", AdapterVariant(
    "ggpo", options=True, backends=("single", "ddp"),
    not_sharded="it perturbs the base weights in place, which ZeRO-3 and FSDP2 shard, and reads each LoRA gradient "
                "after the backward, which DeepSpeed moves into its own partitioned buffers",
    trainer_mixins=(f"{_TRAINER}:_GGPOSaveMixin", "posttrain.adapters.ggpo:GGPOTrainerMixin"),
    mixin_kwargs=f"{_TRAINER}:ggpo_kwargs",
    reference_problem=_unlike_the_original("would be computed at the perturbed weights")))
class GGPOSpec(_Strict):
    """LoRA-GGPO (arXiv 2502.14538v1): per-step Gaussian weight perturbation scaled by weight and gradient norms."""

    sigma: float = Field(0.05, ge=0.0, description="Noise scale sigma.")
    beta: float = Field(0.01, ge=0.0, description="Weight of the gradient-norm term.")
    sigma_schedule: Literal["constant", "cosine_ramp"] = "constant"
    every_n_steps: int = Field(1, ge=1, le=2**31 - 1, description="Perturb only on steps t with t % every_n_steps == 0.")
    restore: Literal["copy", "regenerate"] = Field(
        "copy",
        description="How the noise is removed: copy (bitwise exact; holds a copy of the targeted weights during the "
        "step) or regenerate (redraw and subtract: saves that memory, but the frozen weights drift by a few ulp per "
        "step, so the saved adapter on the original base and a --resume differ slightly from the trained model).",
    )


PEFT_TYPES = ADAPTER_VARIANTS.names()
MERGEABLE = tuple(e.name for e in ADAPTER_VARIANTS if e.variant.mergeable)
VARIANT_SPECS = {e.name: e.fn for e in ADAPTER_VARIANTS if e.variant.options}


def adapter_variant(peft: Any) -> AdapterVariant | None:
    """The :class:`AdapterVariant` of a recipe's ``peft`` block (None: no adapter)."""
    return None if peft is None else ADAPTER_VARIANTS[peft.type].variant


def check_peft_variant(peft: Any) -> Any:
    """Cross-field checks of a ``PeftSpec``: the variant's sub-block, and LoRA options it cannot honour."""
    for name in VARIANT_SPECS:
        if getattr(peft, name, None) is not None and peft.type != name:
            raise UserError(f"peft.{name}: options for peft.type '{name}', but peft.type is '{peft.type}'")
    if peft.type in VARIANT_SPECS and getattr(peft, peft.type, None) is None:
        setattr(peft, peft.type, VARIANT_SPECS[peft.type]())
    check = adapter_variant(peft).check
    if check is not None:
        check(peft)
    return peft


def variant_options(peft: Any) -> dict[str, Any]:
    """The variant's options as a plain dict ({} for plain LoRA)."""
    sub = getattr(peft, peft.type, None) if peft is not None and peft.type in VARIANT_SPECS else None
    return sub.model_dump() if sub is not None else {}
