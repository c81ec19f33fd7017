"""Wiring the LoRA variants into any family's trainer.

A trainer builder calls :func:`make_trainer` instead of instantiating its trainer class directly::

    return make_trainer(PosttrainSFTTrainer, recipe, model=model, args=config, peft_config=peft_config(recipe), ...)

which, according to ``recipe.peft.type``:

* ``lora``: instantiates ``cls`` unchanged.
* ``plora``: a subclass with :class:`~posttrain.adapters.plora.PLoRAMixin` (unload callback, per-stage LR restart in
  ``reset`` mode); checkpoints also hold ``plora_backbone.safetensors`` + ``plora_state.json`` and ``--resume``
  restores them; the final ``save_model`` writes the merged full model (backbone + last adapter).
* ``goat``: wraps the model with :func:`~posttrain.adapters.goat.apply_goat` before the trainer (``peft_config`` is
  dropped: the model already is a ``PeftModel``) and adds :class:`~posttrain.adapters.goat.GOATTrainerMixin`
  (task loss + coef * balance loss); every save (checkpoints and final) is a GOAT adapter (``goat_config.json``,
  ``init_lora_weights: false``), loadable with :func:`~posttrain.adapters.goat.load_goat` or :func:`load_adapter_run`.
* ``ggpo``: a subclass with :class:`~posttrain.adapters.ggpo.GGPOTrainerMixin` (noise applied before the first
  micro-batch's loss forward of each optimizer step, after GRPO's rollouts; removed after the last backward); ``--resume`` restores its gradient norms.

Trainers that use the adapter-disabled policy as their reference (DPO-style or GRPO ``beta > 0`` without ``ref_model``
or precomputed reference log-probs; Anchored SFT without an anchor model) are refused for ``plora`` (the disabled
adapter is no longer the original model after an unload), ``ggpo`` (it would see the perturbed weights) and ``goat``
with ``fold_residual: true`` (the disabled adapter is ``W0 - R``); a ``ref_model:`` (a separate frozen model) avoids
it.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from posttrain.adapters.spec import ADAPTER_VARIANTS, AdapterVariant, adapter_variant
from posttrain.errors import UserError
from posttrain.registry import load

logger = logging.getLogger("posttrain")
_CLASS_CACHE: dict[tuple[type, str], type] = {}


def peft_type(recipe) -> str | None:
    return None if recipe.peft is None else recipe.peft.type


def _wrapping_variant(recipe) -> AdapterVariant | None:
    """The recipe's variant when it changes the trainer (plain LoRA and no adapter: None)."""
    variant = adapter_variant(recipe.peft)
    return variant if variant is not None and variant.trainer_mixins else None


# ----------------------------------------------------------------------------------------------------------------
# Final-save / resume hooks shared by the generated subclasses
# ----------------------------------------------------------------------------------------------------------------
class _PLoRASaveMixin:
    """Final ``save_model``: merged full model; checkpoints: adapter + PLoRA backbone/state (written before the
    atomic-checkpoint marker); resume: overwrite the targeted base weights and restore the stage counters."""

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        from posttrain.adapters.plora import export_merged

        output_dir = output_dir or self.args.output_dir
        if _internal_call:
            super().save_model(output_dir, _internal_call=True)
            if self.args.should_save:
                self.plora_callback.save_state(self.model, output_dir)
            return
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            export_merged(self.model, output_dir)
            with open(os.path.join(output_dir, "posttrain_adapter.json"), "w") as fh:
                json.dump({"type": "plora", "export": "merged", **self.plora_callback.state.to_dict()}, fh, indent=2)

    def log(self, logs, *args, **kwargs):
        # before every callback's on_log (metrics.jsonl included), not only after the PLoRA callback's own
        m = self.plora_callback.last_metrics
        if m and "loss" in logs:
            logs.update({k: v for k, v in m.items() if k != "plora/optimizer_entries_reset"})
        return super().log(logs, *args, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if os.path.isfile(os.path.join(resume_from_checkpoint, "plora_state.json")):
            self.plora_callback.load_state(self.model, resume_from_checkpoint)


class _GOATSaveMixin:
    """Every save writes a GOAT adapter: ``goat_config.json`` and ``init_lora_weights: false`` (no SVD at load)."""

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        from posttrain.adapters.goat import save_goat

        output_dir = output_dir or self.args.output_dir
        super().save_model(output_dir, _internal_call=_internal_call)  # the adapter, gathered under ZeRO-3 / FSDP2
        if self.args.should_save:
            save_goat(self.accelerator.unwrap_model(self.model), output_dir, write_weights=False)
            with open(os.path.join(output_dir, "posttrain_adapter.json"), "w") as fh:
                json.dump({"type": "goat", "export": "adapter", "loader": "posttrain.adapters.load_adapter_run"},
                          fh, indent=2)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # HF's PEFT resume path reads adapter_config.json with plain PEFT, which a GOAT adapter refuses by design
        from posttrain.adapters.goat import load_goat_weights_

        load_goat_weights_(model if model is not None else self.model, resume_from_checkpoint)


class _GGPOSaveMixin:
    """Checkpoints also hold ``ggpo_state.pt`` (written before the atomic-checkpoint marker); resume restores it."""

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        import torch

        super().save_model(output_dir, _internal_call=_internal_call)
        if _internal_call and self.args.should_save and output_dir:
            torch.save(self.ggpo.state_dict(), os.path.join(output_dir, "ggpo_state.pt"))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        import torch

        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, "ggpo_state.pt")
        if os.path.isfile(path):
            self.ggpo.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))


