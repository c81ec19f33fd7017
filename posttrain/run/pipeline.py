"""Running a recipe, top to bottom: check it, load the data and models, build the method's trainer, train, save, report.

:func:`run` is the whole pipeline, one named call per phase: the checks that need no model
(:mod:`posttrain.run.preflight`), the output folder and ``--resume`` (:mod:`posttrain.run.outputs`), the models
(:mod:`posttrain.run.models`), the test accuracy before training, the family's trainer, training, the final save, the
test accuracy after training, and the files a finished run leaves (summary, model card, report, run marker).
Multi-stage recipes run each stage through it (:mod:`posttrain.run.stages`).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from pathlib import Path
from typing import Any

from posttrain.distributed import skip_deepspeed_until_imported
from posttrain.families.base import FAMILIES
from posttrain.health import HealthMonitor, use_log_lines
from posttrain.methods import MethodInfo
from posttrain.recipe import Recipe
from posttrain.registry import load
from posttrain.run.models import check_peft_against_model, load_models, load_run_tokenizer, output_vocab_size
from posttrain.run.outputs import (
    MetricsJsonlCallback,
    checkpoint_state,
    copy_checkpoint_model,
    finished_summary,
    is_main_process,
    prepare_output_dir,
    resume_point,
    save_final_model,
    start_outputs,
    write_outputs,
    write_report,
)
from posttrain.run.preflight import (
    check_reference_tokenizer,
    check_report_to,
    check_rows_fit,
    check_user_code,
    prepare_chat_format,
    preflight,
)
from posttrain.threads import configure_cpu_threads
from posttrain.trainers.common import peft_config, training_config  # noqa: F401 (re-exported)

# The names tests, benchmarks and the other commands import from here (posttrain.train is this module).
__all__ = ["RunContext", "check_peft_against_model", "check_report_to", "check_user_code", "load_models",
           "load_run_tokenizer", "prepare_chat_format", "prepare_output_dir", "preflight", "run", "setup_logging",
           "test_accuracy", "training_config", "peft_config", "write_report"]

logger = logging.getLogger("posttrain")


def run(recipe: Recipe, *, resume: bool = False, overwrite: bool = False, callbacks: list | None = None,
        quiet: bool = False, command: str | None = None) -> dict[str, Any]:
    """Train ``recipe`` end to end; return a summary (accuracies, final metrics, output_dir).

    ``resume``: continue from the newest complete checkpoint; a finished run (``POSTTRAIN_COMPLETE``) is not trained
    again (the summary has ``already_finished: True``), and a run killed during its final save is finished from its
    last checkpoint without training. ``overwrite``: replace another run's outputs in ``output_dir``.
    ``command``: the command line that ran it, for the model card (``posttrain train`` passes it).
    """
    from transformers import set_seed

    from posttrain.eval.periodic import build_periodic_eval

    setup_logging(quiet)
    skip_deepspeed_until_imported()  # no DeepSpeed import (half a second) in a run that uses none
    out = Path(recipe.output_dir)
    # the checks that need no model (made already for each stage of a multi-stage recipe), then those of the tokenizer
    checked, recipe._preflight = recipe._preflight, None
    info, config, datasets = checked if checked is not None else preflight(recipe)
    periodic = build_periodic_eval(recipe, info.family)  # evaluation rows load (and fail) before the models do
    prepare_output_dir(out, resume=resume, overwrite=overwrite, create=False)  # checked; written after the last check
    tokenizer = load_run_tokenizer(recipe)
    prepare_chat_format(recipe, info, config, tokenizer, datasets)
    check_reference_tokenizer(recipe, info, tokenizer)
    check_rows_fit(config, tokenizer, datasets)
    start = resume_point(out, config, resume)
    if start.finished is not None:
        return finished_summary(out, info, start.finished)
    check_user_code(recipe, info)  # the recipe's own code: the last check before anything is written or loaded
    start_outputs(recipe, out, resume=resume, overwrite=overwrite)

    if config.use_cpu:  # the models, the test accuracy before training, the trainer, training and the final save
        configure_cpu_threads()
    set_seed(recipe.seed)
    tokenizer, model, ref_model = load_models(recipe, info, tokenizer)
    check_peft_against_model(recipe, model)
    warnings: list[str] = []  # for summary.json and the last lines of the command
    accuracy_before, deferred = measure_before_training(model, tokenizer, recipe, datasets, warnings, resume=resume)

    ctx = RunContext(recipe, info, tokenizer, model, ref_model, {},
                     [MetricsJsonlCallback(out / "metrics.jsonl"), *(c for c in (deferred, periodic) if c is not None)],
                     config=config, datasets=datasets)
    ctx.callbacks.extend(callbacks or [])
    trainer, health, card = build_trainer(ctx, periodic, quiet=quiet, command=command)
    steps, train_loss, saved_since, copied = train(trainer, start.checkpoint, config, out)
    if not copied:
        saved_since = save_final_model(trainer, out)
    if is_main_process():
        tokenizer.save_pretrained(str(out))

    # what the run leaves: summary.json (its warnings also printed by `posttrain train`), card, report, run marker
    summary: dict[str, Any] = {"method": info.name, "output_dir": str(out),
                               "accuracy_before": deferred.value if deferred is not None else accuracy_before}
    if FAMILIES[info.family].test_scorer is not None and recipe.data.test is not None:  # reward models
        summary["test_metric"] = FAMILIES[info.family].test_metric  # printed by `posttrain train`
    summary.update(train_loss=train_loss, steps=steps)
    warnings = list(recipe._warnings) + list(health.warnings) + warnings
    warnings += trainer.run_warnings() if hasattr(trainer, "run_warnings") else []  # RL: no learning signal, ...
    summary["accuracy_after"] = measure_after_training(trainer, tokenizer, recipe, datasets, warnings, copied=copied)
    if warnings:
        summary["warnings"] = warnings
    write_outputs(recipe, out, trainer, card, summary, saved_since)
    return summary


@dataclasses.dataclass
class RunContext:
    """What a family's ``build_trainer(ctx)`` builds its trainer from."""

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


