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
from posttrain.losses.unlearning import uses_retain
from posttrain.methods import MethodInfo, get_method
from posttrain.recipe import Recipe
from posttrain.trainers.build import build_sft_trainer, sft_config
from posttrain.trainers.common import peft_config, training_config  # noqa: F401 (re-exported)
from posttrain.trainers.kto import build_kto_trainer, kto_config
from posttrain.trainers.online_dpo import build_online_trainer, check_online_recipe, online_config
from posttrain.trainers.reward import build_reward_trainer, check_reward_data, pairwise_test_accuracy, reward_config
from posttrain.trainers.preference import build_preference_trainer, preference_config
from posttrain.trainers.rl import build_rl_trainer, check_rl_recipe, rl_config
from posttrain.trainers.unlearning import build_unlearning_trainer, unlearning_config

logger = logging.getLogger("posttrain")

# family -> the function that builds the trainer: build(ctx: RunContext) -> Trainer
TRAINER_BUILDERS = {
    "sft": build_sft_trainer,
    "preference": build_preference_trainer,
    "unpaired": build_kto_trainer,
    "reward": build_reward_trainer,
    "online": build_online_trainer,
    "unlearning": build_unlearning_trainer,
    "rl": build_rl_trainer,
}
# family -> the function that builds its TRL/HF config from the recipe: fn(recipe, info) -> config
CONFIG_BUILDERS = {
    "sft": sft_config,
    "preference": preference_config,
    "unpaired": kto_config,
    "reward": reward_config,
    "online": online_config,
    "unlearning": unlearning_config,
    "rl": rl_config,
}
# family -> the data keys preflight loads, with the row format each is checked against
DATA_KINDS = {
    "sft": {"train": "sft", "eval": "sft", "test": "test"},
    "preference": {"train": "preference", "eval": "preference", "test": "test"},
    "unpaired": {"train": "unpaired", "eval": "unpaired", "test": "test"},
    "reward": {"train": "preference", "eval": "preference", "test": "preference"},
    "online": {"train": "rl", "test": "test"},
    "rl": {"train": "rl", "eval": "rl", "test": "test"},
    "unlearning": {"forget": "unlearning", "retain": "unlearning"},
}
# family -> the check run before any model is loaded or anything is written: check(recipe) -> None
PREFLIGHT_CHECKS = {
    "rl": check_rl_recipe,
    "online": check_online_recipe,
}
# family -> the check of its loaded data (before any model): check(recipe, {"data.<key>": Dataset}) -> None
DATA_CHECKS = {
    "reward": check_reward_data,
}
# family -> (name, scorer) of data.test before and after training: scorer(model, tokenizer, recipe, rows) -> float;
# default: greedy answer accuracy (test_accuracy)
TEST_SCORERS = {
    "reward": ("pairwise accuracy", pairwise_test_accuracy),
}
# family -> the model head load_model puts on the checkpoint (default: the causal LM head)
MODEL_HEADS = {
    "reward": "score",
}


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


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


# training.report_to values that are posttrain extras (pip install 'posttrain[NAME]'; the module has the same name)
TRACKERS = ("tensorboard", "trackio", "wandb")


def check_report_to(recipe: Recipe) -> None:
    """A tracker named in ``training.report_to`` must be installed (before any model is loaded)."""
    import importlib.util

    value = recipe.training.get("report_to")
    names = [value] if isinstance(value, str) else list(value or [])
    for name in names:
        if not isinstance(name, str):
            raise UserError(f"training.report_to: expected a tracker name or a list of them, got {value!r}")
        if name in TRACKERS and importlib.util.find_spec(name) is None:
            raise UserError(
                f"training.report_to: {name} is not installed (pip install 'posttrain[{name}]', or pip install {name})"
            )


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


