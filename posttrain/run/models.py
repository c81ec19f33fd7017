"""The run's models: the policy's tokenizer, the policy (with its adapter when ``peft`` is set) and the frozen reference
the recipe's :class:`~posttrain.reference.ReferencePlan` asks for (decided once, when the recipe is parsed), and the
``peft`` checks that need the loaded model. The loading itself (hub ids, local folders, built-in models) is
:mod:`posttrain.models`, below every family; the plan is :mod:`posttrain.reference`, below the recipe schema that
decides it.
"""

from __future__ import annotations

import logging

from posttrain.errors import UserError, did_you_mean
from posttrain.families.base import FAMILIES
from posttrain.methods import MethodInfo
from posttrain.recipe import Recipe

logger = logging.getLogger("posttrain")


def load_run_tokenizer(recipe: Recipe):
    """The policy's tokenizer (one start-up line)."""
    from posttrain.models import load_tokenizer

    m = recipe.model
    logger.info("loading tokenizer: %s", m.path)
    return load_tokenizer(m.path, trust_remote_code=m.trust_remote_code, revision=m.revision)

def load_models(recipe: Recipe, info: MethodInfo, tokenizer=None):
    """Tokenizer, policy (with adapter when ``peft`` is set) and reference model for a recipe (one start-up line
    each)."""
    from posttrain.models import load_model, load_options

    reference = recipe.reference
    m = recipe.model
    if tokenizer is None:
        tokenizer = load_run_tokenizer(recipe)
    logger.info("loading model: %s", m.path)
    model = load_model(m.path, **load_options(m), head=FAMILIES[info.family].model_head)
    ref_model = None
    if reference.loads_model and recipe.ref_model is not None:  # ref_model, or an earlier stage's model
        r = recipe.ref_model
        logger.info("loading reference model: %s", r.path)
        ref_model = load_model(r.path, **load_options(r), key="ref_model.path")
    elif reference.loads_model:  # a frozen copy of the initial policy, loaded again (under ZeRO-3 the policy is
        # already partitioned by zero.Init, and a deep copy of a partitioned model is no model at all)
        logger.info("reference model: %s", reference.source.value)
        ref_model = load_model(m.path, **load_options(m))
    elif reference.used:  # peft and no ref_model: the adapter-disabled base (handled by the trainer)
        logger.info("reference model: %s", reference.source.value)
    if ref_model is not None:
        ref_model.eval().requires_grad_(False)
    return tokenizer, model, ref_model

def check_peft_against_model(recipe: Recipe, model) -> None:
    """``peft`` keys that need the loaded model (before any adapter is allocated): the rank is at most the hidden
    size, and ``target_modules`` / ``modules_to_save`` name modules the model has (PEFT matches name suffixes)."""
    p = recipe.peft
    if p is None:
        return
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if isinstance(hidden, int) and p.r > hidden:
        raise UserError(f"peft.r: {p.r} is larger than the model's hidden size {hidden} (a LoRA rank cannot exceed "
                        "the dimensions of the layers it adapts)")
    names = [name for name, _ in model.named_modules() if name]
    leaves = sorted({name.rsplit(".", 1)[-1] for name in names})

    def exists(target: str) -> bool:
        return any(name == target or name.endswith("." + target) for name in names)

    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    saved = set(p.modules_to_save or [])
    if tied and saved & {"embed_tokens", "lm_head", "wte", "embed_in", "embed_out"}:
        from posttrain.distributed import requested_backend

        if requested_backend() == "fsdp2":
            raise UserError(
                f"peft.modules_to_save: {'/'.join(sorted(saved))} is tied to the output head in this model, and FSDP2 "
                "cannot shard the trainable copy and the frozen tied original in separate groups; leave it out, or use "
                "--distributed zero3 (or ddp / zero2)")
        embed = model.get_input_embeddings().weight
        logger.warning(
            "peft.modules_to_save: %s is tied to the output head in this model: the adapter trains and saves a full "
            "copy of it (%.0f MB) and unties it; leave it out unless new tokens must be learned",
            "/".join(sorted(saved)), getattr(embed, "ds_numel", embed.numel()) * embed.element_size() / 2**20)
    checks = [("modules_to_save", p.modules_to_save or [])]
    if isinstance(p.target_modules, list):
        checks.append(("target_modules", p.target_modules))
    for key, targets in checks:
        for target in targets:
            if not exists(target):
                raise UserError(f"peft.{key}: the model has no module named '{target}'{did_you_mean(target, leaves)}")

def output_vocab_size(model) -> int:
    """The number of next-token classes the model predicts (its output layer's rows)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    return int(weight.shape[0]) if weight is not None else int(getattr(model.config, "vocab_size", 0) or 0)
