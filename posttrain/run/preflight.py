"""Every check of a run that needs no model, and the data prepared before any model loads.

:func:`preflight` builds the family's TRL config object from ``training:`` (HF/TRL validation included), checks the
tracker, backend, load and reference-model keys, and loads and checks every data source; once the tokenizer is loaded,
:func:`prepare_chat_format` resolves the chat template and wraps the data, and :func:`check_reference_tokenizer` /
:func:`check_rows_fit` check what needs the tokenizer. :func:`check_user_code` imports the recipe's own code, the last
check before anything is written or loaded. Each failure is one :class:`~posttrain.errors.UserError` naming the key.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from posttrain.errors import UserError, did_you_mean
from posttrain.families.base import FAMILIES
from posttrain.methods import MethodInfo
from posttrain.recipe import Recipe
from posttrain.registry import load

logger = logging.getLogger("posttrain")



# training.report_to values that are posttrain extras (pip install 'posttrain[NAME]'; the module has the same name)
TRACKERS = ("tensorboard", "trackio", "wandb")


# transformers integrations whose Python module has another name
_TRACKER_MODULES = {"azure_ml": "azureml", "flyte": "flytekit"}

def check_report_to(recipe: Recipe) -> None:
    """``training.report_to`` names trackers transformers knows (or ``none`` / ``all``), each installed (before any
    model is loaded; transformers would only fail when the trainer is built)."""
    import importlib.util

    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    value = recipe.training.get("report_to")
    names = [value] if isinstance(value, str) else list(value or [])
    for name in names:
        if not isinstance(name, str):
            raise UserError(f"training.report_to: expected a tracker name or a list of them, got {value!r}")
        if name in ("none", "all") and len(names) == 1:
            continue
        if name not in INTEGRATION_TO_CALLBACK:
            known = ", ".join(["none", "all", *sorted(INTEGRATION_TO_CALLBACK)])
            raise UserError(f"training.report_to: unknown tracker '{name}'{did_you_mean(name, INTEGRATION_TO_CALLBACK)}"
                            f" (known: {known})")
        if importlib.util.find_spec(_TRACKER_MODULES.get(name, name)) is None:
            extra = f"pip install 'posttrain[{name}]', or " if name in TRACKERS else ""
            raise UserError(f"training.report_to: {name} is not installed ({extra}pip install {name})")

def build_config(recipe: Recipe, info: MethodInfo):
    """The family's TRL/HF config object for ``recipe`` (TRL's own validation included; errors name the key)."""
    return load(FAMILIES[info.family].build_config)(recipe, info)

def preflight(recipe: Recipe, *, load_data: bool = True, build_trainer_config: bool = True,
              num_processes: int | None = None, backend: str | None = None) -> tuple[MethodInfo, Any, dict[str, Any]]:
    """Every check that needs no model and runs no user code: returns ``(info, config, datasets)``. Raises
    :class:`UserError`. ``build_trainer_config=False`` (config None) skips the TRL config, whose checks depend on the
    process count (``posttrain train --num-processes`` checks in one process before launching ``num_processes``;
    default: ``WORLD_SIZE``). ``backend``: the ``--distributed`` backend the run will use (default: the one this
    process was launched for). The recipe's own code is imported later, by :func:`check_user_code`."""
    from posttrain.adapters.spec import adapter_variant
    from posttrain.distributed import check_backend, requested_backend
    from posttrain.recipe.training_args import check_batch_fits_data, check_training_context, schedule_warnings

    info = recipe.info
    family = FAMILIES[info.family]
    for note in recipe._path_notes:
        logger.info("%s", note)
    _check_not_the_recipe_folder(recipe)
    check_report_to(recipe)
    check_backend(recipe, info, backend or requested_backend(), adapter_variant(recipe.peft))
    check_training_context(recipe.training, has_eval=recipe.data.eval is not None)
    if "model_init_kwargs" in recipe.training:
        raise UserError("training.model_init_kwargs: posttrain loads the model itself, so TRL would ignore it; use the "
                        "model: keys instead (dtype, attn_implementation, revision, trust_remote_code, device_map, "
                        "quantization)")
    check_load_options(recipe.model, "model", peft=recipe.peft)
    if recipe.ref_model not in (None, "none"):
        check_load_options(recipe.ref_model, "ref_model")
    recipe.reference  # the ReferencePlan, decided here once (a ref_model the method cannot use is refused)
    config = build_config(recipe, info) if build_trainer_config else None
    if num_processes is None:
        num_processes = int(os.environ.get("WORLD_SIZE", "1"))
    datasets: dict[str, Any] = {}
    if load_data:
        from posttrain.data.sources import load_source

        for key, kind in family.data.items():
            src = getattr(recipe.data, key)
            if src is None:
                continue
            datasets[f"data.{key}"] = ds = load_source(src, f"data.{key}", kind, seed=recipe.seed,
                                                       roles=_template_roles(recipe))
            if isinstance(src, list):
                recipe._mixtures[f"data.{key}"] = ds.posttrain_mixture
            else:
                logger.info("data.%s: %d rows from %s", key, len(ds), describe_source(src))
        if family.check_data is not None:
            load(family.check_data)(recipe, datasets)
        step_key = family.data_keys[0]  # the data an optimizer step draws its batch from
        if f"data.{step_key}" in datasets:
            check_batch_fits_data(recipe.training, info.family, f"data.{step_key}",
                                  len(datasets[f"data.{step_key}"]), num_processes)
        _default_assistant_only_loss(recipe, info, config, datasets)
    _check_chat_template_file(recipe)
    for warning in schedule_warnings(recipe.training, config):
        if warning not in recipe._warnings:
            recipe._warnings.append(warning)
            logger.warning("warning: %s", warning)
    return info, config, datasets