def measure_before_training(model, tokenizer, recipe: Recipe, datasets: dict[str, Any], warnings: list[str], *,
                            resume: bool):
    """``(accuracy, deferred)``: the test accuracy of the model before training (also on ``--resume``: the
    checkpoint's weights are loaded by ``trainer.train``); under ZeRO-3 the policy is partitioned since loading, so the
    accuracy is measured once DeepSpeed's hooks gather the weights, by ``deferred`` (a callback; not on ``--resume``,
    where those hooks come with the checkpoint's weights)."""
    from posttrain.distributed import zero3_enabled

    if not zero3_enabled():
        return test_accuracy(model, tokenizer, recipe, datasets.get("data.test"), warnings, "before training"), None
    if datasets.get("data.test") is not None and not resume:
        return None, AccuracyBeforeTraining(tokenizer, recipe, datasets["data.test"], warnings)
    return None, None


def measure_after_training(trainer, tokenizer, recipe: Recipe, datasets: dict[str, Any], warnings: list[str], *,
                           copied: bool) -> float | None:
    """The test accuracy of the trained model; not measured when the final model was copied from the last checkpoint
    (DeepSpeed / FSDP restore their sharded state only inside ``train()``)."""
    if not copied:
        return test_accuracy(trainer.model, tokenizer, recipe, datasets.get("data.test"), warnings, "after training")
    if datasets.get("data.test") is not None:
        logger.info("test accuracy after training: not measured (finished from the last checkpoint, whose sharded "
                    "state only train() restores); run posttrain eval %s", Path(recipe.output_dir))
    return None


def build_trainer(ctx: RunContext, periodic, *, quiet: bool, command: str | None):
    """``(trainer, health, card)``: the family's trainer for ``ctx``, with log lines (none when ``quiet``), the
    collapse / dead-gradient monitor ``health``, the periodic evaluation and the model card context of every save;
    an adapter variant the trainer cannot wrap is refused."""
    from posttrain.adapters.trainer import check_trainer_supports_variant
    from posttrain.card import CardContext

    trainer = load(FAMILIES[ctx.info.family].build_trainer)(ctx)
    if quiet:  # with disable_tqdm, HF prints every log dict to stdout; quiet means warnings only
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    else:
        use_log_lines(trainer)
    # collapse / dead-gradient warnings in every family (the RL trainer diagnoses a zero gradient itself)
    health = HealthMonitor(output_vocab_size(ctx.model), watch_gradient=not hasattr(trainer, "signal_monitor"))
    trainer.add_callback(health)
    if periodic is not None:
        periodic.attach(trainer, ctx.tokenizer)
    card = CardContext(ctx.recipe, ctx.info, command)
    trainer.card_context = card
    check_trainer_supports_variant(trainer, ctx.recipe, ctx.info.name)  # peft.type plora/goat/ggpo need make_trainer
    if trainer.accelerator.num_processes > 1 and is_main_process():
        from posttrain.distributed import backend_name

        logger.info("distributed: %s over %d processes", backend_name(trainer.accelerator),
                    trainer.accelerator.num_processes)
    return trainer, health, card


def train(trainer, checkpoint: str | None, config, out: Path) -> tuple[int, float, float, bool]:
    """``(steps, train_loss, saved_since, copied)``: ``trainer.train`` (from ``checkpoint`` on ``--resume``), or, for a
    run killed after its last checkpoint during the final save, that checkpoint's weights without training (then
    ``copied``: under DeepSpeed / FSDP the checkpoint's saved model is copied as the final model). ``saved_since``:
    when the final model's files started to be written (``time.time()``)."""
    from posttrain.trainers.common import checkpoint_step

    state = checkpoint_state(checkpoint) if checkpoint is not None else {}
    target = config.max_steps if config.max_steps > 0 else int(state.get("max_steps") or 0)
    saved_since = time.time()
    if checkpoint is None or target <= 0 or checkpoint_step(checkpoint) < target:
        result = trainer.train(resume_from_checkpoint=checkpoint)
        return result.global_step, result.training_loss, saved_since, False
    # killed after its last checkpoint, during the final save: that checkpoint holds the final weights
    logger.info("%s is the run's last step: finishing without training", checkpoint)
    losses = [row["loss"] for row in state.get("log_history", []) if "loss" in row]
    steps, train_loss = checkpoint_step(checkpoint), (sum(losses) / len(losses) if losses else float("nan"))
    if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        # DeepSpeed and FSDP restore their sharded state only inside train(); the checkpoint's gathered model is the
        # final model
        if is_main_process():
            copy_checkpoint_model(checkpoint, out)
        return steps, train_loss, saved_since, True
    trainer._load_from_checkpoint(checkpoint)
    return steps, train_loss, saved_since, False


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