def reference_mode(recipe: Recipe, info: MethodInfo) -> str:
    """``"required"`` (a reference is used) or ``"none"``, after checking the recipe's ``ref_model`` key."""
    reference = info.reference
    if reference == "optional":  # used only when the params say so (GRPO: method.beta > 0)
        needed = bool(recipe.params.uses_reference)
        if recipe.ref_model not in (None, "none") and not needed:
            raise UserError(
                f"ref_model: method '{info.name}' uses a reference model only for its KL term, which is off "
                "(method.beta: 0); set method.beta > 0 or remove ref_model"
            )
        if recipe.ref_model == "none" and needed:
            raise UserError(
                f"ref_model: none, but method '{info.name}' needs a reference for its KL term (method.beta > 0); "
                "remove it to use a frozen copy of model, give a path, or set method.beta: 0"
            )
        reference = "required" if needed else "none"
    if recipe.ref_model == "none" and reference == "required":
        raise UserError(
            f"ref_model: method '{info.name}' needs a reference model, but the recipe says ref_model: none "
            "(remove it to use a frozen copy of model, or give a path)"
        )
    if recipe.ref_model not in (None, "none") and info.reference == "none":
        raise UserError(f"ref_model: method '{info.name}' uses no reference model; remove ref_model")
    return reference


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

    reference = reference_mode(recipe, info)
    m = recipe.model
    if tokenizer is None:
        tokenizer = load_run_tokenizer(recipe)
    logger.info("loading model: %s", m.path)
    model = load_model(m.path, **load_options(m), head=MODEL_HEADS.get(info.family, "causal"))
    ref_model = None
    if reference == "required" and recipe.ref_model != "none":
        if recipe.ref_model is not None:
            r = recipe.ref_model
            logger.info("loading reference model: %s", r.path)
            ref_model = load_model(r.path, **load_options(r), key="ref_model.path")
        elif recipe.peft is None:  # default: a frozen copy of the initial policy
            import copy

            logger.info("reference model: a frozen copy of the policy")
            ref_model = copy.deepcopy(model)
        else:
            logger.info("reference model: the policy with its adapter disabled")
        # with peft and no ref_model: the adapter-disabled base is the reference (handled by the trainer)
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
        embed = model.get_input_embeddings().weight
        logger.warning(
            "peft.modules_to_save: %s is tied to the output head in this model: the adapter trains and saves a full "
            "copy of it (%.0f MB) and unties it; leave it out unless new tokens must be learned",
            "/".join(sorted(saved)), embed.numel() * embed.element_size() / 2**20)
    checks = [("modules_to_save", p.modules_to_save or [])]
    if isinstance(p.target_modules, list):
        checks.append(("target_modules", p.target_modules))
    for key, targets in checks:
        for target in targets:
            if not exists(target):
                raise UserError(f"peft.{key}: the model has no module named '{target}'{did_you_mean(target, leaves)}")


def test_accuracy(model, tokenizer, recipe: Recipe, rows=None, warnings: list[str] | None = None,
                  when: str = "") -> float | None:
    """Greedy accuracy on ``data.test`` (``eval.max_new_tokens`` new tokens, as every accuracy path); a warning when
    many completions were cut at that limit is logged and added to ``warnings`` (``when``: "before training", ...)."""
    if recipe.data.test is None:
        return None
    from posttrain.data.sources import load_source
    from posttrain.eval.accuracy import greedy_eval

    family = get_method(recipe.method.name).family
    if rows is None:
        rows = load_source(recipe.data.test, "data.test", DATA_KINDS[family]["test"])
    if family in TEST_SCORERS:
        return TEST_SCORERS[family][1](model, tokenizer, recipe, rows)
    result = greedy_eval(model, tokenizer, rows, recipe.eval.max_new_tokens, recipe.eval.batch_size)
    warning = result.warning(f"data.test {when}".strip())
    if warning and is_main_process():
        logger.warning("%s", warning)
        if warnings is not None:
            warnings.append(warning)
    return result.accuracy


def build_config(recipe: Recipe, info: MethodInfo):
    """The family's TRL/HF config object for ``recipe`` (TRL's own validation included; errors name the key)."""
    return CONFIG_BUILDERS[info.family](recipe, info)