def _check_not_the_recipe_folder(recipe: Recipe) -> None:
    """``output_dir`` may not be the recipe file's own folder (the run writes ``recipe.yaml``, checkpoints and a model
    there, and ``--overwrite`` removes what it wrote), unless that folder holds a run (``posttrain train
    RUN_DIR/recipe.yaml --resume``)."""
    from posttrain.trainers.common import previous_outputs

    source = recipe._source_dir
    if source is not None and Path(recipe.output_dir).resolve() == source and not previous_outputs(source):
        raise UserError(f"output_dir: '{recipe.output_dir}' is the recipe's own folder; the run writes recipe.yaml, "
                        "checkpoints and a model there (and --overwrite removes what it wrote): choose a subfolder")

def check_user_code(recipe: Recipe, info: MethodInfo) -> None:
    """Import the recipe's own code (the family's code-loading keys, docs/security in README.md): the last check
    before any model loads, so that a run that fails another check runs none of it."""
    check_code = FAMILIES[info.family].check_code
    if check_code is not None:
        load(check_code)(recipe)

def _template_roles(recipe: Recipe) -> tuple[str, ...]:
    """Roles a ``data.chat_template`` file names besides the standard ones (quoted role names it compares with)."""
    from posttrain.data.formatting import template_path
    from posttrain.data.sources import template_role_names
    from posttrain.paths import read_text

    path = template_path(recipe.data.chat_template, recipe._source_dir)
    return template_role_names(read_text(path)) if path is not None else ()

def describe_source(src) -> str:
    return src.source + (f" ({src.split})" if not src.source.endswith((".json", ".jsonl", ".parquet")) else "")

def _default_assistant_only_loss(recipe: Recipe, info: MethodInfo, config, datasets: dict[str, Any]) -> None:
    """``messages`` rows in the SFT family: loss on the assistant turns only (:func:`mask_sft_conversations`), unless
    ``training.assistant_only_loss`` says otherwise."""
    train = datasets.get("data.train")
    if not FAMILIES[info.family].masks_conversations or train is None or "messages" not in train.column_names:
        return
    if "assistant_only_loss" not in recipe.training:
        config.assistant_only_loss = True
        logger.info("data.train: messages rows: loss on the assistant turns only (training.assistant_only_loss: "
                    "false for every token)")

def _check_chat_template_file(recipe: Recipe) -> None:
    """``data.chat_template: FILE.jinja`` exists and is a valid Jinja template that renders a plain user/assistant
    conversation in transformers' sandbox: before anything is loaded or written."""
    from posttrain.data.formatting import template_path
    from posttrain.paths import read_text

    path = template_path(recipe.data.chat_template, recipe._source_dir)
    if path is not None:
        check_template_renders(read_text(path), f"data.chat_template: '{path}'")

SAMPLE_CONVERSATION = [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}]

def check_template_renders(text: str, where: str) -> None:
    """A chat template compiles and renders :data:`SAMPLE_CONVERSATION` in transformers' sandboxed Jinja environment
    (what TRL and ``apply_chat_template`` use); else one error line naming ``where`` (the sandbox refusing attribute
    access such as ``__init__`` included)."""
    import jinja2
    from jinja2.exceptions import SecurityError
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        render_jinja_template([SAMPLE_CONVERSATION], chat_template=text, bos_token="", eos_token="", pad_token="",
                              add_generation_prompt=False)
    except jinja2.TemplateSyntaxError as exc:
        raise UserError(f"{where}: line {exc.lineno}: not a valid Jinja template ({exc.message})") from None
    except SecurityError as exc:
        raise UserError(f"{where}: refused by the template sandbox ({exc}); a chat template may only format the "
                        "conversation, not reach into Python objects") from None
    except jinja2.TemplateError as exc:
        raise UserError(
            f"{where}: fails on a plain user/assistant conversation ({type(exc).__name__}: {exc})") from None

def prepare_chat_format(recipe: Recipe, info: MethodInfo, config, tokenizer, datasets: dict[str, Any]):
    """Resolve ``data.chat_template`` / ``data.system_prompt`` against the tokenizer (logged once, and written to
    ``recipe.yaml`` as resolved: ``auto`` that does not wrap becomes ``none``), wrap the loaded data accordingly and
    find the assistant tokens of conversational SFT rows (:func:`mask_sft_conversations`). Before any model loads."""
    from posttrain.data.formatting import apply_chat_format, resolve_chat_format

    fmt = resolve_chat_format(recipe.data, recipe.model.path, tokenizer, recipe._source_dir)
    logger.info("%s", fmt.describe())
    if fmt.mode == "auto" and not fmt.wrap:
        recipe.data.chat_template = "none"
    recipe._chat_format = fmt
    for key in list(datasets):
        datasets[key] = apply_chat_format(datasets[key], fmt)
    if FAMILIES[info.family].masks_conversations:
        mask_sft_conversations(recipe, config, tokenizer, datasets)
    return fmt

