"""Running a recipe: check it, load data and models, build the method's trainer, train, save, and report.

Before a model loads, :func:`preflight` builds the family's TRL config object from ``training:`` (HF/TRL validation
included), checks the reference-model keys and loads and checks every data source, and :func:`prepare_output_dir`
checks the output folder (writable; not another run's outputs unless ``--resume`` / ``--overwrite``).

Every run leaves in ``output_dir``: ``recipe.yaml`` (fully resolved), ``metrics.jsonl`` (one JSON object per logging
event, appended as training goes), the final model + tokenizer (or adapter), HF checkpoints for ``--resume``, the
model card ``README.md``, ``summary.json`` and ``report.html`` (docs/observability.md), and ``POSTTRAIN_COMPLETE``
once the final model is saved.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from posttrain.errors import UserError, did_you_mean
from posttrain.families.base import FAMILIES
from posttrain.registry import load
from posttrain.health import HealthMonitor, use_log_lines
from posttrain.threads import configure_cpu_threads
from posttrain.methods import MethodInfo
from posttrain.recipe import Recipe
from posttrain.trainers.common import peft_config, training_config  # noqa: F401 (re-exported)

logger = logging.getLogger("posttrain")


@dataclasses.dataclass
class RunContext:
    recipe: Recipe
    info: MethodInfo
    tokenizer: Any
    model: Any
    ref_model: Any
    config_overrides: dict[str, Any]
    callbacks: list[Any]
    config: Any = None  # the family's TRL/HF config (built by preflight)
    datasets: dict[str, Any] = dataclasses.field(default_factory=dict)  # "data.<key>" -> loaded, checked Dataset

    def dataset(self, key: str, kind: str):
        """``data.<key>`` as preflight loaded it (or loaded now, for contexts built without preflight)."""
        if key not in self.datasets:
            from posttrain.data.sources import load_source

            self.datasets[key] = load_source(getattr(self.recipe.data, key.split(".", 1)[1]), key, kind)
        return self.datasets[key]


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now (so redirected or captured stderr works)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(quiet: bool = False) -> None:
    level = logging.WARNING if quiet else logging.INFO
    root = logging.getLogger("posttrain")
    if not root.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[posttrain] %(message)s"))
        root.addHandler(handler)
    root.setLevel(level)
    import datasets
    import transformers

    import warnings

    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated.*")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()


def output_vocab_size(model) -> int:
    """The number of next-token classes the model predicts (its output layer's rows)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    return int(weight.shape[0]) if weight is not None else int(getattr(model.config, "vocab_size", 0) or 0)


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


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


class MetricsJsonlCallback:
    """Appends one JSON line per logging event to ``metrics.jsonl`` (flushed, so it survives a crash)."""

    def __new__(cls, path: Path):
        from transformers import TrainerCallback

        class _Callback(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                if not state.is_world_process_zero or not logs:
                    return
                row = {"step": state.global_step, "epoch": state.epoch, **logs}
                with open(path, "a") as fh:
                    fh.write(json.dumps(row, default=float) + "\n")
                    fh.flush()
                    os.fsync(fh.fileno())

        return _Callback()


def _truncate_metrics(path: Path, last_step: int) -> None:
    """On resume, drop metric rows logged after the checkpoint (they are logged again)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    path.write_text("".join(line + "\n" for line in keep))


def write_resolved_recipe(recipe: Recipe) -> None:
    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".recipe.yaml.tmp"
    text = yaml.safe_dump(recipe.resolved(), sort_keys=False)
    for key, mixture in recipe._mixtures.items():  # the resolved mixtures, as comments (the file still loads)
        text += f"# {key}: {mixture}\n"
    tmp.write_text(text)
    os.replace(tmp, out / "recipe.yaml")


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


class AccuracyBeforeTraining:
    """Under ZeRO-3 the policy is partitioned from the moment it loads and is gathered only by the hooks DeepSpeed
    installs when training starts: the test accuracy before training is measured then, at ``on_train_begin`` (on the
    adapter-disabled base with PEFT: the model as loaded), on every process (``generate`` keeps them in step)."""

    def __new__(cls, tokenizer, recipe: Recipe, rows, warnings: list[str]):
        from transformers import TrainerCallback

        class _Callback(TrainerCallback):
            value: float | None = None

            def on_train_begin(self, args, state, control, model=None, **kwargs):
                import contextlib

                from posttrain.reference import peft_model_of

                peft = peft_model_of(model)
                with peft.disable_adapter() if peft is not None else contextlib.nullcontext():
                    self.value = test_accuracy(model, tokenizer, recipe, rows, warnings, "before training")

        return _Callback()


def copy_checkpoint_model(checkpoint: str, out: Path) -> list[str]:
    """Copy the saved model of ``checkpoint`` (weights, configs, adapter files; not the trainer's resume state) into
    ``out``; returns the names copied."""
    import re
    import shutil

    model_file = re.compile(r"^(config\.json|generation_config\.json|adapter_config\.json|goat_config\.json|"
                            r"posttrain_adapter\.json|training_args\.bin|pytorch_model\.bin|.*\.safetensors|"
                            r".*\.safetensors\.index\.json)$")
    names = sorted(f.name for f in Path(checkpoint).iterdir() if f.is_file() and model_file.match(f.name))
    for name in names:
        shutil.copy(Path(checkpoint) / name, out / name)  # new mtime: listed in the run marker
    return names


def test_accuracy(model, tokenizer, recipe: Recipe, rows=None, warnings: list[str] | None = None,
                  when: str = "") -> float | None:
    """Greedy accuracy on ``data.test`` (``eval.max_new_tokens`` new tokens, as every accuracy path); a warning when
    many completions were cut at that limit is logged and added to ``warnings`` (``when``: "before training", ...)."""
    if recipe.data.test is None:
        return None
    from posttrain.data.sources import load_source
    from posttrain.eval.accuracy import greedy_eval

    family = FAMILIES[recipe.info.family]
    if rows is None:
        rows = load_source(recipe.data.test, "data.test", family.data["test"])
    if family.test_scorer is not None:
        return load(family.test_scorer)(model, tokenizer, recipe, rows)
    result = greedy_eval(model, tokenizer, rows, recipe.eval.max_new_tokens, recipe.eval.batch_size)
    warning = result.warning(f"data.test {when}".strip())
    if warning and is_main_process():
        logger.warning("%s", warning)
        if warnings is not None:
            warnings.append(warning)
    return result.accuracy


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
    from posttrain.distributed import check_backend, requested_backend
    from posttrain.recipe.training_args import check_batch_fits_data, check_training_context, schedule_warnings

    from posttrain.models import check_load_options

    info = recipe.info
    family = FAMILIES[info.family]
    for note in recipe._path_notes:
        logger.info("%s", note)
    _check_not_the_recipe_folder(recipe)
    check_report_to(recipe)
    check_backend(recipe, info, backend or requested_backend())
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
    from posttrain.recipe import read_text

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


def _check_chat_template_file(recipe: Recipe) -> None:
    """``data.chat_template: FILE.jinja`` exists and is a valid Jinja template that renders a plain user/assistant
    conversation in transformers' sandbox: before anything is loaded or written."""
    from posttrain.data.formatting import template_path
    from posttrain.recipe import read_text

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
        raise UserError(f"{where}: fails on a plain user/assistant conversation ({type(exc).__name__}: {exc})") from None


def prepare_output_dir(out: Path, *, resume: bool, overwrite: bool, create: bool = True) -> None:
    """Refuse a folder that is not a writable directory, or that holds another run's outputs (unless ``--resume``
    continues that run or ``--overwrite`` replaces it: then the previous run's outputs are removed). ``create=False``:
    the same checks without creating or removing anything."""
    from posttrain.trainers.common import check_output_dir, previous_outputs, remove_previous_run

    if resume and overwrite:
        raise UserError("--overwrite: cannot be combined with --resume")
    check_output_dir(out, create=create)
    if resume or not create and overwrite:
        return
    previous = previous_outputs(out)
    if not previous:
        return
    if not overwrite:
        shown = ", ".join(previous[:4]) + (", ..." if len(previous) > 4 else "")
        raise UserError(
            f"output_dir: '{out}' holds another run's outputs ({shown}); pass --resume to continue that run, "
            "--overwrite to replace it, or choose another output_dir"
        )
    if create and is_main_process():
        removed = remove_previous_run(out)
        logger.info("--overwrite: removed the previous run's outputs from %s (%s)", out, ", ".join(removed) or "none")


def _finished_summary(out: Path, info: MethodInfo, marker: dict[str, Any]) -> dict[str, Any]:
    try:
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        summary = {"method": info.name, "output_dir": str(out), "steps": marker.get("steps")}
    summary.update(already_finished=True, output_dir=str(out))
    summary.setdefault("steps", marker.get("steps"))
    return summary


def _checkpoint_state(checkpoint: str) -> dict[str, Any]:
    try:
        return json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return {}


def write_report(recipe: Recipe) -> Path | None:
    """``report.html`` of a finished run (``report: false`` skips it). A report that cannot be drawn is a warning:
    the run itself has succeeded."""
    if not recipe.report:
        return None
    from posttrain.run.report import write_report as _write

    try:
        path = _write([recipe.output_dir])
    except Exception as exc:  # noqa: BLE001 - never lose a finished run to a plotting problem
        logger.warning("report not written: %s: %s", type(exc).__name__, exc)
        return None
    logger.info("report: %s", path)
    return path


def run(recipe: Recipe, *, resume: bool = False, overwrite: bool = False, callbacks: list | None = None,
        quiet: bool = False, command: str | None = None) -> dict[str, Any]:
    """Train ``recipe`` end to end; return a summary (accuracies, final metrics, output_dir).

    ``resume``: continue from the newest complete checkpoint; a finished run (``POSTTRAIN_COMPLETE``) is not trained
    again (the summary has ``already_finished: True``), and a run killed during its final save is finished from its
    last checkpoint without training. ``overwrite``: replace another run's outputs in ``output_dir``.
    ``command``: the command line that ran it, for the model card (``posttrain train`` passes it).
    """
    from transformers import set_seed

    from posttrain.run.card import CardContext, last_metrics, model_card, write_card
    from posttrain.eval.periodic import build_periodic_eval
    from posttrain.trainers.common import (
        RUN_MARKER,
        TrainingDiverged,
        checkpoint_step,
        latest_complete_checkpoint,
        non_finite_parameters,
        read_run_marker,
        write_run_marker,
    )

    setup_logging(quiet)
    out = Path(recipe.output_dir)
    checked, recipe._preflight = recipe._preflight, None
    info, config, datasets = checked if checked is not None else preflight(recipe)
    periodic = build_periodic_eval(recipe, info.family)  # evaluation rows load (and fail) before the models do
    prepare_output_dir(out, resume=resume, overwrite=overwrite, create=False)  # checked; written after the last check
    tokenizer = load_run_tokenizer(recipe)
    prepare_chat_format(recipe, info, config, tokenizer, datasets)
    check_reference_tokenizer(recipe, info, tokenizer)
    check_rows_fit(config, tokenizer, datasets)
    checkpoint = None
    if resume:
        marker = read_run_marker(out)
        if marker is not None and (config.max_steps <= 0 or config.max_steps <= int(marker.get("steps") or 0)):
            return _finished_summary(out, info, marker)
        checkpoint = latest_complete_checkpoint(out, remove_incomplete=is_main_process())
        if checkpoint is None:
            raise UserError(f"--resume: no complete checkpoint-* directory in output_dir '{out}' to resume from")
        logger.info("resuming from %s", checkpoint)
        if is_main_process():
            _truncate_metrics(out / "metrics.jsonl", checkpoint_step(checkpoint))
    check_user_code(recipe, info)
    prepare_output_dir(out, resume=resume, overwrite=overwrite)
    if is_main_process():
        (out / RUN_MARKER).unlink(missing_ok=True)  # in progress (again)
        write_resolved_recipe(recipe)
        if not resume:
            (out / "metrics.jsonl").unlink(missing_ok=True)
    if config.use_cpu:
        configure_cpu_threads()
    set_seed(recipe.seed)
    tokenizer, model, ref_model = load_models(recipe, info, tokenizer)
    check_peft_against_model(recipe, model)
    summary: dict[str, Any] = {"method": info.name, "output_dir": str(out)}
    warnings: list[str] = []  # for summary.json and the last lines of the command

    from posttrain.distributed import zero3_enabled

    # the model before training (also on --resume: the checkpoint's weights are loaded by trainer.train)
    deferred, summary["accuracy_before"] = None, None
    if zero3_enabled() and datasets.get("data.test") is not None and not resume:
        # partitioned since loading: measured once DeepSpeed's hooks gather the weights (on --resume those hooks
        # come with the checkpoint's weights: not measured)
        deferred = AccuracyBeforeTraining(tokenizer, recipe, datasets["data.test"], warnings)
    elif not zero3_enabled():
        summary["accuracy_before"] = test_accuracy(model, tokenizer, recipe, datasets.get("data.test"), warnings,
                                                   "before training")
    family = FAMILIES[info.family]
    if family.test_scorer is not None and recipe.data.test is not None:  # printed by `posttrain train` (reward models)
        summary["test_metric"] = family.test_metric

    build = load(family.build_trainer)
    ctx = RunContext(recipe, info, tokenizer, model, ref_model, {}, [MetricsJsonlCallback(out / "metrics.jsonl")],
                     config=config, datasets=datasets)
    if deferred is not None:
        ctx.callbacks.append(deferred)
    if periodic is not None:
        ctx.callbacks.append(periodic)
    ctx.callbacks.extend(callbacks or [])
    trainer = build(ctx)
    if quiet:  # with disable_tqdm, HF prints every log dict to stdout; quiet means warnings only
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    else:
        use_log_lines(trainer)
    # collapse / dead-gradient warnings in every family (the RL trainer diagnoses a zero gradient itself)
    health = HealthMonitor(output_vocab_size(model), watch_gradient=not hasattr(trainer, "signal_monitor"))
    trainer.add_callback(health)
    if periodic is not None:
        periodic.attach(trainer, tokenizer)
    card = CardContext(recipe, info, command)
    trainer.card_context = card
    from posttrain.adapters.trainer import check_trainer_supports_variant

    check_trainer_supports_variant(trainer, recipe, info.name)  # peft.type plora/goat/ggpo need make_trainer
    if trainer.accelerator.num_processes > 1 and is_main_process():
        from posttrain.distributed import backend_name

        logger.info("distributed: %s over %d processes", backend_name(trainer.accelerator),
                    trainer.accelerator.num_processes)
    state = _checkpoint_state(checkpoint) if checkpoint is not None else {}
    target = config.max_steps if config.max_steps > 0 else int(state.get("max_steps") or 0)
    copied = False  # the final model is the last checkpoint's saved model, copied as it is
    save_start = time.time()
    if checkpoint is not None and target > 0 and checkpoint_step(checkpoint) >= target:
        # killed after its last checkpoint, during the final save: that checkpoint holds the final weights
        logger.info("%s is the run's last step: finishing without training", checkpoint)
        losses = [row["loss"] for row in state.get("log_history", []) if "loss" in row]
        steps, train_loss = checkpoint_step(checkpoint), (sum(losses) / len(losses) if losses else float("nan"))
        if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
            # DeepSpeed and FSDP restore their sharded state only inside train(); the checkpoint's gathered model is
            # the final model
            copied = True
            if is_main_process():
                copy_checkpoint_model(checkpoint, out)
        else:
            trainer._load_from_checkpoint(checkpoint)
    else:
        result = trainer.train(resume_from_checkpoint=checkpoint)
        steps, train_loss = result.global_step, result.training_loss
    if not copied:
        bad = non_finite_parameters(trainer.model, trainer.accelerator)
        if bad:
            raise TrainingDiverged(f"training: the final weights hold NaN/inf ({', '.join(bad)}); not saved")
        save_start = time.time()
        trainer.save_model(str(out))
    if is_main_process():
        tokenizer.save_pretrained(str(out))
    if deferred is not None:
        summary["accuracy_before"] = deferred.value
    summary["train_loss"] = train_loss
    summary["steps"] = steps
    warnings = list(recipe._warnings) + list(health.warnings) + warnings
    warnings += trainer.run_warnings() if hasattr(trainer, "run_warnings") else []  # RL: no learning signal, ...
    # printed with the run's last lines by `posttrain train`
    summary["accuracy_after"] = None
    if copied and datasets.get("data.test") is not None:
        logger.info("test accuracy after training: not measured (finished from the last checkpoint, whose sharded "
                    "state only train() restores); run posttrain eval %s", out)
    elif not copied:
        summary["accuracy_after"] = test_accuracy(trainer.model, tokenizer, recipe, datasets.get("data.test"),
                                                  warnings, "after training")
    if warnings:
        summary["warnings"] = warnings
    if is_main_process():
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        metrics = last_metrics(trainer.state.log_history)
        write_card(out, model_card(card, metrics=metrics, summary=summary, step=steps))
        write_report(recipe)
        written = [f.name for f in out.iterdir() if f.is_file() and f.stat().st_mtime >= save_start - 1.0]
        write_run_marker(out, steps, written)
    return summary