def preflight(recipe: Recipe, *, load_data: bool = True,
              build_trainer_config: bool = True) -> tuple[MethodInfo, Any, dict[str, Any]]:
    """Every check that needs no model: returns ``(info, config, datasets)``. Raises :class:`UserError`.
    ``build_trainer_config=False`` (config None) skips the TRL config, whose checks depend on the process count
    (``posttrain train --num-processes`` checks in one process before launching N)."""
    from posttrain.training_args import check_training_context

    from posttrain.models import check_load_options

    info = get_method(recipe.method.name)
    check_training_context(recipe.training, has_eval=recipe.data.eval is not None)
    if "model_init_kwargs" in recipe.training:
        raise UserError("training.model_init_kwargs: posttrain loads the model itself, so TRL would ignore it; use the "
                        "model: keys instead (dtype, attn_implementation, revision, trust_remote_code, device_map, "
                        "quantization)")
    check_load_options(recipe.model, "model", peft=recipe.peft)
    if recipe.ref_model not in (None, "none"):
        check_load_options(recipe.ref_model, "ref_model")
    reference_mode(recipe, info)
    config = build_config(recipe, info) if build_trainer_config else None
    if info.family in PREFLIGHT_CHECKS:  # the family's own checks (user code imported, reward specs)
        PREFLIGHT_CHECKS[info.family](recipe)
    datasets: dict[str, Any] = {}
    if load_data:
        from posttrain.data.sources import load_source

        for key, kind in DATA_KINDS[info.family].items():
            src = getattr(recipe.data, key)
            if src is None or (key == "retain" and not _retain_used(recipe, info)):
                continue
            datasets[f"data.{key}"] = ds = load_source(src, f"data.{key}", kind, seed=recipe.seed)
            if isinstance(src, list):
                recipe._mixtures[f"data.{key}"] = ds.posttrain_mixture
            else:
                logger.info("data.%s: %d rows from %s", key, len(ds), describe_source(src))
        if info.family in DATA_CHECKS:
            DATA_CHECKS[info.family](recipe, datasets)
        _default_assistant_only_loss(recipe, info, config, datasets)
    from posttrain.data.formatting import template_path

    template_path(recipe.data.chat_template, recipe._source_dir)  # a data.chat_template file exists
    return info, config, datasets


def describe_source(src) -> str:
    return src.source + (f" ({src.split})" if not src.source.endswith((".json", ".jsonl", ".parquet")) else "")


def _default_assistant_only_loss(recipe: Recipe, info: MethodInfo, config, datasets: dict[str, Any]) -> None:
    """``messages`` rows in the SFT family: loss on the assistant turns only (:func:`mask_sft_conversations`), unless
    ``training.assistant_only_loss`` says otherwise."""
    train = datasets.get("data.train")
    if info.family != "sft" or train is None or "messages" not in train.column_names:
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
    if info.family == "sft":
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


def _retain_used(recipe: Recipe, info: MethodInfo) -> bool:
    return uses_retain(info.name, getattr(recipe.params, "alpha", 0.0))