def mask_sft_conversations(recipe: Recipe, config, tokenizer, datasets: dict[str, Any]) -> None:
    """SFT on conversational rows puts the loss on the assistant turns (``messages`` rows unless
    ``training.assistant_only_loss: false``; conversational completions unless the method trains every token): the
    rows are tokenised here with posttrain's masks (:func:`posttrain.data.formatting.mask_conversational_rows`, any
    chat template), and TRL's own ``assistant_only_loss`` (which needs ``{% generation %}`` markers) is turned off."""
    from posttrain.data.formatting import is_conversation, mask_conversational_rows

    assistant_only = bool(getattr(config, "assistant_only_loss", False))
    for key in ("data.train", "data.eval"):
        rows = datasets.get(key)
        if rows is None or len(rows) == 0 or "input_ids" in rows.column_names:
            continue
        first = rows[0]
        if "messages" in first:
            masked = assistant_only
        else:
            conversational = any(is_conversation(first.get(col)) for col in ("prompt", "completion"))
            if assistant_only and not conversational:
                raise UserError(f"training.assistant_only_loss: needs conversational rows ({key} holds plain text)")
            masked = conversational and (assistant_only or config.completion_only_loss is not False)
        if masked:
            datasets[key] = mask_conversational_rows(rows, tokenizer, key, recipe.data.assistant_turns,
                                                     config.dataset_num_proc)
    config.assistant_only_loss = False  # the masks are in the tokenised rows

def check_reference_tokenizer(recipe: Recipe, info: MethodInfo, tokenizer) -> None:
    """A ``ref_model`` scores the policy's token ids, so it must have the policy's tokenizer (another architecture
    is fine); checked before any model loads."""
    from posttrain.models import load_tokenizer

    r = recipe.ref_model
    if r in (None, "none") or not recipe.reference.loads_model:
        return
    ref_tok = load_tokenizer(r.path, trust_remote_code=r.trust_remote_code, revision=r.revision, key="ref_model.path")
    if ref_tok.get_vocab() != tokenizer.get_vocab():
        raise UserError(f"ref_model: its tokenizer ({len(ref_tok)} tokens) differs from the tokenizer of model "
                        f"'{recipe.model.path}' ({len(tokenizer)} tokens); the reference scores the policy's token "
                        "ids, so it needs the same tokenizer (a model of the same family)")

def check_rows_fit(config, tokenizer, datasets: dict[str, Any]) -> None:
    """Before any model loads: with ``training.max_length`` keeping the start of each row, a data set whose every
    prompt alone fills ``max_length`` would lose every row (the trainers drop rows with no answer token left); one
    error line instead of an error after the model loaded. Stops at the first prompt that fits."""
    from posttrain.data.formatting import render_prompt
    from posttrain.data.sources import column_values

    max_length = getattr(config, "max_length", None)
    if not max_length or getattr(config, "truncation_mode", "keep_start") != "keep_start":
        return
    for key, ds in datasets.items():
        if "prompt" not in ds.column_names or not len(ds):
            continue
        for prompt in column_values(ds, "prompt"):
            text = render_prompt(prompt, tokenizer, key)
            if len(tokenizer(text, add_special_tokens=False)["input_ids"]) < max_length:
                break
        else:
            raise UserError(f"{key}: no rows left: every prompt alone fills training.max_length={max_length} tokens, "
                            "so no answer token would be trained on; raise training.max_length")


def check_load_options(spec, key: str, *, peft=None) -> None:
    """Refuse load options that cannot work here, before anything is loaded: quantised loading without a CUDA GPU,
    without bitsandbytes, without an adapter or with an adapter variant that rewrites the base weights."""
    import importlib.util

    import torch

    if spec.device_map is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError(f"{key}.device_map: a multi-process run places one model copy per process; remove device_map")
    q = spec.quantization
    if q is None:
        return
    bits = "4-bit" if q.load_in_4bit else "8-bit"
    if key == "model":
        if peft is None:
            raise UserError("model.quantization: quantised weights cannot be trained directly; add a peft: block "
                            "(QLoRA)")
        from posttrain.adapters.spec import adapter_variant

        if not adapter_variant(peft).quantizable:
            raise UserError(f"model.quantization: peft.type {peft.type} changes or initialises from the base weights, "
                            "which are quantised; use peft.type lora (QLoRA) or remove the quantization block")
    if not torch.cuda.is_available():
        raise UserError(f"{key}.quantization: {bits} loading (bitsandbytes) needs a CUDA GPU and this machine has "
                        "none; remove the quantization block to train in full precision")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(f"{key}.quantization: bitsandbytes is not installed (pip install 'posttrain[qlora]')")