def wrap_trainer_class(cls: type, recipe) -> type:
    """``cls`` itself for plain LoRA / no adapter, else a subclass with the variant's mixins (cached per class)."""
    variant = _wrapping_variant(recipe)
    if variant is None:
        return cls
    key = (cls, variant.name)
    if key not in _CLASS_CACHE:
        bases = (*(load(mixin) for mixin in variant.trainer_mixins), cls)
        _CLASS_CACHE[key] = type(f"{variant.name.upper()}{cls.__name__}", bases, {"__module__": __name__})
    return _CLASS_CACHE[key]


def mixin_kwargs(recipe) -> dict[str, Any]:
    """Keyword arguments of the variant's trainer mixin, from ``recipe.peft.<type>``."""
    variant = adapter_variant(recipe.peft)
    return {} if variant is None or variant.mixin_kwargs is None else load(variant.mixin_kwargs)(recipe)


def plora_kwargs(recipe) -> dict[str, Any]:
    o = recipe.peft.plora
    return dict(plora_mode=o.mode, plora_stage_steps=o.stage_steps, plora_momentum=o.momentum, plora_seed=recipe.seed)


def ggpo_kwargs(recipe) -> dict[str, Any]:
    o = recipe.peft.ggpo
    return dict(ggpo_sigma=o.sigma, ggpo_beta=o.beta, ggpo_restore=o.restore, ggpo_sigma_schedule=o.sigma_schedule,
                ggpo_every_n_steps=o.every_n_steps)


def prepare_model(model, recipe):
    """The variant's model wrapping before the trainer (GOAT: :func:`goat_model`); other types: ``model``."""
    variant = adapter_variant(recipe.peft)
    if variant is None or variant.prepare_model is None:
        return model
    return load(variant.prepare_model)(model, recipe)


def goat_model(model, recipe):
    """GOAT: wrap ``model`` with GOAT layers (SVD init) before the trainer."""
    from peft import PeftModel

    from posttrain.adapters.goat import apply_goat

    if isinstance(model, PeftModel):
        return model
    p, g = recipe.peft, recipe.peft.goat
    wrapped = apply_goat(
        model, p.target_modules, rank=p.r, num_experts=g.num_experts, top_k=g.top_k, lora_alpha=p.lora_alpha,
        lora_dropout=p.lora_dropout, rho=g.rho, eta=g.eta, scaling=g.scaling, init_cof=g.init_cof,
        fold_residual=g.fold_residual, aux_coef=g.aux_coef, aux_match_reference=g.aux_match_reference,
        aux_count_padding=g.aux_count_padding, modules_to_save=p.modules_to_save,
    )
    if wrapped.goat_skipped_targets:
        logger.info("peft.goat: %d targets smaller than r left unwrapped", len(wrapped.goat_skipped_targets))
    return wrapped


def check_reference(recipe, args=None, ref_model=None, uses_disabled_adapter_reference: bool | None = None) -> None:
    """Refuse a variant whose adapter-disabled policy is not the original model (PLoRA, GGPO, GOAT with
    ``fold_residual``: ``AdapterVariant.reference_problem``) when the trainer would take it as its reference. A
    separate ``ref_model`` (any family that has one: preference, unlearning, RL) avoids it."""
    variant = adapter_variant(recipe.peft)
    problem = variant.reference_problem(recipe.peft) if variant is not None and variant.reference_problem else None
    if problem is None:
        return
    if uses_disabled_adapter_reference is None:
        beta = float(getattr(args, "beta", 0.0) or 0.0)
        # precomputed reference log-probs are computed before training, but still with the adapter disabled
        precomputed = getattr(args, "precompute_ref_log_probs", False) and variant.precompute_helps
        uses_disabled_adapter_reference = beta > 0 and ref_model is None and not precomputed
    if uses_disabled_adapter_reference:
        raise UserError(problem)