def prepare_output_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse a folder that is not a writable directory, or that holds another run's outputs (unless ``--resume``
    continues that run or ``--overwrite`` replaces it: then the previous run's outputs are removed)."""
    from posttrain.trainers.common import check_output_dir, previous_outputs, remove_previous_run

    if resume and overwrite:
        raise UserError("--overwrite: cannot be combined with --resume")
    check_output_dir(out)
    if resume:
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
    if is_main_process():
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
    from posttrain.report import write_report as _write

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

    from posttrain.card import CardContext, last_metrics, model_card, write_card
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
    out = Path(recipe.output_dir).expanduser()
    recipe.output_dir = str(out)
    check_report_to(recipe)
    info, config, datasets = preflight(recipe)
    periodic = build_periodic_eval(recipe, info.family)  # evaluation rows load (and fail) before the models do
    prepare_output_dir(out, resume=resume, overwrite=overwrite)
    tokenizer = load_run_tokenizer(recipe)
    prepare_chat_format(recipe, info, config, tokenizer, datasets)
    checkpoint = None
    if resume:
        marker = read_run_marker(out)
        if marker is not None and (config.max_steps <= 0 or config.max_steps <= int(marker.get("steps") or 0)):
            logger.info("%s: the run already finished (%s steps); nothing to do", out, marker.get("steps"))
            return _finished_summary(out, info, marker)
        checkpoint = latest_complete_checkpoint(out, remove_incomplete=is_main_process())
        if checkpoint is None:
            raise UserError(f"--resume: no complete checkpoint-* directory in output_dir '{out}' to resume from")
        logger.info("resuming from %s", checkpoint)
        if is_main_process():
            _truncate_metrics(out / "metrics.jsonl", checkpoint_step(checkpoint))
    if is_main_process():
        (out / RUN_MARKER).unlink(missing_ok=True)  # in progress (again)
        write_resolved_recipe(recipe)
        if not resume:
            (out / "metrics.jsonl").unlink(missing_ok=True)
    set_seed(recipe.seed)
    tokenizer, model, ref_model = load_models(recipe, info, tokenizer)
    check_peft_against_model(recipe, model)
    summary: dict[str, Any] = {"method": info.name, "output_dir": str(out)}
    warnings: list[str] = []  # for summary.json and the last lines of the command

    before = (test_accuracy(model, tokenizer, recipe, datasets.get("data.test"), warnings, "before training")
              if not resume else None)
    metric = TEST_SCORERS[info.family][0] if info.family in TEST_SCORERS else "accuracy"
    if before is not None and is_main_process():
        logger.info("test %s before training: %.1f%%", metric, 100 * before)
    summary["accuracy_before"] = before
    if metric != "accuracy" and recipe.data.test is not None:
        summary["test_metric"] = metric

    build = TRAINER_BUILDERS[info.family]
    ctx = RunContext(recipe, info, tokenizer, model, ref_model, {}, [MetricsJsonlCallback(out / "metrics.jsonl")],
                     config=config, datasets=datasets)
    if periodic is not None:
        ctx.callbacks.append(periodic)
    ctx.callbacks.extend(callbacks or [])
    trainer = build(ctx)
    if quiet:  # with disable_tqdm, HF prints every log dict to stdout; quiet means warnings only
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    if periodic is not None:
        periodic.attach(trainer, tokenizer)
    card = CardContext(recipe, info, command)
    trainer.card_context = card
    from posttrain.adapters.trainer import check_trainer_supports_variant

    check_trainer_supports_variant(trainer, recipe, info.name)  # peft.type plora/goat/ggpo need make_trainer
    state = _checkpoint_state(checkpoint) if checkpoint is not None else {}
    target = config.max_steps if config.max_steps > 0 else int(state.get("max_steps") or 0)
    if checkpoint is not None and target > 0 and checkpoint_step(checkpoint) >= target and not trainer.is_deepspeed_enabled:
        # killed after its last checkpoint, during the final save: that checkpoint holds the final weights
        logger.info("%s is the run's last step: finishing without training", checkpoint)
        trainer._load_from_checkpoint(checkpoint)
        losses = [row["loss"] for row in state.get("log_history", []) if "loss" in row]
        steps, train_loss = checkpoint_step(checkpoint), (sum(losses) / len(losses) if losses else float("nan"))
    else:
        result = trainer.train(resume_from_checkpoint=checkpoint)
        steps, train_loss = result.global_step, result.training_loss
    bad = non_finite_parameters(trainer.model)
    if bad:
        raise TrainingDiverged(f"training: the final weights hold NaN/inf ({', '.join(bad)}); not saved")
    save_start = time.time()
    trainer.save_model(str(out))
    if is_main_process():
        tokenizer.save_pretrained(str(out))
    summary["train_loss"] = train_loss
    summary["steps"] = steps
    warnings += trainer.run_warnings() if hasattr(trainer, "run_warnings") else []  # RL: no learning signal, ...

    after = test_accuracy(trainer.model, tokenizer, recipe, datasets.get("data.test"), warnings, "after training")
    if after is not None and is_main_process():
        logger.info("test %s after training:  %.1f%%", metric, 100 * after)
    summary["accuracy_after"] = after
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