def make_trainer(cls: type, recipe, /, *, uses_disabled_adapter_reference: bool | None = None, **kwargs):
    """Instantiate trainer class ``cls`` with ``recipe.peft``'s variant (see the module docstring).

    ``kwargs`` are ``cls``'s own arguments; ``model`` and ``peft_config`` are adjusted for GOAT. Set
    ``uses_disabled_adapter_reference`` when the trainer's reference is the adapter-disabled policy (detected from
    ``args.beta``/``ref_model``/``args.precompute_ref_log_probs`` when left as ``None``).
    """
    variant = _wrapping_variant(recipe)
    if variant is None:
        return cls(**kwargs)
    check_reference(recipe, kwargs.get("args"), kwargs.get("ref_model"), uses_disabled_adapter_reference)
    if variant.prepare_model is not None:
        kwargs["model"] = prepare_model(kwargs["model"], recipe)
        kwargs["peft_config"] = None
    return wrap_trainer_class(cls, recipe)(**kwargs, **mixin_kwargs(recipe))


# ----------------------------------------------------------------------------------------------------------------
# Loading a finished run
# ----------------------------------------------------------------------------------------------------------------
def run_adapter_type(run_dir) -> str | None:
    """``lora`` | ``plora`` | ``goat`` | ``ggpo`` from a run directory's ``recipe.yaml`` (None: no adapter)."""
    import yaml

    path = os.path.join(str(run_dir), "recipe.yaml")
    if os.path.isfile(path):
        with open(path) as fh:
            peft = (yaml.safe_load(fh) or {}).get("peft")
        return None if not peft else str(peft.get("type", "lora"))
    if os.path.isfile(os.path.join(str(run_dir), "goat_config.json")):
        return "goat"
    if os.path.isfile(os.path.join(str(run_dir), "adapter_config.json")):
        return "lora"
    return None


def run_adapter_variant(run_dir) -> AdapterVariant | None:
    """The :class:`AdapterVariant` a run directory was trained with (:func:`run_adapter_type`; None: no adapter)."""
    kind = run_adapter_type(run_dir)
    if kind is None:
        return None
    return ADAPTER_VARIANTS[kind if kind in ADAPTER_VARIANTS else "lora"].variant  # unknown: a plain PEFT adapter


def _base_model_for(run_dir, trust_remote_code: bool = False):
    """The run's base model, from ``recipe.yaml`` (``model:``), else the adapter's ``base_model_name_or_path``.

    The run folder's ``recipe.yaml`` cannot turn on ``trust_remote_code`` by itself: when it says ``true``, the caller
    must pass ``trust_remote_code=True`` (``posttrain merge --trust-remote-code``), else this is an error."""
    import yaml

    from posttrain.models import load_model

    path = os.path.join(str(run_dir), "recipe.yaml")
    if os.path.isfile(path):
        with open(path) as fh:
            m = (yaml.safe_load(fh) or {}).get("model") or {}
        if isinstance(m, str):
            m = {"path": m}
        if m.get("trust_remote_code") is True and not trust_remote_code:
            raise UserError(
                f"{path}: model.trust_remote_code is true, so loading the base model '{m.get('path')}' would run "
                "code from it; pass --trust-remote-code only if you trust that model and this run folder"
            )
        return load_model(m["path"], dtype=m.get("dtype", "auto"), trust_remote_code=bool(trust_remote_code
                          and m.get("trust_remote_code")), revision=m.get("revision"))
    with open(os.path.join(str(run_dir), "adapter_config.json")) as fh:
        return load_model(json.load(fh)["base_model_name_or_path"])


def load_adapter_run(run_dir, base_model=None, is_trainable: bool = False, trust_remote_code: bool = False):
    """Load a finished run's final model: GOAT/LoRA/GGPO adapters onto their base (``PeftModel``), PLoRA (and full
    fine-tuning) runs as the full model they saved. ``trust_remote_code`` as in :func:`_base_model_for`."""
    variant = run_adapter_variant(run_dir)
    if variant is None or variant.saved_merged:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(run_dir))
    base = base_model if base_model is not None else _base_model_for(run_dir, trust_remote_code=trust_remote_code)
    if variant.loader is not None:
        return load(variant.loader)(base, str(run_dir), is_trainable=is_trainable)
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(run_dir), is_trainable=is_trainable)


def check_trainer_supports_variant(trainer, recipe, method: str = "") -> None:
    """Refuse a run whose builder did not go through :func:`make_trainer` for a LoRA variant (it would silently
    train plain LoRA)."""
    variant = _wrapping_variant(recipe)
    if variant is None:
        return
    expected = load(variant.trainer_mixins[0])
    if expected not in type(trainer).__mro__:
        where = f"method '{method}'" if method else "this method's trainer"
        raise UserError(f"peft.type: '{variant.name}' is not supported by {where} yet (use peft.type: lora)")
